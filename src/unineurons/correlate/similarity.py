"""Layer similarity from the correlate pass's own second moments: linear CKA and ridge R².

Everything here is computed from one finished co-moment block (layers ``[l0, l1)`` of model a
against every neuron of model b: the summed centred cross products ``C_ab``) and the two
models' within-layer covariances ``C_aa``, ``C_bb`` (:class:`~unineurons.accumulators.LayerCov`,
already kept for the rotation baseline). No extra pass over the tokens.

**Linear CKA** (Kornblith et al. 2019, eq. for linear kernels) of layer ``la`` of a and layer
``lb`` of b, with centred covariances::

    CKA = ‖C_ab‖²_F / (‖C_aa‖_F ‖C_bb‖_F)

(the 1/n factors cancel). It equals CKA computed on the raw, centred activations.

**Debiased CKA, from second moments only.** The distribution-free unbiased HSIC estimator
(Song et al. 2012, used by Nguyen et al. 2021 / Davari et al. 2022) needs per-token terms
``Σ_t ‖x_t‖² ‖y_t‖²`` and ``Σ_t x_t ‖y_t‖²`` (third and fourth moments) that the accumulators do
not keep, so it **cannot** be computed here. What can be removed from second moments is the
bias under Gaussian sampling: for a sample covariance with ``m = n - 1`` degrees of freedom
(Wishart), ``E‖S_ab‖² = ‖Σ_ab‖²(1 + 1/m) + tr Σ_aa tr Σ_bb / m`` and
``E[tr S_aa tr S_bb] = tr Σ_aa tr Σ_bb + 2‖Σ_ab‖²/m``; solving gives an estimator of ``‖Σ_ab‖²``
unbiased for Gaussian activations, proportional to ``‖C_ab‖² − tr C_aa tr C_bb / m``::

    CKA_debiased = (‖C_ab‖² − tr C_aa tr C_bb / m) / sqrt((‖C_aa‖² − (tr C_aa)²/m)(‖C_bb‖² − (tr C_bb)²/m))

It removes the O(d/n) positive bias of the plain estimator (two independent layers score ≈ 0
instead of ≈ d/n); for heavy-tailed activations it is approximate, and tokens of one context
are not independent (the effective n is smaller), so it under-corrects there.

**Ridge R² and the neuron basis.** Per layer pair and direction, the neurons of a target layer
(standardised) are predicted from a source layer's neurons (standardised) by ridge regression,
from the correlation matrices alone: with ``R_xx = V diag(s) Vᵀ`` and ``P = Vᵀ R_xy``, target
j's in-sample explained variance at penalty λ is ``Σ_k P_kj² (s_k + 2λ)/(s_k + λ)²``, and the
hat matrix's trace is ``1 + Σ_k s_k/(s_k + λ)``. λ is chosen from a grid by generalised
cross-validation (Golub et al. 1979; GCV = RSS/n / (1 − df/n)², computable from the same
moments), and ``ridge_r2`` is the mean over target neurons of ``1 − GCV_j`` (an out-of-sample
estimate; optimistic where tokens are correlated). ``neuron_r2`` is the mean over target
neurons of ``max_i ρ_ij²``: the R² of the best *single* source neuron. ``rotated_r2`` is the same
with the source layer randomly rotated (the engine's rotation): the best single direction of a
random basis. ``neuron_r2 / ridge_r2`` is how much of the linearly shared representation the
neuron basis reaches.
"""

from __future__ import annotations

import math

import torch

from ..progress import progress
from .maxcorr import ZERO_VAR

__all__ = ["cka_from_cov", "ridge_r2_from_corr", "layer_pair_similarity", "unit_similarity",
           "similarity_work_bytes", "LAMBDAS", "SIM_TILES", "SIM_CROSS"]

#: Ridge penalties tried (in units of the mean eigenvalue of a correlation matrix, i.e. 1):
#: 1e-6 to 1e2, four per decade.
LAMBDAS = tuple(10.0 ** (e / 4) for e in range(-24, 9))
#: float64 working copies of size max(d_a, d_b)² that :func:`unit_similarity` holds at once
#: beyond the cached eigenvectors (eigendecomposition workspace, rotated covariance products),
#: plus ``SIM_CROSS`` of size d_a x d_b (ρ, projections and their squares). Measured with the
#: torch profiler (peak live bytes; tests/test_plan.py's helper): 7.0 max-tiles for one
#: 256 x 256 row layer, 8.0 for two 384 x 384 row layers, 3.6 / 3.9 for 512 x 128 / 128 x 512;
#: the count below is 8.0, 9.0, 5.8 and 4.9 of them.
SIM_TILES = 4
SIM_CROSS = 3


