"""Benchmark of the correlate stage. One command, one table:

    python benchmarks/correlate.py [--models DIR DIR ...] [--tokens DIR] [--n-tokens N]

Without ``--models`` it builds what it needs in a temp folder: a stdlib tokenizer, a token
store and five random GPT-2s of the zoo's ``tiny`` shape (2 layers, d_model 128, d_mlp 512).

(a) accumulate: one block's per-fold co-moment update as the engine runs it (one GEMM into a
    reused float32 workspace + one float64 merge; the shift and column sums are made once per
    model and fold, shared by its blocks) against a plain fp32 GEMM of the same shapes, both
    measured here, now: ratio = plain / ours; also the whole update (shift and sums included).
(b) whole run: ``run_correlate`` against the forward passes alone on the same tokens, and
    against forward passes + the bare GEMMs the statistics need (the roofline of any method).
(c) anchor: the authors' algorithm (every pair run separately; per-layer-pair fp32 products
    and sums added into float64 host arrays every batch; ρ from Σxy − ΣxΣy/n) against ours;
    then on the same outputs: per pair one pass for ρ and one for the rotated baseline, each
    running both models (all pairs: one ρ pass per unordered pair, a baseline pass per
    direction), for reference vs rest and for all pairs, against ours
    (one pass, each model once per batch, analytic baseline) with --pairs reference / all.
(d) scaling: the same run on 1x, 2x, 4x ``--scale-tokens`` tokens (models loaded once); the
    ratio to 1x should be 1, 2, 4 (fixed costs: planning, rotations, the tables).
(e) Ray: ``--backend ray`` with 1 and 2 local workers (one thread each) on ``--n-tokens``,
    against the local run of (b) (all threads); each Ray run includes starting its actors.
(f) memory: peak RSS growth of a run in a fresh process (after the imports) against the
    plan's peak (weights, batch buffers, forward working memory, accumulators and the working
    copies of summarising a block), for one pass and for several.
(g) bf16: max |ρ_dtype - ρ_float64| over every neuron pair (and over each neuron's max ρ)
    when each fold's cross product is computed in bfloat16 (on CPU: bf16 output; as on CUDA:
    bf16 inputs with fp32 accumulation and output), on activations of two trained ``tiny``
    seeds (``--train-steps``; 0: the random ones) and on synthetic data with the structure of
    MLP activations; and the end-to-end difference of the tables (bfloat16 run vs float64 run).

Timings on a shared machine are noisy: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unineurons.accumulators.comoments import CoMoments, LayerCov, shift_of, shifted, sum64
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
    """One fold of ``n`` rows, ``d`` neurons a side: a plain fp32 GEMM against one block's
    update as the engine runs it (``update_shifted`` with the per-model shift and column sums
    made once per fold and a reused workspace) and against the whole ``update`` (which also
    shifts and sums both sides)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) + 3
    y = torch.randn(n, d, generator=g) - 1
    acc, whole = CoMoments(d, d), CoMoments(d, d)
    work = torch.empty(d * d)
    sx, sy = shift_of(x), shift_of(y)
    xs, ys = shifted(x, sx, torch.float32), shifted(y, sy, torch.float32)
    sums = (sum64(xs), sum64(ys))
    plain = _best(lambda: x.T @ y)
    ours = _best(lambda: acc.update_shifted(sx, sy, xs, ys, work, sums))
    full = _best(lambda: whole.update(x, y, work))
    return {"plain_s": plain, "ours_s": ours, "ratio": plain / ours, "whole_s": full,
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


def _anchor_pass(ref, other, store, n_tokens, batch_size, rot: list | None) -> np.ndarray:
    """One anchor pass over the tokens for one pair, running both models: per-layer-pair fp32
    products and sums added into float64 host arrays every batch; ρ from Σxy − ΣxΣy/n; each
    of ref's neurons' max over the partner. ``rot``: the partner's activations rotated per
    layer first (the anchor's random-rotation baseline, a pass of its own)."""
    L, d = ref.adapter.n_layers, ref.adapter.d_mlp
    sxy = np.zeros((L, L, d, d))
    sx, sy, sxx, syy, n = np.zeros((L, d)), np.zeros((L, d)), np.zeros((L, d)), np.zeros((L, d)), 0
    for b in activation_stream([ref, other], store.contexts(n_tokens), store.manifest["tokenizer"],
                               batch_size=batch_size):
        xa = b.acts[0].reshape(-1, L, d)
        xb = b.acts[1].reshape(-1, L, d)
        if rot is not None:
            xb = torch.stack([xb[:, lb] @ rot[lb] for lb in range(L)], 1)
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
    return rho.max(axis=(1, 3))


def anchor(models, store, n_tokens, batch_size, pairs: str = "reference", baseline: bool = False,
           cpu: bool = False) -> float:
    """The anchor's algorithm: each ordered pair separately (``reference``: model 0 against
    each other; ``all``: every model against every other), one pass for ρ and, with
    ``baseline``, one more for the rotated partner, each pass running both models. Wall
    seconds, or with ``cpu`` this process's CPU seconds (all threads; on a shared machine they
    do not count waiting for a core)."""
    from unineurons.correlate.rotation import random_orthogonal

    t0, c0 = time.perf_counter(), time.process_time()
    n_models = len(models)
    # ρ of an unordered pair serves both directions (max over rows and over columns); each
    # direction's baseline rotates the partner: a pass of its own
    rho_pairs = [(0, j) for j in range(1, n_models)] if pairs == "reference" else \
        [(i, j) for i in range(n_models) for j in range(i + 1, n_models)]
    base_pairs = [(0, j) for j in range(1, n_models)] if pairs == "reference" else \
        [(i, j) for i in range(n_models) for j in range(n_models) if i != j]
    L, d = models[0].adapter.n_layers, models[0].adapter.d_mlp
    for i, j in rho_pairs:
        _anchor_pass(models[i], models[j], store, n_tokens, batch_size, None)
    for i, j in base_pairs if baseline else ():
        g = torch.Generator().manual_seed(j)
        _anchor_pass(models[i], models[j], store, n_tokens, batch_size,
                     [random_orthogonal(d, g).float() for _ in range(L)])
    return time.process_time() - c0 if cpu else time.perf_counter() - t0


def bench_scaling(paths, models, tokens, base: int, batch_size: int, tmp: Path) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of the same run on base, 2 x base and 4 x base tokens (models loaded
    once). CPU time (this process, all threads) does not count waiting for a busy core."""
    times = []
    for k in (1, 2, 4):
        t0, c0 = time.perf_counter(), time.process_time()
        run_correlate(CorrelateConfig(models=paths, tokens=tokens, n_tokens=k * base, batch_size=batch_size,
                                      checkpoint_tokens=10**12), tmp / f"scale{k}", models=models)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def bench_ray(paths, models, tokens, n_tokens: int, batch_size: int, tmp: Path
              ) -> dict[int, tuple[float, float, float]] | None:
    """(wall seconds, workers' CPU seconds, workers' busy wall seconds) of the Ray backend
    with 1 and 2 local workers; None without Ray. Busy wall well above CPU: waiting for cores."""
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = {}
        for w in (1, 2):
            t0 = time.perf_counter()
            run_correlate(CorrelateConfig(models=paths, tokens=tokens, n_tokens=n_tokens, batch_size=batch_size,
                                          checkpoint_tokens=10**12, backend="ray", workers=w),
                          tmp / f"ray{w}", models=models)
            wall = time.perf_counter() - t0
            stats = json.loads((tmp / f"ray{w}" / "manifest.json").read_text())["correlate_ray"]["passes"]
            out[w] = (wall, sum(p["worker_cpu_seconds"] for p in stats.values()),
                      sum(p["worker_seconds"] for p in stats.values()))
        return out
    finally:
        ray.shutdown()


# The peak is VmHWM, the high-water mark of this process's own memory map: ru_maxrss would
# carry over the parent's RSS (Linux keeps it across fork + exec).
_MEMORY_RUN = """
import json, os, sys
import transformers, unineurons.stream, unineurons.correlate.summarize  # imports are not the run's memory
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: F401
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.progress import set_quiet
set_quiet(True)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
res = run_correlate(CorrelateConfig(**json.loads(sys.argv[1])), sys.argv[2])
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"growth": peak - base, "planned": res.plan.peak_bytes, "passes": len(res.plan.passes),
                  "pass_max": max(res.plan.pass_bytes), "work_max": max(res.plan.work_bytes),
                  "persistent": res.plan.persistent_bytes, "stream": res.plan.stream_bytes}))
