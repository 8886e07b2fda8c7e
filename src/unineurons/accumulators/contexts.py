"""Per-context sums: the unit of the paired bootstrap over contexts.

Predictions within one context are not independent, so an effect's uncertainty is estimated
by resampling whole contexts (:mod:`unineurons.analyses.effects`). :class:`ContextSums` keeps,
per context id, the sums of a few per-prediction values (e.g. count, loss, entropy, KL). A
context split across batches or token shards merges by adding the rows of equal ids.
"""

from __future__ import annotations

import torch

from .base import register

__all__ = ["ContextSums"]


def _example(seed: int):
    g = torch.Generator().manual_seed(seed)
    k = 3

    def batch(n: int) -> tuple:
        return torch.randint(0, 6, (n,), generator=g), torch.randn(n, k, generator=g)

    return (lambda: ContextSums(k)), [batch(n) for n in (5, 1, 8, 3, 6, 2)]


@register(_example)
class ContextSums:
    """Sums of ``k`` per-prediction values per context id, in float64.

    ``update(ids [n] int64, values [n, k])``; ``result()`` is ``(ids [m] int64 sorted unique,
    sums [m, k] float64)``. New rows wait in a list and are folded into the sorted table when
    they outgrow it, so streaming C contexts costs O(C log C) overall, not O(C^2).
    """

    def __init__(self, k: int, device: str | torch.device = "cpu"):
        self.k = k
        self.ids = torch.zeros(0, dtype=torch.int64, device=device)
        self.sums = torch.zeros(0, k, dtype=torch.float64, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0

    def _add(self, ids: torch.Tensor, sums: torch.Tensor) -> None:
        self._pending.append((ids.to(self.ids.device), sums.to(self.sums.device)))
        self._pending_rows += len(ids)
        if self._pending_rows > max(4096, len(self.ids)):
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        ids = torch.cat([self.ids] + [i for i, _ in self._pending])  # [m + new]
        sums = torch.cat([self.sums] + [s for _, s in self._pending])  # [m + new, k]
        self.ids, inv = torch.unique(ids, sorted=True, return_inverse=True)
        self.sums = torch.zeros(len(self.ids), self.k, dtype=torch.float64,
                                device=sums.device).index_add_(0, inv, sums)
        self._pending, self._pending_rows = [], 0

    def update(self, ids: torch.Tensor, values: torch.Tensor) -> ContextSums:
        """Fold in ``values [n, k]`` of rows whose contexts are ``ids [n]``."""
        u, inv = torch.unique(ids.long(), return_inverse=True)  # this batch's contexts
        self._add(u, torch.zeros(len(u), self.k, dtype=torch.float64, device=values.device)
                  .index_add_(0, inv, values.double()))
        return self

    def merge(self, other: ContextSums) -> ContextSums:
        other._fold()
        if len(other.ids):
            self._add(other.ids, other.sums)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._fold()
        return {"ctx_id": self.ids, "ctx_sums": self.sums}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> ContextSums:
        dev = self.ids.device
        self.ids = state["ctx_id"].clone().to(dev, torch.int64)
        self.sums = state["ctx_sums"].clone().to(dev, torch.float64).reshape(-1, self.k)
        self._pending, self._pending_rows = [], 0
        return self

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [m] sorted, sums [m, k])``."""
        self._fold()
        return self.ids, self.sums