def similarity_work_bytes(l0: int, l1: int, d_a: int, d_b: int) -> int:
    """Bytes of working memory of :func:`unit_similarity` for a block of layers ``[l0, l1)``
    of a model with ``d_a`` neurons per layer against one with ``d_b``: the cached source-side
    eigendecompositions of the block's layers plus the working copies of one layer pair."""
    return 8 * ((l1 - l0) * (d_a * d_a + d_a) + SIM_TILES * max(d_a, d_b) ** 2
                + SIM_CROSS * d_a * d_b)


def cka_from_cov(c_ab: torch.Tensor, c_aa: torch.Tensor, c_bb: torch.Tensor, n: float
                 ) -> tuple[float, float]:
    """Linear CKA and its Gaussian-debiased form (module docstring) of two layers.

    ``c_ab [d_a, d_b]``, ``c_aa [d_a, d_a]``, ``c_bb [d_b, d_b]``: summed (or averaged: any
    common scale) centred cross products; ``n``: the number of tokens they sum over. Returns
    ``(cka, cka_debiased)``; NaN where a layer has no variance or a debiased self-term is ≤ 0.
    """
    a_ab = float((c_ab * c_ab).sum())
    a_aa, a_bb = float((c_aa * c_aa).sum()), float((c_bb * c_bb).sum())
    t_a, t_b = float(torch.diagonal(c_aa).sum()), float(torch.diagonal(c_bb).sum())
    cka = a_ab / math.sqrt(a_aa * a_bb) if a_aa > 0 and a_bb > 0 else float("nan")
    m = n - 1.0
    if m <= 0:
        return cka, float("nan")
    u_aa, u_bb = a_aa - t_a * t_a / m, a_bb - t_b * t_b / m
    deb = (a_ab - t_a * t_b / m) / math.sqrt(u_aa * u_bb) if u_aa > 0 and u_bb > 0 else float("nan")
    return cka, deb


def _standardise(cov: torch.Tensor, n: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv_std [d], ok [d])`` of a summed covariance; inv_std is 0 where the variance is zero."""
    var = torch.diagonal(cov)
    ok = (var / n) > ZERO_VAR
    inv = torch.where(ok, var.clamp_min(1e-300).rsqrt(), torch.zeros_like(var))
    return inv, ok


def _eig(cov: torch.Tensor, n: float) -> dict[str, torch.Tensor]:
    """Correlation matrix eigendecomposition of a summed covariance (constant neurons dropped
    as zero rows/columns, so they contribute nothing)."""
    inv, ok = _standardise(cov, n)
    r = cov * inv[:, None] * inv[None, :]
    s, v = torch.linalg.eigh(r)
    return {"inv": inv, "ok": ok, "s": s.clamp_min(0), "v": v}


def ridge_r2_from_corr(s: torch.Tensor, p2: torch.Tensor, n: float, target_ok: torch.Tensor
                       ) -> tuple[float, float, float]:
    """GCV-chosen ridge R² of standardised targets from standardised sources.

    ``s [d_x]``: eigenvalues of the sources' correlation matrix; ``p2 [d_x, d_y]``: the squared
    projections ``(Vᵀ R_xy)²`` of the cross-correlations on its eigenvectors; ``n``: tokens;
    ``target_ok [d_y]``: targets with variance. Returns ``(r2_gcv, r2_in_sample, lambda)``,
    each R² the mean over ok targets; NaN when no target has variance.
    """
    if int(target_ok.sum()) == 0:
        return float("nan"), float("nan"), float("nan")
    p2 = p2[:, target_ok]
    best = (float("inf"), float("nan"), float("nan"))
    for lam in LAMBDAS:
        w = (s + 2 * lam) / (s + lam) ** 2  # [d_x]
        explained = (w @ p2).clamp(max=1.0)  # [d_y] in-sample R² per target
        df = 1.0 + float((s / (s + lam)).sum())
        if df >= n:
            continue
        gcv = float((1.0 - explained).mean()) / (1.0 - df / n) ** 2
        if gcv < best[0]:
            best = (gcv, float(explained.mean()), lam)
    gcv, r2_in, lam = best
    return 1.0 - gcv, r2_in, lam


def _best_single_r2(rho: torch.Tensor, target_ok: torch.Tensor) -> float:
    """Mean over ok targets (columns) of the best single source's R² ``max_i ρ_ij²``."""
    if int(target_ok.sum()) == 0:
        return float("nan")
    r2 = torch.nan_to_num(rho[:, target_ok] ** 2, nan=0.0)
    return float(r2.amax(0).mean())


