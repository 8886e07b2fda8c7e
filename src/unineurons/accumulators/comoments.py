"""Co-moment accumulators: the sufficient statistics of Pearson correlations.

``CoMoments`` holds, for two streams ``x [n, da]`` and ``y [n, db]``, the count, the means
and the matrix of summed centred cross products ``C = Σ (x - x̄)(y - ȳ)ᵀ`` in float64. Each
batch is centred on its *own* mean, its cross product is one matrix multiply in the compute
dtype, and batches merge with Chan et al.'s update

    C = C_a + C_b + (n_a n_b / n) (x̄_a - x̄_b)(ȳ_a - ȳ_b)ᵀ.

The naive Σxy − ΣxΣy/n form cancels catastrophically when means are large relative to the
spread (and overflows in fp16, as the anchor code did); this form does neither.

``LayerCov`` holds the same statistics for one stream against itself, per layer only
(``[L, d, d]``): the within-layer covariance that the random-rotation baseline and the
participation ratio need, and the per-neuron variances on its diagonal.
"""

from __future__ import annotations

import torch

from .base import register

__all__ = ["CoMoments", "LayerCov", "batch_matmul_dtype", "shift_of", "shifted"]


def batch_matmul_dtype(name: str) -> torch.dtype:
    """The dtype one batch's cross product is computed in."""
    return {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16,
            "float64": torch.float64}[name]


def shift_of(x: torch.Tensor) -> torch.Tensor:
    """A float64 shift close to the batch mean of ``x [n, d]`` (its float32 mean)."""
    return x.float().mean(0).to(torch.float64)


def shifted(x: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x - shift`` in ``dtype`` (float64 arithmetic only when asked for float64)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(work) - shift.to(work)).to(dtype)


#: Rows summed at a time by :func:`sum64` (the planner counts their float64 copy).
SUM_ROWS = 256


def sum64(x: torch.Tensor) -> torch.Tensor:
    """Column sums of ``x [n, d]`` in float64: each ``SUM_ROWS``-row chunk summed in its own
    dtype (float32: a relative error of a few float32 ulps of the chunk's absolute sum, below
    that of the fold's float32 GEMM), the chunks added in float64. ``sum(dtype=float64)`` of
    the whole fold would convert a float64 copy as large as the fold's rows first."""
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    wide = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    for i in range(0, x.shape[0], SUM_ROWS):
        out += x[i:i + SUM_ROWS].sum(0, dtype=wide)
    return out