"""


def bench_memory(cfg: dict, out: Path) -> dict:
    """Peak RSS growth of one run in a fresh process, and its plan."""
    r = subprocess.run([sys.executable, "-c", _MEMORY_RUN, json.dumps(cfg), str(out)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _train_pair(tmp: Path, tok: Path, steps: int) -> list[str]:
    """Two ``tiny`` zoo seeds trained for ``steps`` on a stdlib train split."""
    from unineurons.tokens import build_token_store
    from unineurons.zoo.run import train_zoo, zoo_checkpoints

    build_token_store("stdlib", str(tok), 128, 400_000, tmp / "train_tokens", split="train")
    zoo = train_zoo(tmp / "train_tokens", tmp / "zoo", preset="tiny", seeds=(0, 1), steps=steps,
                    checkpoints=(steps,), workers=2)
    ck = zoo_checkpoints(zoo)
    return [str(ck[s][steps]) for s in (0, 1)]


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (10 mantissa bits), as tensor cores read it."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & -0x2000).view(torch.float32)


#: (name, compute dtype, how the shifted rows are rounded before an fp32 GEMM, or None)
MODES = (("float32", torch.float32, None),
         ("bfloat16 (CPU)", torch.bfloat16, None),
         ("bf16 in, fp32 acc (CUDA)", torch.bfloat16, lambda t: t.float()),
         ("tf32 (CUDA)", torch.float32, _round_tf32))


def rho_errors(x: torch.Tensor, y: torch.Tensor, n_layers: int, fold: int = 8192) -> dict[str, tuple]:
    """max |Δρ| over all pairs and max |Δ max_j ρ_ij| over rows, against exact float64, for
    the products in float32, bfloat16 (CPU: bf16 output), bf16 inputs with fp32 accumulation
    (what the CUDA path computes) and tf32 inputs (CUDA ``--dtype tf32``), the last two
    emulated on CPU; ``fold`` rows at a time, as the engine folds."""
    xd, yd = x.double(), y.double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)  # [n, da], [n, db]
    sx, sy = xc.norm(dim=0), yc.norm(dim=0)
    ok_x, ok_y = sx > 1e-8 * sx.max(), sy > 1e-8 * sy.max()
    ref = (xc.T @ yc) / torch.outer(sx, sy)  # [da, db] exact ρ
    ref = ref[ok_x][:, ok_y]
    out = {}
    for name, dtype, rounding in MODES:
        co = CoMoments(x.shape[1], y.shape[1], compute_dtype=dtype)
        lx = LayerCov(n_layers, x.shape[1] // n_layers, compute_dtype=dtype)
        ly = LayerCov(n_layers, y.shape[1] // n_layers, compute_dtype=dtype)
        for a in range(0, x.shape[0], fold):
            xb, yb = x[a:a + fold], y[a:a + fold]
            s_x, s_y = shift_of(xb), shift_of(yb)
            xs, ys = shifted(xb, s_x, dtype), shifted(yb, s_y, dtype)
            if rounding is not None:  # rounded inputs, products and sums in fp32
                xs, ys = rounding(xs), rounding(ys)
            co.update_shifted(s_x, s_y, xs, ys)
            lx.update_shifted(s_x, xs)
            ly.update_shifted(s_y, ys)
        rho = co.c / torch.outer(lx.m2().sqrt(), ly.m2().sqrt())
        rho = rho[ok_x][:, ok_y]
        out[name] = (float((rho - ref).abs().max()), float((rho.amax(1) - ref.amax(1)).abs().max()))
    return out


def synthetic_acts(n: int = 32768, d: int = 1024, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n, d] "models" with the structure of MLP activations: GELU of a shared low-rank
    signal plus noise, mostly-negative biases (sparse, heavy-tailed outputs), scales over two
    orders of magnitude; 10% of y's neurons are noisy copies of x's (ρ from 0.6 to 0.99999)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)  # shared latent features
    spec = torch.logspace(0, -1.5, k)[None, :]  # decaying feature variances

    def model(w_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(k, d, generator=g) * spec.T / k**0.5 * w_scale
        pre = z @ w + 0.3 * torch.randn(n, d, generator=g) - 1.0 + 0.5 * torch.randn(d, generator=g)
        scale = torch.exp(torch.empty(d).uniform_(-2.3, 2.3, generator=g))  # 0.1 .. 10
        return pre, scale

    px, cx = model(3.0)
    py, cy = model(3.0)
    m = d // 10
    noise = torch.logspace(-3, 0, m)[None, :]  # copies from ρ ~0.99999 down to ~0.6
    py[:, :m] = px[:, :m] + noise * torch.randn(n, m, generator=g) * px[:, :m].std(0)
    gelu = torch.nn.functional.gelu
    return gelu(px) * cx, gelu(py) * cy


def table_errors(paths: list[str], tokens: str, n_tokens: int, tmp: Path) -> dict[str, float]:
    """max |Δ| of the neurons table columns, bfloat16 run against float64 run."""
    import pandas as pd

    runs = {}
    for dt in ("float64", "bfloat16"):
        run_correlate(CorrelateConfig(models=paths, tokens=tokens, n_tokens=n_tokens, dtype=dt,
                                      checkpoint_tokens=10**12), tmp / f"e2e_{dt}")
        runs[dt] = pd.read_parquet(tmp / f"e2e_{dt}" / "neurons.parquet")
    a, b = runs["float64"], runs["bfloat16"]
    out = {c: float((a[c] - b[c]).abs().max()) for c in ("max_corr", "baseline_corr", "excess_corr")}
    out["universal_flips"] = int((a.is_universal != b.is_universal).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--tokens")
    ap.add_argument("--n-tokens", type=int, default=65_536)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--scale-tokens", type=int, default=16_384, help="(d): 1x of 1x/2x/4x (4x <= the store)")
    ap.add_argument("--train-steps", type=int, default=150, help="(g): steps of the two trained seeds; 0: none")
    ap.add_argument("--skip", default="", help="comma-separated sections among a-g to skip, e.g. c,e")
    ap.add_argument("--threads", type=int, default=0, help=(
        "torch threads (0: torch's default). 1 makes CPU seconds comparable on a busy machine: "
        "with more threads than free cores, CPU time also counts threads spinning for a core"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    set_quiet(True)
    tmp = Path(tempfile.mkdtemp(prefix="unineurons_bench_"))
    try:
        paths, tokens = (args.models, args.tokens) if args.models else _setup(tmp, args.n_tokens)
        store = TokenStore.open(tokens)
        models = [load_model(p) for p in paths]
        N = models[0].adapter.n_layers * models[0].adapter.d_mlp
        rows = []
        for n, d in ((2048, N), (2048, 3072), (4096, 3072)) if "a" not in skip else ():
            r = bench_accumulate(n, d)
            rows.append((f"(a) accumulate n={n} d={d}, per block",
                         f"{r['ours_s'] * 1e3:.1f} ms (whole update {r['whole_s'] * 1e3:.1f} ms, "
                         f"{r['plain_s'] / r['whole_s']:.2f})",
                         f"plain fp32 GEMM {r['plain_s'] * 1e3:.1f} ms ({r['gflops_plain']:.0f} GFLOP/s)",
                         f"{r['ratio']:.2f}"))
        tok = store.n_contexts_for(args.n_tokens) * store.ctx
        ours = ours_cpu = float("nan")  # (e) compares with (b)
        if "b" not in skip:
            fwd = forward_only(models, store, args.n_tokens, args.batch_size)
            roof = gemm_roofline(models, store, args.n_tokens, args.batch_size)
            t0, c0 = time.perf_counter(), time.process_time()
            run_correlate(CorrelateConfig(models=paths, tokens=tokens, n_tokens=args.n_tokens,
                                          batch_size=args.batch_size, checkpoint_tokens=10**12), tmp / "run")
            ours, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
            anc = anchor(models, store, args.n_tokens, args.batch_size) if "c" not in skip else float("nan")
            if "c" not in skip:  # the same outputs: ρ and the rotated baseline, both pair modes
                # CPU seconds: on a shared machine wall time mostly measures the neighbours
                anc_ref = anchor(models, store, args.n_tokens, args.batch_size, "reference", True, cpu=True)
                anc_all = anchor(models, store, args.n_tokens, args.batch_size, "all", True, cpu=True)
                # ours with exactly the anchor's outputs (ρ, max ρ and the rotation baseline per
                # neuron): no ceiling, no calibrated null, no layer similarity / matching
                same = dict(ceiling=False, null_rotations=0, similarity=False)
                ours_ref, ours_all = {}, {}
                for name, extra in (("same", same), ("full", {})):
                    for pairs, into in (("reference", ours_ref), ("all", ours_all)):
                        c0 = time.process_time()
                        run_correlate(CorrelateConfig(models=paths, tokens=tokens, n_tokens=args.n_tokens,
                                                      pairs=pairs, batch_size=args.batch_size,
                                                      checkpoint_tokens=10**12, **extra),
                                      tmp / f"run_{pairs}_{name}", models=models)
                        into[name] = time.process_time() - c0
            rows.append(("(b) correlate run, 5 models", f"{ours:.2f} s ({tok / ours:,.0f} tok/s)",
                         f"forward passes alone {fwd:.2f} s", f"{ours / fwd:.2f}x"))
            rows.append(("(b) vs forward + needed GEMMs", f"{ours:.2f} s", f"roofline {roof:.2f} s",
                         f"{ours / roof:.2f}x"))
            rows.append(("(c) anchor algorithm, 4 pairs", f"{anc:.2f} s (no baseline, no ceiling)",
                         f"ours {ours:.2f} s (with baseline + ceiling)", f"{anc / ours:.2f}x faster"))
            if "c" not in skip:
                n_m = len(models)
                for mode, anc_t, ours_t, passes in (
                        ("ref vs rest", anc_ref, ours_ref, f"{n_m - 1} ρ + {n_m - 1} baseline passes"),
                        ("all pairs", anc_all, ours_all,
                         f"{n_m * (n_m - 1) // 2} ρ + {n_m * (n_m - 1)} baseline passes")):
                    rows.append((f"(c) anchor, {mode}: {passes}", f"CPU {anc_t:.2f} s",
                                 f"ours, same outputs, CPU {ours_t['same']:.2f} s (one pass: ρ + baseline)",
                                 f"{anc_t / ours_t['same']:.2f}x faster"))
                    rows.append((f"(c) anchor, {mode}, against ours with every default", f"CPU {anc_t:.2f} s",
                                 f"ours CPU {ours_t['full']:.2f} s (+ ceiling, calibrated null, similarity)",
                                 f"{anc_t / ours_t['full']:.2f}x faster"))
        if "d" not in skip:
            ts = bench_scaling(paths, models, tokens, args.scale_tokens, args.batch_size, tmp)
            for k, (wall, cpu) in zip((1, 2, 4), ts, strict=True):
                rows.append((f"(d) scaling: {k}x {args.scale_tokens:,} tokens", f"CPU {cpu:.2f} s (wall {wall:.2f} s)",
                             f"1x: CPU {ts[0][1]:.2f} s (ideal ratio {k})",
                             f"{cpu / ts[0][1]:.2f} (wall {wall / ts[0][0]:.2f})"))
            # CPU = fixed + per_token x tokens: linear scaling means a good straight-line fit
            slope, fixed = np.polyfit([1, 2, 4], [c for _, c in ts], 1)
            worst = max(abs(fixed + slope * k - c) for k, (_, c) in zip((1, 2, 4), ts, strict=True))
            rows.append(("(d) fit CPU = fixed + k x per-1x", f"fixed {fixed:.2f} s + {slope:.2f} s per 1x",
                         f"worst residual {worst:.2f} s", f"{worst / ts[-1][1]:.1%} of 4x"))
        ray_t = bench_ray(paths, models, tokens, args.n_tokens, args.batch_size, tmp) if "e" not in skip else None
        if ray_t:
            for w in (1, 2):
                wall, cpu, busy = ray_t[w]
                rows.append((f"(e) ray, {w} worker(s), 1 thread each",
                             f"{wall:.2f} s (workers' CPU {cpu:.1f} s, busy {busy:.1f} s)",
                             f"local {ours:.2f} s (CPU {ours_cpu:.1f} s, {torch.get_num_threads()} threads)",
                             f"{wall / ours:.2f}x local"))
            rows.append(("(e) ray, 2 workers vs 1", f"{ray_t[2][0]:.2f} s", f"1 worker {ray_t[1][0]:.2f} s",
                         f"{ray_t[1][0] / ray_t[2][0]:.2f}x speed-up"))
        if "f" not in skip:
            base = dict(models=paths, tokens=tokens, n_tokens=args.scale_tokens, batch_size=args.batch_size,
                        checkpoint_tokens=10**12, accumulate_tokens=4096)
            one = bench_memory(base, tmp / "mem1")
            # half of what one pass's co-moments and working copies need: several passes
            small = one["persistent"] + one["stream"] + (one["pass_max"] + one["work_max"]) // 2
            few = bench_memory({**base, "memory_budget": str(small)}, tmp / "mem2")
            for name, m in (("default budget", one), ("small budget", few)):
                rows.append((f"(f) peak memory, {name}, {m['passes']} pass(es)", f"{m['growth'] / 1e6:,.0f} MB",
                             f"planned {m['planned'] / 1e6:,.0f} MB (stream {m['stream'] / 1e6:,.0f} MB)",
                             f"{m['growth'] / m['planned']:.2f}"))
        if "g" not in skip:
            tok_dir = Path(store.manifest["tokenizer"]["path"])
            pair = _train_pair(tmp, tok_dir, args.train_steps) if args.train_steps else paths[:2]
            what = f"tiny trained {args.train_steps} steps" if args.train_steps else "tiny random init"
            ms = [load_model(p) for p in pair]
            g_tok = min(32_768, store.n_contexts * store.ctx)
            acts = [[], []]
            for b in activation_stream(ms, store.contexts(g_tok), store.manifest["tokenizer"], batch_size=16):
                for i in range(2):
                    acts[i].append(b.acts[i])
            x, y = (torch.cat(a) for a in acts)
            L = ms[0].adapter.n_layers
            for label, errs in ((f"{what}, {x.shape[0]:,} tokens", rho_errors(x, y, L)),
                                ("synthetic 32,768 x 1024", rho_errors(*synthetic_acts(), 1))):
                f32 = errs["float32"]
                for mode, _, _ in MODES[1:]:
                    e = errs[mode]
                    rows.append((f"(g) {mode} max|Δρ|, {label}", f"{e[0]:.2e} (max ρ per neuron {e[1]:.2e})",
                                 f"float32 {f32[0]:.2e} ({f32[1]:.2e})", f"{e[0] / max(f32[0], 1e-300):,.0f}x"))
            te = table_errors(pair, tokens, g_tok, tmp)
            rows.append((f"(g) bfloat16 run vs float64 run, {what}",
                         f"max|Δ| max_corr {te['max_corr']:.1e}, baseline {te['baseline_corr']:.1e}, "
                         f"excess {te['excess_corr']:.1e}", f"is_universal flips: {te['universal_flips']}", "-"))
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
