"""CPU accumulate throughput: ``CoMoments.update`` against a plain fp32 GEMM of the same shape,
as the engine runs it (the fold's product written into one reused float32 workspace), without
the workspace (a fresh product buffer each fold), and the previous update (two float64 passes
per fold: ``C += xsᵀys`` then the rank-2 ``addmm_``; float64 chunk sums), side by side in one
run:

    python benchmarks/accumulate_cpu.py [--threads 1]

Timed in this thread's CPU seconds (``time.thread_time``, one torch thread by default): on a
shared machine wall time mostly measures the neighbours. Best of ``--repeat`` interleaved runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from unineurons.accumulators.comoments import SUM_ROWS, CoMoments


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

    print(f"{'n x d':<14}{'plain GEMM':>12}{'ours':>10}{'ratio':>8}{'no workspace':>14}{'ratio':>8}"
          f"{'previous':>10}{'ratio':>8}{'max|ΔC|/max|C|':>18}")
    for n, d in ((2048, 1024), (2048, 3072), (4096, 3072)):  # benchmarks/correlate.py (a)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g) + 3
        y = torch.randn(n, d, generator=g) - 1
        ours, fresh, prev = CoMoments(d, d), CoMoments(d, d), PreviousCoMoments(d, d)
        work = torch.empty(d * d)  # the engine's reused workspace (correlate/engine.py _PassState)
        fs = {"plain": lambda x=x, y=y: x.T @ y,
              "ours": lambda x=x, y=y, a=ours, w=work: a.update(x, y, w),
              "fresh": lambda x=x, y=y, a=fresh: a.update(x, y),
              "prev": lambda x=x, y=y, a=prev: a.update(x, y)}
        best = dict.fromkeys(fs, float("inf"))
        for _ in range(args.repeat):
            for k, f in fs.items():
                best[k] = min(best[k], cpu(f))
        diff = float((ours.c - prev.c).abs().max() / prev.c.abs().max())
        print(f"{n} x {d:<7}{best['plain'] * 1e3:>10.0f}ms{best['ours'] * 1e3:>8.0f}ms"
              f"{best['plain'] / best['ours']:>8.2f}{best['fresh'] * 1e3:>12.0f}ms"
              f"{best['plain'] / best['fresh']:>8.2f}{best['prev'] * 1e3:>8.0f}ms"
              f"{best['plain'] / best['prev']:>8.2f}{diff:>18.1e}")


if __name__ == "__main__":
    main()
