"""CPU accumulate throughput against a plain fp32 GEMM of the same shape, side by side in one run:

- *per block*: ``CoMoments.update_shifted`` as the engine calls it for each co-moment block of
  a fold: the shifted rows and their float64 column sums are made once per model and fold and
  shared by every block of that model, the product goes into one reused float32 workspace;
- *engine fold*: one whole fold as the engine runs it for five models, reference vs rest
  (``engine._fold`` without the layer covariances): every model shifted and summed once, then
  the four pair blocks, against the four plain GEMMs;
- *whole update*: ``CoMoments.update(x, y)``, which also shifts and sums both sides (what a
  run with a single block pays);
- *previous*: the update before issue 15 (two float64 passes per fold: ``C += xsᵀys`` then
  the rank-2 ``addmm_``; float64 chunk sums).

Run:

    python benchmarks/accumulate_cpu.py [--threads 1]

Timed in this thread's CPU seconds (``time.thread_time``, one torch thread by default): on a
shared machine wall time mostly measures the neighbours. Best of ``--repeat`` interleaved runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from unineurons.accumulators.comoments import SUM_ROWS, CoMoments, shift_of, shifted, sum64


def _sum64_previous(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], SUM_ROWS):
        out += x[i:i + SUM_ROWS].sum(0, dtype=torch.float64)
    return out


class PreviousCoMoments(CoMoments):
    """The update before issue 15 (kept here as the reference of the comparison)."""

    def update_shifted(self, shift_x, shift_y, xs, ys, work=None):
        nb = xs.shape[0]
        sum_x, sum_y = _sum64_previous(xs), _sum64_previous(ys)
        mx, my = shift_x + sum_x / nb, shift_y + sum_y / nb
        na = float(self.n)
        n = na + nb
        dx, dy = mx - self.mean_x, my - self.mean_y
        self.c.add_(xs.T @ ys)
        self.c.addmm_(torch.stack([-sum_x / nb, dx * (na * nb / n)], dim=1), torch.stack([sum_y, dy], dim=0))
        self.mean_x += dx * (nb / n)
        self.mean_y += dy * (nb / n)
        self.n = self.n + nb
        return self


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def cpu(f) -> float:
        t0 = time.thread_time() if args.threads == 1 else time.process_time()
        f()
        return (time.thread_time() if args.threads == 1 else time.process_time()) - t0

    cols = ("plain GEMM", "per block", "ratio", "engine fold", "ratio", "whole update", "ratio",
            "previous", "ratio", "max|ΔC|/max|C|")
    widths = (12, 11, 7, 13, 7, 14, 7, 10, 7, 17)
    print(f"{'n x d':<14}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for n, d in ((2048, 1024), (2048, 3072), (4096, 3072)):  # benchmarks/correlate.py (a)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g) + 3
        y = torch.randn(n, d, generator=g) - 1
        block, whole, prev = CoMoments(d, d), CoMoments(d, d), PreviousCoMoments(d, d)
        work = torch.empty(d * d)  # the engine's reused workspace (correlate/engine.py _PassState)
        # the engine shifts and sums each model's rows once per fold (correlate/engine.py _fold)
        # and every block of that model reuses them: a block's own cost is update_shifted
        sx, sy = shift_of(x), shift_of(y)
        xs, ys = shifted(x, sx, torch.float32), shifted(y, sy, torch.float32)
        sums = (sum64(xs), sum64(ys))
        # five models, reference vs rest: the engine's fold against its four plain GEMMs
        acts = [x, y] + [torch.randn(n, d, generator=g) * (1 + k) for k in range(3)]
        pairs = [CoMoments(d, d) for _ in acts[1:]]

        def engine_fold(acts=acts, pairs=pairs, work=work) -> None:
            sh = [shift_of(a) for a in acts]
            xs_ = [shifted(a, s_, torch.float32) for a, s_ in zip(acts, sh, strict=True)]
            su = [sum64(v) for v in xs_]
            for j, acc in enumerate(pairs, start=1):
                acc.update_shifted(sh[0], sh[j], xs_[0], xs_[j], work, (su[0], su[j]))

        def plain_fold(acts=acts) -> None:
            for a in acts[1:]:
                acts[0].T @ a

        fs = {"plain": lambda x=x, y=y: x.T @ y,
              "fold_plain": plain_fold, "fold": engine_fold,
              "block": lambda a=block, w=work, s=sums, sx=sx, sy=sy, xs=xs, ys=ys:
                  a.update_shifted(sx, sy, xs, ys, w, s),
              "whole": lambda x=x, y=y, a=whole, w=work: a.update(x, y, w),
              "prev": lambda x=x, y=y, a=prev: a.update(x, y)}
        best = dict.fromkeys(fs, float("inf"))
        for _ in range(args.repeat):
            for k, f in fs.items():
                best[k] = min(best[k], cpu(f))
        diff = float((whole.c - prev.c).abs().max() / prev.c.abs().max())
        print(f"{n} x {d:<7}{best['plain'] * 1e3:>10.0f}ms{best['block'] * 1e3:>9.0f}ms"
              f"{best['plain'] / best['block']:>7.2f}{best['fold'] * 1e3:>11.0f}ms"
              f"{best['fold_plain'] / best['fold']:>7.2f}{best['whole'] * 1e3:>12.0f}ms"
              f"{best['plain'] / best['whole']:>7.2f}{best['prev'] * 1e3:>8.0f}ms"
              f"{best['plain'] / best['prev']:>7.2f}{diff:>17.1e}")

if __name__ == "__main__":
    main()
