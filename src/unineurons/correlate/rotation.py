"""Seeded random orthogonal matrices for the random-rotation baseline (Gurnee et al. eq. 2).

The baseline asks how well a neuron of model a correlates with *some* direction of model b's
layer that is not a neuron: b's activations rotated per layer by a random orthogonal R. With
``Cov(X, YR) = Cov(X, Y) R`` and ``Var((YR)_j) = r_jᵀ Σ_YY r_j`` this needs only the cross
co-moments and b's within-layer covariance, never a second pass over the data.
"""

from __future__ import annotations

import hashlib
import threading

import torch

__all__ = ["random_orthogonal", "rotation_for"]

#: Largest ``d`` whose QR runs on one CPU thread (see :func:`random_orthogonal`).
SERIAL_QR_MAX = 1024
_QR_LOCK = threading.Lock()


def random_orthogonal(d: int, generator: torch.Generator, device: str | torch.device = "cpu"
                      ) -> torch.Tensor:
    """A Haar-random orthogonal ``[d, d]`` float64 matrix: QR of a Gaussian, sign-corrected.

    Without the sign correction (multiplying column j by sign(R_jj)) QR's output is not
    uniformly distributed over the orthogonal group. ``device``: where the QR runs (the
    Gaussian is drawn on the CPU, so the draw does not depend on the device).
    """
    g = torch.randn(d, d, generator=generator, dtype=torch.float64).to(device)
    if g.device.type == "cpu" and d <= SERIAL_QR_MAX and torch.get_num_threads() > 1:
        # Householder QR of a small matrix is a chain of fine-grained parallel regions: on a
        # busy machine their threads spin waiting for each other. Measured on 2 shared cores
        # (load ~7): d = 512 took 0.5 CPU-s (1.0 s wall) with 2 threads against 0.035 (0.1 s)
        # with one, d = 1024 0.49 CPU-s (1.4 s) against 0.14 (0.5 s). On idle cores more
        # threads can be up to that many times faster at d = 1024 (~0.13 s on one here).
        # The result no longer depends on the caller's thread count either (LAPACK's differs
        # in the last bits between thread counts). The lock keeps two Python threads from
        # interleaving the switch and leaving the process on one thread.
        with _QR_LOCK:
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                q, r = torch.linalg.qr(g)
            finally:
                torch.set_num_threads(prev)
    else:
        q, r = torch.linalg.qr(g)
    s = torch.sign(torch.diagonal(r))
    s[s == 0] = 1.0
    return q * s  # scales column j by s_j


def rotation_for(seed: int, model_key: str, layer: int, d: int, draw: int | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """The rotation of ``layer`` of the model identified by ``model_key`` (its weight hash).

    Keyed by the model itself, not its position on the command line, so a model keeps its
    rotation whichever pair it is in and whatever order models are given. ``draw``: the
    ``draw``-th rotation of the calibrated null (``--null-rotations``), independent of the
    baseline's (``draw`` None).
    """
    key = f"{seed}|{model_key}|{layer}" + ("" if draw is None else f"|null{draw}")
    h = hashlib.sha256(key.encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return random_orthogonal(d, gen, device)
