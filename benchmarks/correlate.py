"""Benchmark of the correlate stage. One command, one table:

    python benchmarks/correlate.py [--models DIR DIR ...] [--tokens DIR] [--n-tokens N]

Without ``--models`` it builds what it needs in a temp folder: a stdlib tokenizer, a token
store and five random GPT-2s of the zoo's ``tiny`` shape (2 layers, d_model 128, d_mlp 512).

(a) accumulate: our per-batch co-moment update (centre + one GEMM + float64 merge) against a
    plain fp32 GEMM of the same shapes, both measured here, now: ratio = plain / ours.
(b) whole run: ``run_correlate`` against the forward passes alone on the same tokens, and
    against forward passes + the bare GEMMs the statistics need (the roofline of any method).
(c) anchor: the authors' algorithm (every pair run separately; per-layer-pair fp32 products
    and sums added into float64 host arrays every batch; ρ from Σxy − ΣxΣy/n) against ours.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unineurons.accumulators.comoments import CoMoments
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.models.load import load_model
from unineurons.progress import set_quiet
from unineurons.stream import activation_stream
from unineurons.tokens import TokenStore


def _best(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_accumulate(n: int, d: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) + 3
    y = torch.randn(n, d, generator=g) - 1
    acc = CoMoments(d, d)
    plain = _best(lambda: x.T @ y)
    ours = _best(lambda: acc.update(x, y))
    return {"plain_s": plain, "ours_s": ours, "ratio": plain / ours,
            "gflops_plain": 2 * n * d * d / plain / 1e9}


def _setup(tmp: Path, n_tokens: int) -> tuple[list[str], str]:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from unineurons.tokenizer import train_tokenizer
    from unineurons.tokens import build_token_store

    tok = train_tokenizer("stdlib", 4096, tmp / "tok", max_chars=3_000_000)
    build_token_store("stdlib", str(tok), 128, n_tokens, tmp / "tokens", split="heldout")
    paths = []
    for s in range(5):
        torch.manual_seed(s)
        m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, n_inner=512, vocab_size=4096,
                                       n_positions=128, activation_function="gelu_new"))
        m.save_pretrained(tmp / f"m{s}")
        AutoTokenizer.from_pretrained(tok).save_pretrained(tmp / f"m{s}")
        paths.append(str(tmp / f"m{s}"))
    return paths, str(tmp / "tokens")


def forward_only(models, store, n_tokens, batch_size) -> float:
    t0 = time.perf_counter()
    for _ in activation_stream(models, store.contexts(n_tokens), store.manifest["tokenizer"],
                               batch_size=batch_size):
        pass
    return time.perf_counter() - t0


def gemm_roofline(models, store, n_tokens, batch_size) -> float:
    """Forward passes plus exactly the GEMMs our statistics need, with nothing else."""
    n_models = len(models)
    t0 = time.perf_counter()
    for b in activation_stream(models, store.contexts(n_tokens), store.manifest["tokenizer"],
                               batch_size=batch_size):
        a0 = b.acts[0]
        for j in range(1, n_models):
            a0.T @ b.acts[j]
        a0.T @ a0  # ceiling
        for a in b.acts:  # within-layer covariances
            L = models[0].adapter.n_layers
            al = a.reshape(a.shape[0], L, -1).transpose(0, 1)
            torch.bmm(al.transpose(1, 2), al)
    return time.perf_counter() - t0


def anchor(models, store, n_tokens, batch_size) -> float:
    """The anchor's algorithm: each pair separately; per-layer-pair host float64 sums."""
    t0 = time.perf_counter()
    ref = models[0]
    L, d = ref.adapter.n_layers, ref.adapter.d_mlp
    for other in models[1:]:
        sxy = np.zeros((L, L, d, d))
        sx, sy, sxx, syy, n = np.zeros((L, d)), np.zeros((L, d)), np.zeros((L, d)), np.zeros((L, d)), 0
        for b in activation_stream([ref, other], store.contexts(n_tokens), store.manifest["tokenizer"],
                                   batch_size=batch_size):
            xa = b.acts[0].reshape(-1, L, d)
            xb = b.acts[1].reshape(-1, L, d)
            n += xa.shape[0]
            for la in range(L):
                sx[la] += xa[:, la].sum(0).double().numpy()
                sxx[la] += (xa[:, la] ** 2).sum(0).double().numpy()
                sy[la] += xb[:, la].sum(0).double().numpy()
                syy[la] += (xb[:, la] ** 2).sum(0).double().numpy()
                for lb in range(L):
                    sxy[la, lb] += (xa[:, la].T @ xb[:, lb]).double().numpy()
        cov = sxy / n - np.einsum("ai,bj->abij", sx, sy) / n**2
        std_x = np.sqrt(sxx / n - (sx / n) ** 2)
        std_y = np.sqrt(syy / n - (sy / n) ** 2)
        rho = cov / np.einsum("ai,bj->abij", std_x, std_y)
        rho.max(axis=(1, 3))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--tokens")
    ap.add_argument("--n-tokens", type=int, default=65_536)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    set_quiet(True)
    tmp = Path(tempfile.mkdtemp(prefix="unineurons_bench_"))
    try:
        paths, tokens = (args.models, args.tokens) if args.models else _setup(tmp, args.n_tokens)
        store = TokenStore.open(tokens)
        models = [load_model(p) for p in paths]
        N = models[0].adapter.n_layers * models[0].adapter.d_mlp
        rows = []
        for n, d in ((2048, N), (2048, 3072), (4096, 3072)):
            r = bench_accumulate(n, d)
            rows.append((f"(a) accumulate n={n} d={d}", f"{r['ours_s'] * 1e3:.1f} ms",
                         f"plain fp32 GEMM {r['plain_s'] * 1e3:.1f} ms ({r['gflops_plain']:.0f} GFLOP/s)",
                         f"{r['ratio']:.2f}"))
        fwd = forward_only(models, store, args.n_tokens, args.batch_size)
        roof = gemm_roofline(models, store, args.n_tokens, args.batch_size)
        t0 = time.perf_counter()
        run_correlate(CorrelateConfig(models=paths, tokens=tokens, n_tokens=args.n_tokens,
                                      batch_size=args.batch_size, checkpoint_tokens=10**12), tmp / "run")
        ours = time.perf_counter() - t0
        anc = anchor(models, store, args.n_tokens, args.batch_size)
        tok = store.n_contexts_for(args.n_tokens) * store.ctx
        rows.append(("(b) correlate run, 5 models", f"{ours:.2f} s ({tok / ours:,.0f} tok/s)",
                     f"forward passes alone {fwd:.2f} s", f"{ours / fwd:.2f}x"))
        rows.append(("(b) vs forward + needed GEMMs", f"{ours:.2f} s", f"roofline {roof:.2f} s",
                     f"{ours / roof:.2f}x"))
        rows.append(("(c) anchor algorithm, 4 pairs", f"{anc:.2f} s (no baseline, no ceiling)",
                     f"ours {ours:.2f} s (with baseline + ceiling)", f"{anc / ours:.2f}x faster"))
        print(f"\nmodels: {len(models)} x {N} neurons; tokens: {tok:,}; threads: {torch.get_num_threads()}")
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        head = ("measure", "ours", "reference", "ratio")
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
        print("  ".join("-" * w[i] for i in range(4)))
        for r in rows:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
