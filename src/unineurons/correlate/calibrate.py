"""Calibrated universality: a per-neuron null from many seeded rotations, p- and q-values.

Gurnee et al.'s criterion (excess correlation ϱ > 0.5) was set on GPT-2 small after 100M
tokens; on a small model or a short run no neuron may be able to pass it, or many may pass by
chance. The calibrated criterion asks instead whether a neuron's statistic

    T_i = mean_m max_j ρ(x_i, y^m_j)          (the ``max_corr`` column)

is larger than it would be if the partners had no privileged basis: the same statistic with
every partner's layers rotated by a fresh Haar-random orthogonal matrix, ``R`` times
(``--null-rotations``). The rotated correlations follow analytically from the co-moments and
the partner's within-layer covariance (``Cov(X, YQ) = Cov(X, Y) Q``, as for the baseline), so
the null costs no pass over the tokens: one GEMM per rotation and block.

p-values (:func:`null_pvalues`), per model and layer:

1. each neuron's R null draws give its mean m_i and standard deviation s_i; the observed
   statistic is studentised, ``z_i = (T_i - m_i) / s_i``;
2. every null draw is studentised the same way against the *other* R - 1 draws of its neuron
   (leave one out), so under the null the observed z and the pooled null z's (R x d of them
   per layer) share one distribution, estimation noise of m_i and s_i included;
3. p_i is the share of pooled null z's at or above z_i, ``(1 + count) / (1 + M)``; where
   fewer than ``MIN_EXCEED`` null z's reach z_i (p below ~10 / M, where FDR over tens of
   thousands of neurons needs it), a generalised Pareto tail fitted to the top ``TAIL_FRAC``
   of the pooled z's extrapolates (peaks over threshold; shape clipped at 0, i.e. never a
   lighter tail than exponential, so the extrapolation errs on the large side).

q-values are Benjamini-Hochberg over all of a model's neurons (``scipy.stats.
false_discovery_control``); ``is_universal_calibrated = q < --fdr``. Neurons with zero
variance (NaN correlations) get NaN p and q and are never universal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import stats

from ..progress import progress
from .maxcorr import inv_std, row_max

__all__ = ["block_null", "loo_studentized", "null_pvalues", "bh_qvalues", "MIN_EXCEED",
           "TAIL_FRAC"]

#: Below this many pooled null z's at or above z_i the fitted tail gives p (Knijnenburg et al.
#: 2009, "Fewer permutations, more accurate P-values").
MIN_EXCEED = 10
#: Share of the pooled null z's (at least ``TAIL_MIN``, at most ``TAIL_MAX``) the tail is fitted to.
TAIL_FRAC = 0.1
TAIL_MIN = 50
TAIL_MAX = 2000


def _rotated_inv_std(cov: torch.Tensor, rot: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``[d]``: 1/std of the units of one layer rotated by ``rot`` (``diag(Rᵀ Σ R)``)."""
    return inv_std(((cov @ rot) * rot).sum(0), n)


