"""One-to-one neuron matching and mutual best matches (Li et al. 2016, "Convergent learning").

Max-correlation matching (Gurnee et al.) lets many neurons of model a share one partner in b.
Here, per layer pair, the neurons of layer ``la`` of a and of layer ``lb`` of b are matched
one-to-one by the bipartite assignment that maximises the summed correlation (the Hungarian
problem, :func:`scipy.optimize.linear_sum_assignment` on ρ), and a pair ``(i, j)`` is a *mutual
best match* when j is i's most correlated neuron of layer lb and i is j's most correlated
neuron of layer la. The rotation baseline's share is the same count with the partner layer
randomly rotated (the engine's per-layer rotation): how many mutual best matches a basis
with no privileged directions gets.

Layer pairs: models of equal depth are matched layer to layer (``lb = la``, Li et al.'s
setting); models of different depth get no assignment (columns -1 / NaN / missing).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..progress import progress
from .maxcorr import inv_std

__all__ = ["assign", "mutual_best", "unit_matching", "matching_work_bytes", "MATCH_TILES"]

#: float64 layer-pair tiles held at once by :func:`unit_matching` (ρ, its NaN-filled copies, a
#: rotated correlation tile); measured 2.0 and 2.15 (torch profiler, 256 and 384 wide layers).
MATCH_TILES = 3


def matching_work_bytes(d_a: int, d_b: int) -> int:
    """Working bytes of :func:`unit_matching` for layers of ``d_a`` and ``d_b`` neurons."""
    return 8 * MATCH_TILES * max(d_a, d_b) ** 2


def assign(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-weight one-to-one assignment of rows to columns of ``rho [d_a, d_b]``.

    NaN correlations (constant neurons) are never preferred: they count as -2, and a pair
    whose correlation is NaN is reported unassigned. Returns ``(row_to_col [d_a] int64,
    row_corr [d_a], col_to_row [d_b] int64, col_corr [d_b])``, -1 / NaN where unassigned
    (also the surplus side of a rectangular ``rho``).
    """
    filled = np.where(np.isfinite(rho), rho, -2.0)
    r, c = linear_sum_assignment(filled, maximize=True)
    keep = np.isfinite(rho[r, c])
    r, c = r[keep], c[keep]
    row_to_col = np.full(rho.shape[0], -1, dtype=np.int64)
    col_to_row = np.full(rho.shape[1], -1, dtype=np.int64)
    row_corr = np.full(rho.shape[0], np.nan)
    col_corr = np.full(rho.shape[1], np.nan)
    row_to_col[r], col_to_row[c] = c, r
    row_corr[r] = col_corr[c] = rho[r, c]
    return row_to_col, row_corr, col_to_row, col_corr


def mutual_best(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [d_a] bool, cols [d_b] bool)``: whether each row / column is in a mutual best
    match of ``rho [d_a, d_b]`` (NaN entries ignored; an all-NaN row or column is in none)."""
    filled = torch.nan_to_num(rho, nan=float("-inf"))
    best_col = filled.argmax(1)  # [d_a]
    best_row = filled.argmax(0)  # [d_b]
    rows = torch.arange(rho.shape[0], device=rho.device)
    finite_row = torch.isfinite(filled).any(1)
    row_flag = (best_row[best_col] == rows) & finite_row
    col_flag = torch.zeros(rho.shape[1], dtype=torch.bool, device=rho.device)
    col_flag[best_col[row_flag]] = True
    return row_flag, col_flag


def unit_matching(c_block: torch.Tensor, n: torch.Tensor, l0: int, l1: int,
                  cov_a: torch.Tensor, cov_b: torch.Tensor, rot_a: list[torch.Tensor],
                  rot_b: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Assignment and mutual best matches of one co-moment block, layer to same layer.

    ``c_block [(l1-l0) * d_a, L * d_b]`` summed centred cross products of layers ``[l0, l1)``
    of a with all of b (both of depth L); ``cov_a [L, d_a, d_a]``, ``cov_b [L, d_b, d_b]`` the
    summed within-layer covariances; ``n`` tokens; ``rot_*`` the per-layer rotations. Returns,
    for a's neurons of these layers (``row_*``, ``[(l1-l0) * d_a]``) and b's neurons of the same
    layers (``col_*``, ``[(l1-l0) * d_b]``): ``assigned`` (index within the partner layer, -1
    none), ``assigned_corr``, ``mutual`` and ``mutual_base`` (against the rotated partner).
    Memory: :func:`matching_work_bytes`.
    """
    d_a, d_b = cov_a.shape[-1], cov_b.shape[-1]
    parts: dict[str, list] = {k: [] for k in ("row_assigned", "row_assigned_corr", "row_mutual",
                                              "row_mutual_base", "col_assigned",
                                              "col_assigned_corr", "col_mutual", "col_mutual_base")}
    with progress("one-to-one matching", l1 - l0, unit="layers") as bar:
        for i, la in enumerate(range(l0, l1)):
            tile = c_block[i * d_a:(i + 1) * d_a, la * d_b:(la + 1) * d_b]
            inv_a = inv_std(torch.diagonal(cov_a[la]).clone(), n)
            inv_b = inv_std(torch.diagonal(cov_b[la]).clone(), n)
            rho = tile * inv_a[:, None] * inv_b[None, :]  # [d_a, d_b], NaN for constant neurons
            rc, rcorr, cr, ccorr = assign(rho.cpu().numpy())
            parts["row_assigned"].append(torch.from_numpy(rc))
            parts["row_assigned_corr"].append(torch.from_numpy(rcorr))
            parts["col_assigned"].append(torch.from_numpy(cr))
            parts["col_assigned_corr"].append(torch.from_numpy(ccorr))
            rf, cf = mutual_best(rho)
            parts["row_mutual"].append(rf.cpu())
            parts["col_mutual"].append(cf.cpu())
            del rho
            # baseline for a's neurons: b's layer rotated; for b's neurons: a's layer rotated
            rb = rot_b[la].to(tile.device)
            inv_rb = inv_std(((cov_b[la] @ rb) * rb).sum(0), n)
            parts["row_mutual_base"].append(
                mutual_best((tile @ rb) * inv_a[:, None] * inv_rb[None, :])[0].cpu())
            ra = rot_a[la].to(tile.device)
            inv_ra = inv_std(((cov_a[la] @ ra) * ra).sum(0), n)
            parts["col_mutual_base"].append(
                mutual_best((ra.T @ tile) * inv_ra[:, None] * inv_b[None, :])[1].cpu())
            bar.advance(1)
    return {k: torch.cat(v) for k, v in parts.items()}
