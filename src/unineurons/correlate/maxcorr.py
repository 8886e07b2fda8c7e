"""From co-moments to correlations: max, argmax, top-k and the rotation baseline.

Inputs are summed centred products (``C`` of :class:`~unineurons.accumulators.CoMoments`,
``c`` of :class:`~unineurons.accumulators.LayerCov`); the 1/n factors cancel in every ratio.
Neurons with zero variance get NaN correlations; a maximum over a row that has some NaN
entries ignores them, a row that is all NaN gives NaN.
"""

from __future__ import annotations

import torch

__all__ = ["inv_std", "row_max", "rotated_block", "block_results", "combine_topk", "ZERO_VAR"]

#: A neuron whose variance is at most this (in activation units²) counts as constant.
ZERO_VAR = 1e-20


def inv_std(m2: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """1/sqrt(m2), NaN where the variance ``m2 / n`` is zero."""
    out = m2.clamp_min(0).rsqrt()
    out[(m2 / n) <= ZERO_VAR] = float("nan")
    return out


def _nanmax(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over ``dim`` ignoring NaN; positions with no finite value give NaN and -1."""
    filled = torch.nan_to_num(x, nan=float("-inf"))
    k = min(k, x.shape[dim])
    v, i = torch.topk(filled, k, dim=dim)
    bad = torch.isinf(v) & (v < 0)
    v = v.masked_fill(bad, float("nan"))
    i = i.masked_fill(bad, -1)
    return v, i


def row_max(rho: torch.Tensor, k: int = 1, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` values and indices along ``dim``, NaN-aware."""
    return _nanmax(rho, k, dim)


def rotated_block(c_block: torch.Tensor, cov_layers: torch.Tensor, rotations: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the column side of ``c_block [R, L*d]`` per layer.

    Returns ``(C R [R, L*d], m2 of the rotated columns [L*d])`` where for layer l the
    rotated variance is ``diag(R_lᵀ Σ_l R_l)``.
    """
    n_layers, d, _ = cov_layers.shape
    cr = torch.empty_like(c_block)
    m2r = torch.empty(n_layers * d, dtype=torch.float64, device=c_block.device)
    for layer in range(n_layers):
        r = rotations[layer].to(c_block.device)
        sl = slice(layer * d, (layer + 1) * d)
        cr[:, sl] = c_block[:, sl] @ r
        m2r[sl] = ((cov_layers[layer] @ r) * r).sum(0)
    return cr, m2r


def block_results(
    c_block: torch.Tensor, n: torch.Tensor, m2_rows: torch.Tensor, m2_cols: torch.Tensor,
    *, k: int = 5, col_cov: torch.Tensor | None = None, col_rot: list[torch.Tensor] | None = None,
    row_cov: torch.Tensor | None = None, row_rot: list[torch.Tensor] | None = None,
    rows_dir: bool = True, cols_dir: bool = False, want_rho: bool = False,
) -> dict[str, torch.Tensor]:
    """Correlation summaries for a block of rows (whole layers of model a) x all of model b.

    ``rows_dir``: for each row, top-k partners and the baseline max (columns rotated by
    ``col_rot`` using ``col_cov``). ``cols_dir``: for each column, top-k rows of this block and
    the baseline max with the *rows* rotated (``row_rot``, ``row_cov`` of this block's layers);
    these are partial and combine across blocks with :func:`combine_topk`.
    """
    inv_r = inv_std(m2_rows, n)  # [R]
    inv_c = inv_std(m2_cols, n)  # [Nb]
    rho = c_block * inv_r[:, None] * inv_c[None, :]  # [R, Nb]
    out: dict[str, torch.Tensor] = {}
    if rows_dir:
        v, i = row_max(rho, k, dim=1)
        out["row_topv"], out["row_topi"] = v, i
        if col_rot is not None:
            cr, m2r = rotated_block(c_block, col_cov, col_rot)
            base = cr * inv_r[:, None] * inv_std(m2r, n)[None, :]
            out["row_base"] = row_max(base, 1, dim=1)[0][:, 0]
    if cols_dir:
        v, i = row_max(rho, k, dim=0)  # [k, Nb]
        out["col_topv"], out["col_topi"] = v.T.contiguous(), i.T.contiguous()
        if row_rot is not None:
            # Cov(X_l R_l, Y) = R_lᵀ C_l: rotate the row side by transposing the block.
            crt, m2r = rotated_block(c_block.T.contiguous(), row_cov, row_rot)
            base = crt * inv_c[:, None] * inv_std(m2r, n)[None, :]  # [Nb, R]
            out["col_base"] = row_max(base, 1, dim=1)[0][:, 0]
    if want_rho:
        out["rho"] = rho.to(torch.float16)
    return out


def combine_topk(vals: list[torch.Tensor], idxs: list[torch.Tensor], k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-block top-k lists ``[N, k_i]`` (indices already global) into one top-k.

    Ties keep the earlier block (stable order), so the result does not depend on timing.
    """
    v = torch.cat(vals, dim=1)
    i = torch.cat(idxs, dim=1)
    filled = torch.nan_to_num(v, nan=float("-inf"))
    order = torch.sort(filled, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(v, 1, order), torch.gather(i, 1, order)