def _cross(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``xsᵀ ys`` ``[da, db]`` in float32 (float64 for float64 inputs)."""
    if xs.dtype == torch.bfloat16:
        if xs.is_cuda:
            # bf16 inputs, fp32 accumulation and an fp32 output: no bf16 rounding of the sums
            return torch.mm(xs.T, ys, out_dtype=torch.float32)
        return torch.matmul(xs.T, ys).float()
    return xs.T @ ys


def _co_example(seed: int):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in (5, 1, 17, 8, 3, 11):
        z = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x = torch.cat([z, torch.randn(n, 1, generator=g, dtype=torch.float64)], 1) * 2 + 500
        y = torch.cat([z[:, :2] * -1.5, torch.randn(n, 3, generator=g, dtype=torch.float64)], 1)
        batches.append((x, y + 1e3))
    return (lambda: CoMoments(4, 5, compute_dtype=torch.float64)), batches


@register(_co_example)
class CoMoments:
    """Count, means and centred cross products of ``x [n, da]`` and ``y [n, db]``."""

    def __init__(self, da: int, db: int, device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype = torch.float32):
        self.compute_dtype = compute_dtype
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.mean_x = torch.zeros(da, dtype=torch.float64, device=device)
        self.mean_y = torch.zeros(db, dtype=torch.float64, device=device)
        self.c = torch.zeros(da, db, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor,
               work: torch.Tensor | None = None) -> CoMoments:
        """Fold in one batch of paired rows (``x [n, da]``, ``y [n, db]``); ``work``: see
        :meth:`update_shifted`."""
        if x.shape[0] == 0:
            return self
        sx, sy = shift_of(x), shift_of(y)
        return self.update_shifted(sx, sy, shifted(x, sx, self.compute_dtype),
                                   shifted(y, sy, self.compute_dtype), work)

    def update_shifted(self, shift_x: torch.Tensor, shift_y: torch.Tensor,
                       xs: torch.Tensor, ys: torch.Tensor,
                       work: torch.Tensor | None = None,
                       sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> CoMoments:
        """Fast path: ``xs = x - shift_x``, ``ys = y - shift_y`` already formed.

        The engine shifts each model's activations once per batch and reuses them for every
        pair, so each pair costs exactly one GEMM. Any shift near the batch mean works: the
        exact batch mean and co-moment follow from the column sums of the shifted values,
        ``C_b = xsᵀ ys − (Σxs)(Σys)ᵀ / n``, so no float64 copy of the batch is ever made.

        ``work``: an optional float32 workspace of at least ``da * db`` elements (contiguous,
        on C's device) that the float32 path writes the fold's product into instead of a fresh
        ``[da, db]`` allocation each fold (no block-sized allocation per fold and block; on
        CPU 0-2 % of the update's time in ``benchmarks/accumulate_cpu.py``, more where fresh
        pages are expensive); the result is bitwise the same.

        ``sums``: ``(sum64(xs), sum64(ys))`` when the caller has them already (the engine sums
        each model's shifted rows once per fold and slices them for every block). The same
        float32 chunk sums, so the same accuracy; bitwise the same as summing the slice here
        when it starts on a multiple of the SIMD width (16 floats: GPT-2's, Pythia's and
        Llama's layer widths), else different in the last float32 bit of a sum.
        """
        nb = xs.shape[0]
        if nb == 0:
            return self
        sum_x, sum_y = sums if sums is not None else (sum64(xs), sum64(ys))  # [da], [db]
        mx = shift_x + sum_x / nb
        my = shift_y + sum_y / nb
        na = float(self.n)
        n = na + nb
        dx, dy = mx - self.mean_x, my - self.mean_y
        # C += xsᵀys − sum_x sum_yᵀ / nb + (na nb / n) dx dyᵀ; the two rank-1 terms are one
        # rank-2 product
        left = torch.stack([-sum_x / nb, dx * (na * nb / n)], dim=1)  # [da, 2]
        right = torch.stack([sum_y, dy], dim=0)  # [2, db]
        if xs.dtype == torch.float32:
            # the rank-2 terms in float32 first, the GEMM adds onto them (beta = 1), then a
            # single float64 read-modify-write of C: one pass over the float64 matrix per fold,
            # not two. The rank-2 terms get a float32 rounding of their own size (relative
            # 6e-8), below the GEMM's; tests/test_comoments_fast.py bounds it against float64
            da, db = self.c.shape
            prod = (torch.mm(left.float(), right.float(), out=work[:da * db].view(da, db))
                    if work is not None else left.float().mm(right.float()))
            self.c.add_(prod.addmm_(xs.T, ys))
        elif xs.dtype == torch.bfloat16:
            # the product comes out as its own float32 matrix (fp32 accumulation on CUDA); the
            # rank-2 terms go onto it in float32 as above: one float64 pass, not two
            self.c.add_(_cross(xs, ys).addmm_(left.float(), right.float()))
        else:  # float64: everything in float64
            self.c.add_(_cross(xs, ys)).addmm_(left, right)
        self.mean_x += dx * (nb / n)
        self.mean_y += dy * (nb / n)
        self.n = self.n + nb
        return self

    def _merge_parts(self, nb: torch.Tensor, mx: torch.Tensor, my: torch.Tensor,
                     cb: torch.Tensor) -> None:
        na = self.n
        n = na + nb
        if float(na) == 0:
            self.n, self.mean_x, self.mean_y = nb.clone(), mx.clone(), my.clone()
            self.c += cb
            return
        dx = mx - self.mean_x  # [da]
        dy = my - self.mean_y  # [db]
        f = na * nb / n
        self.c.add_(cb).addr_(dx, dy, alpha=float(f))
        self.mean_x += dx * (nb / n)
        self.mean_y += dy * (nb / n)
        self.n = n

    def merge(self, other: CoMoments) -> CoMoments:
        if float(other.n) == 0:
            return self
        self._merge_parts(other.n, other.mean_x, other.mean_y, other.c)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean_x": self.mean_x, "mean_y": self.mean_y, "c": self.c}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> CoMoments:
        dev = self.c.device
        self.n = state["n"].to(dev, torch.float64).clone()
        self.mean_x = state["mean_x"].to(dev, torch.float64).clone()
        self.mean_y = state["mean_y"].to(dev, torch.float64).clone()
        self.c = state["c"].to(dev, torch.float64).clone()
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """``n``, ``mean_x``, ``mean_y`` and ``cov`` (population: C / n)."""
        return {"n": self.n.clone(), "mean_x": self.mean_x.clone(), "mean_y": self.mean_y.clone(),
                "cov": self.c / self.n}


def _layer_example(seed: int):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(n, 2 * 3, generator=g, dtype=torch.float64) * 4 + 300,)
               for n in (6, 2, 9, 1, 12, 5)]
    return (lambda: LayerCov(2, 3, compute_dtype=torch.float64)), batches


@register(_layer_example)
class LayerCov:
    """Per-layer covariance of ``x [n, L * d]`` (column ``layer * d + neuron``)."""

    def __init__(self, n_layers: int, d: int, device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype = torch.float32):
        self.n_layers, self.d = n_layers, d
        self.compute_dtype = compute_dtype
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(n_layers * d, dtype=torch.float64, device=device)
        self.c = torch.zeros(n_layers, d, d, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> LayerCov:
        if x.shape[0] == 0:
            return self
        sx = shift_of(x)
        return self.update_shifted(sx, shifted(x, sx, self.compute_dtype))

    def update_shifted(self, shift: torch.Tensor, xs: torch.Tensor,
                       sums: torch.Tensor | None = None) -> LayerCov:
        """``xs [n, L*d] = x - shift``; one batched GEMM for all layers (see CoMoments);
        ``sums``: ``sum64(xs)`` if the caller has it."""
        nb = xs.shape[0]
        if nb == 0:
            return self
        L, d = self.n_layers, self.d
        sums = sum64(xs) if sums is None else sums  # [L*d]
        m = shift + sums / nb
        na = float(self.n)
        n = na + nb
        dm = (m - self.mean).reshape(L, d)
        xl = xs.reshape(nb, L, d).transpose(0, 1)  # [L, n, d]
        cb = torch.bmm(xl.transpose(1, 2), xl)  # [L, d, d]
        if cb.dtype == torch.bfloat16:
            cb = cb.float()
        self.c.add_(cb)
        sl = sums.reshape(L, d)
        left = torch.stack([-sl / nb, dm * (na * nb / n)], dim=2)  # [L, d, 2]
        right = torch.stack([sl, dm], dim=1)  # [L, 2, d]
        self.c.baddbmm_(left, right)
        self.mean += dm.reshape(-1) * (nb / n)
        self.n = self.n + nb
        return self

    def _merge_parts(self, nb: torch.Tensor, m: torch.Tensor, cb: torch.Tensor) -> None:
        na = self.n
        n = na + nb
        if float(na) == 0:
            self.n, self.mean = nb.clone(), m.clone()
            self.c += cb
            return
        dm = (m - self.mean).reshape(self.n_layers, self.d)  # [L, d]
        f = float(na * nb / n)
        self.c.add_(cb).baddbmm_(dm.unsqueeze(2), dm.unsqueeze(1), alpha=f)
        self.mean += dm.reshape(-1) * (nb / n)
        self.n = n

    def merge(self, other: LayerCov) -> LayerCov:
        if float(other.n) == 0:
            return self
        self._merge_parts(other.n, other.mean, other.c)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n": self.n, "mean": self.mean, "c": self.c}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> LayerCov:
        dev = self.c.device
        self.n = state["n"].to(dev, torch.float64).clone()
        self.mean = state["mean"].to(dev, torch.float64).clone()
        self.c = state["c"].to(dev, torch.float64).clone()
        self.n_layers, self.d = int(self.c.shape[0]), int(self.c.shape[1])
        return self

    def m2(self) -> torch.Tensor:
        """Per-neuron summed squared deviations ``[L * d]`` (the diagonals)."""
        return torch.diagonal(self.c, dim1=1, dim2=2).reshape(-1).clone()

    def result(self) -> dict[str, torch.Tensor]:
        """``n``, ``mean [L*d]``, ``cov [L, d, d]`` (population)."""
        return {"n": self.n.clone(), "mean": self.mean.clone(), "cov": self.c / self.n}
