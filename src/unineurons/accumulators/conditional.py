"""Feature-conditional moments (variance reduction) and position statistics, mergeable.

:class:`ConditionalMoments` keeps, per binary token feature ``f`` and neuron ``j``, the count,
mean and centred sum of squares of the activations on the tokens where ``y_f = 1``, and the same
overall. The *variance reduction* of Gurnee et al. follows exactly from these:

    VR = 1 - [(1-β)·Var(v | y=0) + β·Var(v | y=1)] / Var(v)  =  n₁·n·(m₁ - m)² / (n₀ · M2)

(the share of the variance explained by the feature: the between-group sum of squares over
the total one). Groups merge with Chan et al.'s pairwise formula in float64.

:class:`PositionStats` counts tokens and firings per context position, giving the mutual
information between "the neuron fires" and the position.
"""

from __future__ import annotations

import torch

from .base import register
from .moments import constant_columns

__all__ = ["ConditionalMoments", "PositionStats", "binary_entropy_bits"]


def _cond_example(seed: int):
    g = torch.Generator().manual_seed(seed)
    n_feat, d = 3, 4
    batches = []
    for i, n in enumerate((9, 1, 12, 5, 7, 3)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 50
        # odd batches: a partition given as labels (-1: no feature); even: overlapping
        # features given as a bool matrix
        y = (torch.randint(-1, n_feat, (n,), generator=g) if i % 2
             else torch.rand(n, n_feat, generator=g) < 0.4)
        batches.append((x, y))
    # block 3 < d: updates go through several neuron blocks
    return (lambda: ConditionalMoments(n_feat, d, block=3)), batches


@register(_cond_example)
class ConditionalMoments:
    """Moments of ``x [n, d]`` on the tokens where each of ``n_features`` features holds."""

    def __init__(self, n_features: int, d: int, device: str | torch.device = "cpu",
                 block: int = 4096):
        self.n_features, self.d = n_features, d
        #: neurons per block of a batch update: bounds the float64 temporaries to ~4·n·block
        self.block = block
        f64 = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **f64)
        self.mean = torch.zeros(d, **f64)
        self.m2 = torch.zeros(d, **f64)
        self.n1 = torch.zeros(n_features, **f64)
        self.mean1 = torch.zeros(n_features, d, **f64)
        self.m2_1 = torch.zeros(n_features, d, **f64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> ConditionalMoments:
        """Fold ``x [n, d]`` in with the features of its tokens.

        ``y`` is either a bool ``[n, n_features]`` (any features may hold together) or an int
        ``[n]`` label per token in ``[-1, n_features)`` (-1: none), the cheap form of a
        partition such as "the token is t" (O(n·d) instead of O(n·n_features·d)).
        """
        n, F = x.shape[0], self.n_features
        if n == 0:
            return self
        dev = self.mean.device
        y = y.to(dev)
        if y.dtype == torch.bool:
            if y.shape != (n, F):
                raise ValueError(f"features y must be [{n}, {F}], got {tuple(y.shape)}")
            ind = y.to(torch.float64).T.contiguous()  # [F, n] indicator matrix
            cnt = ind.sum(1)  # [F]
        else:
            if y.shape != (n,):
                raise ValueError(f"labels y must be [{n}], got {tuple(y.shape)}")
            keep = (y >= 0).nonzero().squeeze(1)  # [m] rows with a feature
            lab = y[keep].long()
            cnt = torch.bincount(lab, minlength=F).to(torch.float64)[:F]
            # one-hot [F, n] as a sparse matrix: it beats index_add_ on a busy multi-core CPU
            # (no per-row atomics or thread syncs) and costs O(n·d) like it
            ind = torch.sparse_coo_tensor(
                torch.stack([lab, keep]), torch.ones(len(lab), dtype=torch.float64, device=dev),
                (F, n), check_invariants=False)
        other = ConditionalMoments(F, self.d, device=dev)
        other.n = torch.tensor(float(n), dtype=torch.float64, device=dev)
        other.n1 = cnt
        safe = cnt.clamp(min=1).unsqueeze(1)  # [F, 1]
        has = cnt.unsqueeze(1) > 0
        for c0 in range(0, self.d, self.block):
            c1 = min(c0 + self.block, self.d)
            xb = x[:, c0:c1].to(dev, torch.float64)  # [n, b]
            mu = xb.mean(0)  # [b]
            xc = xb - mu  # centred by the batch mean so sums of squares do not cancel
            xc2 = xc * xc
            both = torch.cat([xc, xc2], dim=1)  # [n, 2b]
            sq = torch.sparse.mm(ind, both) if ind.is_sparse else ind @ both  # [F, 2b]
            s, q = sq[:, :c1 - c0], sq[:, c1 - c0:]  # group sums of xc and xc^2
            other.mean[c0:c1], other.m2[c0:c1] = mu, xc2.sum(0)
            other.mean1[:, c0:c1] = mu + s / safe
            other.m2_1[:, c0:c1] = torch.where(has, q - s * s / safe, torch.zeros_like(q))
        return self.merge(other)

    @staticmethod
    def _chan(na, ma, m2a, nb, mb, m2b):
        """Pairwise (count, mean, M2) merge; counts broadcast against the means."""
        n = na + nb
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = mb - ma
        mean = ma + delta * nb / safe
        m2 = m2a + m2b + delta * delta * na * nb / safe
        return n, mean, m2

    def merge(self, other: ConditionalMoments) -> ConditionalMoments:
        if (other.n_features, other.d) != (self.n_features, self.d):
            raise ValueError("cannot merge ConditionalMoments of different shapes")
        if float(other.n) == 0:
            return self
        if float(self.n) == 0:
            return self.load_state_dict(other.state_dict())
        dev = self.mean.device
        self.n, self.mean, self.m2 = self._chan(self.n, self.mean, self.m2, other.n.to(dev),
                                                other.mean.to(dev), other.m2.to(dev))
        self.n1, self.mean1, self.m2_1 = self._chan(
            self.n1.unsqueeze(1), self.mean1, self.m2_1, other.n1.to(dev).unsqueeze(1),
            other.mean1.to(dev), other.m2_1.to(dev))
        self.n1 = self.n1.squeeze(1)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "n1": self.n1,
                "mean1": self.mean1, "m2_1": self.m2_1}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> ConditionalMoments:
        dev = self.mean.device
        for k in ("n", "mean", "m2", "n1", "mean1", "m2_1"):
            setattr(self, k, state[k].to(dev, torch.float64).clone())
        self.n_features, self.d = (int(s) for s in self.mean1.shape)
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """``vr [F, d]`` variance reduction, ``beta [F]`` share of tokens with the feature,
        ``mean1``/``var1 [F, d]`` on those tokens, ``mean``/``var [d]`` overall, ``n``, ``n1``.

        VR is 0 where it is undefined: a feature that never or always holds, a constant neuron.
        """
        n, n1 = self.n, self.n1.unsqueeze(1)  # [], [F, 1]
        n0 = n - n1
        # a constant neuron (variance within float64 rounding of its scale) has no variance to
        # explain: dividing its rounding noise would give an arbitrary VR
        safe_n = n if float(n) > 0 else torch.ones_like(n)
        varying = ~constant_columns(self.m2 / safe_n, self.mean)  # [d]
        ok = (n1 > 0) & (n0 > 0) & varying  # [F, d]
        diff = self.mean1 - self.mean
        vr = n1 * n * diff * diff / (torch.where(n0 > 0, n0, 1.0) * torch.where(
            self.m2 > 0, self.m2, torch.ones_like(self.m2)))
        vr = torch.where(ok, vr, torch.zeros_like(vr)).clamp(0.0, 1.0)
        var1 = torch.where(n1 > 0, self.m2_1 / n1.clamp(min=1),
                           torch.full_like(self.m2_1, float("nan")))
        return {"vr": vr, "beta": self.n1 / safe_n, "mean1": self.mean1.clone(), "var1": var1,
                "mean": self.mean.clone(),
                "var": torch.where(varying, self.m2 / safe_n, torch.zeros_like(self.m2)), "n": n.clone(),
                "n1": self.n1.clone()}