def layer_pair_similarity(c_ab: torch.Tensor, c_aa: torch.Tensor, c_bb: torch.Tensor, n: float,
                          eig_a: dict | None = None, eig_b: dict | None = None,
                          rot_a: torch.Tensor | None = None, rot_b: torch.Tensor | None = None
                          ) -> dict[str, float]:
    """Every layer-similarity number of one layer pair (module docstring).

    ``c_ab [d_a, d_b]`` summed centred cross products, ``c_aa``, ``c_bb`` the layers' summed
    covariances, ``n`` tokens; ``eig_*``: cached :func:`_eig` results; ``rot_*``: the layers'
    rotations for ``rotated_r2`` (NaN without). Keys: ``cka``, ``cka_debiased``; per direction
    (``ab``: b's neurons predicted from a's layer, ``ba``: the reverse) ``ridge_r2_*``,
    ``ridge_r2_in_*``, ``ridge_lambda_*``, ``neuron_r2_*``, ``rotated_r2_*``.
    """
    cka, deb = cka_from_cov(c_ab, c_aa, c_bb, n)
    ea = eig_a if eig_a is not None else _eig(c_aa, n)
    eb = eig_b if eig_b is not None else _eig(c_bb, n)
    rho = c_ab * ea["inv"][:, None] * eb["inv"][None, :]  # zero where either side is constant
    out = {"cka": cka, "cka_debiased": deb}
    for tag, e_src, e_tgt, r, rot, c_src in (("ab", ea, eb, rho, rot_a, c_aa),
                                            ("ba", eb, ea, rho.T, rot_b, c_bb)):
        p2 = (e_src["v"].T @ r) ** 2
        g, i, lam = ridge_r2_from_corr(e_src["s"], p2, n, e_tgt["ok"])
        out[f"ridge_r2_{tag}"], out[f"ridge_r2_in_{tag}"], out[f"ridge_lambda_{tag}"] = g, i, lam
        out[f"neuron_r2_{tag}"] = _best_single_r2(r, e_tgt["ok"])
        if rot is None:
            out[f"rotated_r2_{tag}"] = float("nan")
            continue
        # sources rotated: Cov(X R, Y) = Rᵀ C_xy, Var((XR)_k) = r_kᵀ C_xx r_k
        c_xy = c_ab if tag == "ab" else c_ab.T
        rot = rot.to(c_ab.device)
        inv_r, _ = _standardise(rot.T @ c_src @ rot, n)
        rr = (rot.T @ c_xy) * inv_r[:, None] * e_tgt["inv"][None, :]
        out[f"rotated_r2_{tag}"] = _best_single_r2(rr, e_tgt["ok"])
    return out


#: Per layer-pair numbers :func:`unit_similarity` returns, in this order along the last axis.
FIELDS = ("cka", "cka_debiased", "ridge_r2_ab", "ridge_r2_in_ab", "ridge_lambda_ab",
          "neuron_r2_ab", "rotated_r2_ab", "ridge_r2_ba", "ridge_r2_in_ba", "ridge_lambda_ba",
          "neuron_r2_ba", "rotated_r2_ba")


def unit_similarity(c_block: torch.Tensor, n: float, l0: int, l1: int, cov_a: torch.Tensor,
                    cov_b: torch.Tensor, rot_a: list[torch.Tensor] | None = None,
                    rot_b: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Layer similarity of one co-moment block: ``[l1 - l0, L_b, len(FIELDS)]`` float64.

    ``c_block [(l1-l0) * d_a, L_b * d_b]``: summed centred cross products of layers
    ``[l0, l1)`` of a with all of b; ``cov_a [L_a, d_a, d_a]``, ``cov_b [L_b, d_b, d_b]``: the
    models' summed within-layer covariances; ``n``: tokens; ``rot_*``: per-layer rotations.
    Memory: :func:`similarity_work_bytes`.
    """
    d_a, d_b, L_b = cov_a.shape[-1], cov_b.shape[-1], cov_b.shape[0]
    out = torch.full((l1 - l0, L_b, len(FIELDS)), float("nan"), dtype=torch.float64)
    with progress("layer similarity", (l1 - l0) * L_b, unit="layer pairs") as bar:
        eig_a = [_eig(cov_a[la], n) for la in range(l0, l1)]
        for lb in range(L_b):
            eig_b = _eig(cov_b[lb], n)
            for i, la in enumerate(range(l0, l1)):
                tile = c_block[i * d_a:(i + 1) * d_a, lb * d_b:(lb + 1) * d_b]
                res = layer_pair_similarity(tile, cov_a[la], cov_b[lb], n, eig_a[i], eig_b,
                                            rot_a[la] if rot_a is not None else None,
                                            rot_b[lb] if rot_b is not None else None)
                out[i, lb] = torch.tensor([res[f] for f in FIELDS], dtype=torch.float64)
                bar.advance(1)
            del eig_b
    return out
