"""From co-moments to correlations: max, argmax, top-k and the rotation baseline.

Inputs are summed centred products (``C`` of :class:`~unineurons.accumulators.CoMoments`,
``c`` of :class:`~unineurons.accumulators.LayerCov`); the 1/n factors cancel in every ratio.
Neurons with zero variance get NaN correlations; a maximum over a row that has some NaN
entries ignores them, a row that is all NaN gives NaN.
"""

from __future__ import annotations

import torch

from ..progress import progress

__all__ = ["inv_std", "row_max", "block_results", "combine_topk", "ZERO_VAR"]

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


def _rotated_m2(cov_layers: torch.Tensor, rotations: list[torch.Tensor]) -> torch.Tensor:
    """``[L*d]``: the variances of the rotated units, ``diag(R_lᵀ Σ_l R_l)`` per layer."""
    out = []
    for layer in range(cov_layers.shape[0]):
        r = rotations[layer].to(cov_layers.device)
        out.append(((cov_layers[layer] @ r) * r).sum(0))
    return torch.cat(out)


def block_results(
    c_block: torch.Tensor, n: torch.Tensor, m2_rows: torch.Tensor, m2_cols: torch.Tensor,
    *, k: int = 5, col_cov: torch.Tensor | None = None, col_rot: list[torch.Tensor] | None = None,
    row_cov: torch.Tensor | None = None, row_rot: list[torch.Tensor] | None = None,
    rows_dir: bool = True, cols_dir: bool = False, want_rho: bool = False,
    d_rows: int | None = None, d_cols: int | None = None, desc: str = "max correlations",
) -> dict[str, torch.Tensor]:
    """Correlation summaries for a block of rows (whole layers of model a) x all of model b.

    ``rows_dir``: for each row, top-k partners and the baseline max (columns rotated by
    ``col_rot`` using ``col_cov``). ``cols_dir``: for each column, top-k rows of this block and
    the baseline max with the *rows* rotated (``row_rot``, ``row_cov`` of this block's layers);
    these are partial and combine across blocks with :func:`combine_topk`.

    The block is summarised in tiles of one row layer (``d_rows`` rows) by one column layer
    (``d_cols`` columns; by default a layer with a baseline, else the whole block): rotations
    act within a layer, so a
    tile holds everything its baseline needs, and the working copies are a few tiles, not a
    few blocks (``plan.WORK_TILE``). Tiles combine exactly: top-k by :func:`combine_topk`,
    maxima by ``fmax``. ``desc`` names the progress bar over the tiles.
    """
    R, Nb = c_block.shape
    # a rotation mixes the units of one layer: with a baseline, a tile is at most one layer
    dr = d_rows or (row_cov.shape[-1] if row_cov is not None else R)
    dc = d_cols or (col_cov.shape[-1] if col_cov is not None else Nb)
    dev = c_block.device
    inv_r = inv_std(m2_rows, n)  # [R]
    inv_c = inv_std(m2_cols, n)  # [Nb]
    rows_base = rows_dir and col_rot is not None
    cols_base = cols_dir and row_rot is not None
    inv_cr = inv_std(_rotated_m2(col_cov, col_rot), n) if rows_base else None  # [Nb]
    inv_rr = inv_std(_rotated_m2(row_cov, row_rot), n) if cols_base else None  # [R]
    nan = float("nan")
    row_base = torch.full((R,), nan, dtype=torch.float64, device=dev)
    col_base = torch.full((Nb,), nan, dtype=torch.float64, device=dev)
    row_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(0, R, dr)]
    col_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(0, Nb, dc)]
    rho_out = torch.empty(R, Nb, dtype=torch.float16, device=dev) if want_rho else None
    # column layers outside: a block has many of them and few row layers, so each column
    # rotation goes to the device once (a GPT-2 rotation is 75 MB)
    n_tiles = len(range(0, Nb, dc)) * len(range(0, R, dr))
    with progress(desc, n_tiles, unit="layer pairs") as bar:
        for tj, c0 in enumerate(range(0, Nb, dc)):
            cs = slice(c0, c0 + dc)
            rot_c = col_rot[tj].to(dev) if rows_base else None
            for ti, r0 in enumerate(range(0, R, dr)):
                rs = slice(r0, r0 + dr)
                tile = c_block[rs, cs]  # [dr, dc], a view
                rho = tile * inv_r[rs, None] * inv_c[None, cs]  # [dr, dc]
                if rho_out is not None:
                    rho_out[rs, cs] = rho.to(torch.float16)
                if rows_dir:
                    v, i = row_max(rho, k, dim=1)  # [dr, k]
                    row_parts[ti].append((v, torch.where(i >= 0, i + c0, i)))
                if cols_dir:
                    v, i = row_max(rho, k, dim=0)  # [k, dc]
                    col_parts[tj].append((v.T, torch.where(i >= 0, i + r0, i).T))
                del rho
                if rows_base:
                    base = (tile @ rot_c) * inv_r[rs, None] * inv_cr[None, cs]
                    row_base[rs] = torch.fmax(row_base[rs], row_max(base, 1, dim=1)[0][:, 0])
                    del base
                if cols_base:
                    # Cov(X_l R_l, Y) = R_lᵀ C_l: rotate the tile's rows (its transpose's columns)
                    base = (tile.T @ row_rot[ti].to(dev)) * inv_c[cs, None] * inv_rr[None, rs]  # [dc, dr]
                    col_base[cs] = torch.fmax(col_base[cs], row_max(base, 1, dim=1)[0][:, 0])
                    del base
                bar.advance(1)
    out: dict[str, torch.Tensor] = {}
    if rows_dir:
        tops = [combine_topk([v for v, _ in p], [i for _, i in p], k) for p in row_parts]
        out["row_topv"] = torch.cat([v for v, _ in tops])
        out["row_topi"] = torch.cat([i for _, i in tops])
        if rows_base:
            out["row_base"] = row_base
    if cols_dir:
        tops = [combine_topk([v for v, _ in p], [i for _, i in p], k) for p in col_parts]
        out["col_topv"] = torch.cat([v for v, _ in tops]).contiguous()
        out["col_topi"] = torch.cat([i for _, i in tops]).contiguous()
        if cols_base:
            out["col_base"] = col_base
    if rho_out is not None:
        out["rho"] = rho_out
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
