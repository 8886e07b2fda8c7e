"""Exact streaming moments per column: mean, variance, skew, kurtosis, min, max, share > 0.

Central moments merge with the pairwise formulas of Chan et al. / Pébay (2008), in float64,
so the result equals the two-pass computation over all values (no histogram bins, no clipped
tails as in the anchor code).
"""

from __future__ import annotations

import torch

from .base import register

__all__ = ["Moments", "CONST_RTOL", "constant_columns"]

#: A column whose spread is at most this share of its magnitude is constant: the float64
#: rounding of its mean alone leaves a variance of about (1e-16 x value)^2, which is noise,
#: not a variance to divide by. Every dtype a neuron can have (bfloat16 .. float64) resolves
#: values far more finely apart than this (float64: 2.2e-16), so real spread is never lost.
CONST_RTOL = 1e-12


def constant_columns(var: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bool mask of columns whose variance ``var`` is rounding noise for values of magnitude
    ``scale`` (same shape; e.g. max |x| or |mean|): ``sqrt(var) <= CONST_RTOL * scale``, and
    ``var <= 0``. Statistics that divide by a variance are NaN (or undefined) there."""
    scale = scale.abs().to(var.dtype)
    return (var <= 0) | (var <= (CONST_RTOL * scale) ** 2)


def _example(seed: int):
    g = torch.Generator().manual_seed(seed)
    d = 5
    batches = [(torch.randn(n, d, generator=g) * 3 + 100,) for n in (7, 1, 13, 4, 9, 2)]
    return (lambda: Moments(d)), batches


@register(_example)
class Moments:
    """Per-column moments of ``x [n, d]`` streamed over batches."""

    def __init__(self, d: int, device: str | torch.device = "cpu"):
        self.d = d
        z = lambda: torch.zeros(d, dtype=torch.float64, device=device)  # noqa: E731
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.mean, self.m2, self.m3, self.m4 = z(), z(), z(), z()
        self.n_pos = z()
        self.min = torch.full((d,), float("inf"), dtype=torch.float64, device=device)
        self.max = torch.full((d,), float("-inf"), dtype=torch.float64, device=device)

    #: columns per block: bounds the float64 temporaries to ~n x 4096 x 8 bytes each
    BLOCK = 4096

    def update(self, x: torch.Tensor) -> Moments:
        """Fold ``x [n, d]`` in."""
        if x.shape[0] == 0:
            return self
        if x.shape[1] > self.BLOCK:
            other = Moments(self.d, device=x.device)
            parts = [Moments(min(self.BLOCK, self.d - c0), x.device).update(x[:, c0:c0 + self.BLOCK])
                     for c0 in range(0, self.d, self.BLOCK)]
            for k in ("mean", "m2", "m3", "m4", "n_pos", "min", "max"):
                setattr(other, k, torch.cat([getattr(q, k) for q in parts]))
            other.n = parts[0].n
            return self.merge(other)
        x = x.to(torch.float64)
        other = Moments(self.d, device=x.device)
        other.n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        other.mean = x.mean(0)
        c = x - other.mean  # [n, d]
        c2 = c * c
        other.m2 = c2.sum(0)
        other.m3 = (c2 * c).sum(0)
        other.m4 = (c2 * c2).sum(0)
        other.n_pos = (x > 0).sum(0).to(torch.float64)
        other.min = x.amin(0)
        other.max = x.amax(0)
        return self.merge(other)

    def merge(self, other: Moments) -> Moments:
        """Pébay's pairwise update of (n, mean, M2, M3, M4)."""
        na, nb = self.n, other.n
        if float(nb) == 0:
            return self
        if float(na) == 0:
            self.load_state_dict(other.state_dict())
            return self
        n = na + nb
        delta = other.mean - self.mean
        d2 = delta * delta
        m2 = self.m2 + other.m2 + d2 * na * nb / n
        m3 = (self.m3 + other.m3 + d2 * delta * na * nb * (na - nb) / n**2
              + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        m4 = (self.m4 + other.m4 + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / n**3
              + 6 * d2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
              + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        self.mean = self.mean + delta * nb / n
        self.m2, self.m3, self.m4, self.n = m2, m3, m4, n
        self.n_pos = self.n_pos + other.n_pos
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "m3": self.m3, "m4": self.m4,
                "n_pos": self.n_pos, "min": self.min, "max": self.max}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Moments:
        for k in ("n", "mean", "m2", "m3", "m4", "n_pos", "min", "max"):
            setattr(self, k, state[k].clone().to(torch.float64))
        self.d = int(self.mean.shape[0])
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """``mean``, ``var`` (population), ``skew`` (biased, as scipy's default), ``kurt``
        (non-excess: Gaussian = 3), ``freq`` (share > 0), ``min``, ``max``, ``n``.

        Constant columns (:func:`constant_columns`: ``min == max``, or a spread within float64
        rounding of the values' scale) get variance 0 and NaN skew and kurtosis, as scipy.
        """
        n = self.n
        var = self.m2 / n if float(n) > 0 else torch.full_like(self.m2, float("nan"))
        scale = torch.maximum(self.min.abs(), self.max.abs())
        const = constant_columns(var, scale) | (self.min == self.max)
        var = torch.where(const & (float(n) > 0), torch.zeros_like(var), var)
        with torch.no_grad():
            m2 = torch.where(const, torch.full_like(self.m2, float("nan")), self.m2)
            skew = torch.sqrt(n) * self.m3 / m2.pow(1.5)
            kurt = n * self.m4 / (m2 * m2)
        return {"n": n.clone(), "mean": self.mean.clone(), "var": var, "skew": skew, "kurt": kurt,
                "freq": self.n_pos / n if float(n) > 0 else self.n_pos * float("nan"),
                "min": self.min.clone(), "max": self.max.clone()}