@torch.inference_mode()
def block_null(
    c_block: torch.Tensor, n: torch.Tensor, m2_rows: torch.Tensor, m2_cols: torch.Tensor, *,
    n_rot: int, d_rows: int, d_cols: int,
    col_cov: torch.Tensor | None = None, col_rot: Callable[[int, int], torch.Tensor] | None = None,
    row_cov: torch.Tensor | None = None, row_rot: Callable[[int, int], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Null maxima of one co-moment block under ``n_rot`` independent rotations.

    ``c_block [R_rows, N_cols]``: summed centred cross products of whole layers of model a
    (rows) against all of model b; ``m2_rows``, ``m2_cols``: the neurons' summed squared
    deviations; ``col_cov [L_b, d_cols, d_cols]`` and ``col_rot(layer, r)``: b's within-layer
    covariances and its r-th null rotation of a layer (float64 ``[d, d]``); the same for the
    rows (``row_cov`` of this block's layers, ``row_rot`` with layers counted from the
    block's first).

    Returns ``row_null [n_rot, R_rows]`` (for each row neuron its max correlation over b's
    rotated units; with ``col_rot``) and ``col_null [n_rot, N_cols]`` (for each b neuron its
    max over this block's rotated rows, a partial maximum to combine across blocks with
    ``fmax``; with ``row_rot``). NaN where a neuron has zero variance.
    """
    inv_r = inv_std(m2_rows, n)
    inv_c = inv_std(m2_cols, n)
    out: dict[str, torch.Tensor] = {}
    # one step: a layer's rotation applied to the block's tiles of that layer
    steps = n_rot * ((len(range(0, c_block.shape[1], d_cols)) if col_rot is not None else 0)
                     + (len(range(0, c_block.shape[0], d_rows)) if row_rot is not None else 0))
    with progress("calibrated null", steps, unit="rotations") as bar:
        if col_rot is not None:
            assert col_cov is not None
            out["row_null"] = _side_null(c_block, inv_r, col_cov, col_rot, n, n_rot, d_rows,
                                         d_cols, bar.advance)
        if row_rot is not None:
            assert row_cov is not None
            # Cov(X_l Q, Y) = Qᵀ C_l: the transposed block, its columns (a's units) rotated
            out["col_null"] = _side_null(c_block.T, inv_c, row_cov, row_rot, n, n_rot, d_cols,
                                         d_rows, bar.advance)
    return out


def _side_null(c: torch.Tensor, inv_rows: torch.Tensor, cov: torch.Tensor,
               rot_of: Callable[[int, int], torch.Tensor], n: torch.Tensor, n_rot: int,
               d_rows: int, d_cols: int, advance: Callable[[int], None] = lambda k: None
               ) -> torch.Tensor:
    """``[n_rot, rows]``: for each null draw, each row unit's max correlation over the column
    side's units rotated layer by layer (``rot_of(layer, draw)``, layer covariances ``cov``);
    ``c [rows, cols]`` in tiles of ``d_rows`` x ``d_cols``. One direction of :func:`block_null`."""
    rows, cols = c.shape
    null = torch.full((n_rot, rows), float("nan"), dtype=torch.float64, device=c.device)
    for r in range(n_rot):
        for tj, c0 in enumerate(range(0, cols, d_cols)):
            rot = rot_of(tj, r).to(c.device)
            inv_cr = _rotated_inv_std(cov[tj], rot, n)
            for r0 in range(0, rows, d_rows):
                rs = slice(r0, r0 + d_rows)
                base = (c[rs, c0:c0 + d_cols] @ rot) * inv_rows[rs, None] * inv_cr[None, :]
                null[r, rs] = torch.fmax(null[r, rs], row_max(base, 1, dim=1)[0][:, 0])
                del base
            del rot
            advance(1)
    return null


def loo_studentized(null: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per neuron mean and standard deviation (ddof 1) of its draws, and each draw
    studentised against the other draws of its neuron (leave one out).

    ``null [R, N]`` (R >= 3) -> ``mean [N]``, ``sd [N]``, ``z [R, N]`` with
    ``z_rk = (x_rk - mean_{-r}) / sd_{-r}``. Uses ``x_r - mean_{-r} = d_r R / (R - 1)`` and
    ``SS_{-r} = SS - d_r² R / (R - 1)`` with ``d_r = x_r - mean``.
    """
    R = null.shape[0]
    mean = null.mean(0)
    d = null - mean
    ss = (d * d).sum(0)
    sd = np.sqrt(ss / (R - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        ss_loo = np.clip(ss - d * d * R / (R - 1), 0.0, None)
        z = d * (R / (R - 1)) / np.sqrt(ss_loo / (R - 2))
    return mean, sd, z


def _tail_fit(pooled: np.ndarray) -> tuple[float, float, float, float]:
    """Peaks over threshold of the sorted pooled null z's: (threshold u, share above it,
    GPD shape c >= 0, scale)."""
    M = pooled.size
    k = int(min(max(TAIL_MIN, TAIL_FRAC * M), TAIL_MAX, M - 1))
    u = float(pooled[M - k - 1])
    exc = pooled[M - k:] - u
    exc = exc[exc > 0]
    if exc.size < 2:
        return u, k / M, 0.0, float("nan")
    c, _, scale = stats.genpareto.fit(exc, floc=0.0)
    if not (np.isfinite(c) and c >= 0 and np.isfinite(scale) and scale > 0):
        c, scale = 0.0, float(exc.mean())  # exponential tail: the MLE scale is the mean
    return u, k / M, float(c), float(scale)


def null_pvalues(obs: np.ndarray, null: np.ndarray, layer: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-sided p-values of ``obs [N]`` against each neuron's null draws ``null [R, N]``,
    pooled per layer (``layer [N]``); see the module docstring.

    Returns ``p [N]``, the null mean ``[N]`` and standard deviation ``[N]``. NaN p where the
    observation or a null draw is NaN, or the draws do not vary.
    """
    if null.shape[0] < 3:
        raise ValueError("null_pvalues needs at least 3 null draws per neuron")
    mean, sd, z_null = loo_studentized(null)
    p = np.full(obs.shape, np.nan)
    ok_all = np.isfinite(obs) & np.isfinite(null).all(0) & (sd > 0) & np.isfinite(z_null).all(0)
    for lay in np.unique(layer):
        ok = ok_all & (layer == lay)
        if not ok.any():
            continue
        pooled = np.sort(z_null[:, ok].ravel())
        M = pooled.size
        z = (obs[ok] - mean[ok]) / sd[ok]
        count = M - np.searchsorted(pooled, z, side="left")  # pooled z's >= z
        pl = (1.0 + count) / (1.0 + M)
        few = count < MIN_EXCEED
        if few.any():
            u, share, c, scale = _tail_fit(pooled)
            if np.isfinite(scale):
                tail = share * stats.genpareto.sf(z[few] - u, c, loc=0.0, scale=scale)
                pl[few] = np.where(z[few] > u, tail, pl[few])  # the fit holds beyond u only
        p[np.flatnonzero(ok)] = pl
    return p, mean, sd


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over the finite entries of ``p``; NaN stays NaN."""
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def calibrated_columns(max_corr: np.ndarray, nulls: list[np.ndarray], layer: np.ndarray,
                       fdr: float) -> dict[str, np.ndarray]:
    """The calibrated criterion's per-neuron columns of one model.

    ``max_corr [N]``: the mean over partners of each neuron's max correlation; ``nulls``: per
    partner the null maxima ``[R, N]`` (averaged over partners draw by draw, as ``max_corr``
    is); ``layer [N]``. Returns ``null_mean_corr``, ``null_sd_corr``, ``p_value``, ``q_value``
    (BH over the whole model) and ``is_universal_calibrated`` (``q < fdr``).
    """
    null = np.stack(nulls).mean(0)  # [R, N]
    p, mean, sd = null_pvalues(max_corr, null, layer)
    q = bh_qvalues(p)
    with np.errstate(invalid="ignore"):
        flag = q < fdr
    return {"null_mean_corr": mean, "null_sd_corr": sd, "p_value": p, "q_value": q,
            "is_universal_calibrated": flag}