def _pos_example(seed: int):
    g = torch.Generator().manual_seed(seed)
    ctx, d = 6, 3
    batches = []
    for n in (10, 1, 7, 12, 4, 5):
        fires = torch.rand(n, d, generator=g) < 0.3
        pos = torch.randint(0, ctx, (n,), generator=g)
        batches.append((fires, pos))
    return (lambda: PositionStats(ctx, d)), batches


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H(p) in bits, with 0·log 0 = 0."""
    q = 1 - p
    return -(torch.where(p > 0, p * torch.log2(p.clamp(min=1e-300)), torch.zeros_like(p))
             + torch.where(q > 0, q * torch.log2(q.clamp(min=1e-300)), torch.zeros_like(q)))


@register(_pos_example)
class PositionStats:
    """Per context position: the number of tokens, and per neuron the number of firings."""

    def __init__(self, ctx: int, d: int, device: str | torch.device = "cpu"):
        self.ctx, self.d = ctx, d
        self.count = torch.zeros(ctx, dtype=torch.int64, device=device)
        self.fires = torch.zeros(ctx, d, dtype=torch.int64, device=device)

    def update(self, fires: torch.Tensor, positions: torch.Tensor) -> PositionStats:
        """Fold in ``fires [n, d]`` (bool: the neuron fires on the token) at ``positions [n]``."""
        if fires.shape[0] == 0:
            return self
        dev = self.count.device
        positions = positions.to(dev, torch.int64)
        if int(positions.max()) >= self.ctx or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.ctx})")
        self.count += torch.bincount(positions, minlength=self.ctx)
        self.fires.index_add_(0, positions, fires.to(dev, torch.int64))
        return self

    def merge(self, other: PositionStats) -> PositionStats:
        if (other.ctx, other.d) != (self.ctx, self.d):
            raise ValueError("cannot merge PositionStats of different shapes")
        self.count = self.count + other.count.to(self.count.device)
        self.fires = self.fires + other.fires.to(self.count.device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "fires": self.fires}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> PositionStats:
        dev = self.count.device
        self.count = state["count"].to(dev, torch.int64).clone()
        self.fires = state["fires"].to(dev, torch.int64).clone()
        self.ctx, self.d = (int(s) for s in self.fires.shape)
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """``mi [d]``: I(fires; position) in bits over the tokens seen; ``nmi [d]``: MI divided
        by H(fires) (the share of the firing entropy that position explains, in [0, 1]; 0 for a
        neuron that always or never fires); ``rate [ctx, d]`` firing rate per position (NaN
        where no token was seen); ``peak [d]`` the position with the highest rate; ``count``.
        """
        cnt = self.count.to(torch.float64)  # [ctx]
        n = cnt.sum()
        f = self.fires.to(torch.float64)  # [ctx, d]
        if float(n) == 0:
            nan = torch.full((self.d,), float("nan"), dtype=torch.float64, device=cnt.device)
            return {"mi": nan, "nmi": nan.clone(), "rate": f * float("nan"),
                    "peak": torch.full((self.d,), -1, dtype=torch.int64),
                    "count": self.count.clone()}
        p_pos = (cnt / n).unsqueeze(1)  # [ctx, 1]
        rate = f / cnt.clamp(min=1).unsqueeze(1)  # [ctx, d]: P(fire | position)
        p_fire = f.sum(0) / n  # [d]
        h_fire = binary_entropy_bits(p_fire)  # [d]
        h_cond = (p_pos * binary_entropy_bits(rate)).sum(0)  # [d]: H(fire | position)
        mi = (h_fire - h_cond).clamp(min=0.0)
        nmi = torch.where(h_fire > 0, mi / torch.where(h_fire > 0, h_fire, 1.0),
                          torch.zeros_like(mi))
        seen = (cnt > 0).unsqueeze(1)
        rate = torch.where(seen, rate, torch.full_like(rate, float("nan")))
        peak = torch.where(seen, rate, torch.full_like(rate, -1.0)).argmax(0)
        return {"mi": mi, "nmi": nmi.clamp(0.0, 1.0), "rate": rate, "peak": peak,
                "count": self.count.clone()}
