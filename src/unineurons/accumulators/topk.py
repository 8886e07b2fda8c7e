"""Top-k activating tokens per neuron, streamed and mergeable.

Each neuron keeps its ``k`` largest ``(value, row, position)`` triples. Ties are broken by
``(value desc, row asc, position asc)``, a total order on distinct tokens, so the kept set and
its order never depend on how the tokens were split into batches or in which order states are
merged. :func:`context_windows` cuts the token windows around the kept positions for the top
contexts table.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import register

__all__ = ["TopK", "context_windows"]

#: rows are combined with positions into one int64 key ``row * _POS_SPAN + position``.
_POS_SPAN = 1 << 24


def _example(seed: int):
    g = torch.Generator().manual_seed(seed)
    d, k = 4, 3
    batches, row0 = [], 0
    for n_rows in (3, 1, 5, 2, 4, 2):
        t = 6
        # a coarse grid of values makes ties common, as repeated contexts do in real data
        x = torch.randint(0, 4, (n_rows * t, d), generator=g).double()
        rows = torch.arange(row0, row0 + n_rows).repeat_interleave(t)
        pos = torch.arange(t).repeat(n_rows)
        batches.append((x, rows, pos))
        row0 += n_rows
    return (lambda: TopK(d, k)), batches


def _lexsort_top(values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first ``k`` of ``[m, d]`` candidates per column in (value desc, row, pos) order."""
    key = rows * _POS_SPAN + pos  # [m, d]; padding (-1, -1) sorts like any other key
    order = torch.argsort(key, dim=0, stable=True)
    values, key = values.gather(0, order), key.gather(0, order)
    order = torch.argsort(values, dim=0, descending=True, stable=True)[:k]  # [k, d]
    values, key = values.gather(0, order), key.gather(0, order)
    rows = torch.div(key, _POS_SPAN, rounding_mode="floor")
    pos = key - rows * _POS_SPAN
    pad = key < 0  # only unfilled slots (row -1) have negative keys
    return values, rows.masked_fill(pad, -1), pos.masked_fill(pad, -1)


@register(_example)
class TopK:
    """The ``k`` largest values of each of ``d`` columns, with the (row, position) they came from.

    Unfilled slots (fewer than ``k`` tokens seen) hold value ``-inf`` and row/position ``-1``.
    """

    def __init__(self, d: int, k: int = 10, device: str | torch.device = "cpu"):
        if k < 1:
            raise ValueError(f"TopK needs k >= 1, got {k}")
        self.d, self.k = d, k
        self.values = torch.full((k, d), float("-inf"), dtype=torch.float64, device=device)
        self.rows = torch.full((k, d), -1, dtype=torch.int64, device=device)
        self.positions = torch.full((k, d), -1, dtype=torch.int64, device=device)

    def update(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> TopK:
        """Fold ``x [n, d]`` in; ``rows [n]`` and ``positions [n]`` locate each token.

        Within a batch rows are expected in (row, position) order, as the stream yields them;
        any order is accepted, the result is the same.
        """
        n = x.shape[0]
        if n == 0:
            return self
        dev = self.values.device
        x = x.to(dev)  # selection in the input dtype: no [n, d] float64 copy; widening is exact
        rows, positions = rows.to(dev, torch.int64), positions.to(dev, torch.int64)
        kk = min(self.k, n)
        vals, idx = torch.topk(x, kk, dim=0)  # [kk, d]
        # topk breaks ties arbitrarily; only columns whose k-th value is shared with tokens left
        # out are ambiguous, and those are redone with a full sort in (row, position) order.
        kth = vals[-1]  # [d]
        n_eq = (x == kth).sum(0)  # [d]
        n_eq_kept = (vals == kth).sum(0)
        ambiguous = (n_eq > n_eq_kept).nonzero().squeeze(1)
        if ambiguous.numel():
            sub = x[:, ambiguous]  # [n, a]
            key = rows * _POS_SPAN + positions  # [n]
            by_key = torch.argsort(key, stable=True)
            sv, si = torch.sort(sub[by_key], dim=0, descending=True, stable=True)
            vals[:, ambiguous] = sv[:kk]
            idx[:, ambiguous] = by_key[si[:kk]]
        cand_v = torch.cat([self.values, vals.to(torch.float64)])  # [k + kk, d]
        cand_r = torch.cat([self.rows, rows[idx]])
        cand_p = torch.cat([self.positions, positions[idx]])
        self.values, self.rows, self.positions = _lexsort_top(cand_v, cand_r, cand_p, self.k)
        return self

    def merge(self, other: TopK) -> TopK:
        if other.k != self.k or other.d != self.d:
            raise ValueError(f"cannot merge TopK(d={other.d}, k={other.k}) into "
                             f"TopK(d={self.d}, k={self.k})")
        dev = self.values.device
        self.values, self.rows, self.positions = _lexsort_top(
            torch.cat([self.values, other.values.to(dev)]),
            torch.cat([self.rows, other.rows.to(dev)]),
            torch.cat([self.positions, other.positions.to(dev)]), self.k)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "rows": self.rows, "positions": self.positions}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> TopK:
        dev = self.values.device
        self.values = state["values"].to(dev, torch.float64).clone()
        self.rows = state["rows"].to(dev, torch.int64).clone()
        self.positions = state["positions"].to(dev, torch.int64).clone()
        self.k, self.d = int(self.values.shape[0]), int(self.values.shape[1])
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """``values``, ``rows``, ``positions``: each ``[k, d]``, rank 0 = largest."""
        return {"values": self.values.clone(), "rows": self.rows.clone(),
                "positions": self.positions.clone()}


def context_windows(contexts: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                    before: int = 24, after: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids of ``contexts[row]`` from ``position - before`` through ``position + after``.

    Windows are clipped to the context, so they can be shorter near its ends. Returns the list of
    windows (int64 arrays) and ``starts [m]``: the context position of each window's first token
    (the activating token sits at index ``position - start`` of its window).
    """
    rows = np.asarray(rows, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    ctx = contexts.shape[1]
    starts = np.clip(positions - before, 0, ctx)
    ends = np.clip(positions + after + 1, 0, ctx)
    # read each needed context once from the (memory-mapped) store, in row order
    uniq, inv = np.unique(rows, return_inverse=True)
    block = np.asarray(contexts[uniq]).astype(np.int64)  # [u, ctx]
    windows = [block[i, s:e] for i, s, e in zip(inv, starts, ends, strict=True)]
    return windows, starts
