"""GPU benchmark of the correlate stage. One command, one table:

    python benchmarks/gpu.py                      # on cuda, GPT-2-small shapes, ~2M tokens (< 6 min on an H200)
    python benchmarks/gpu.py --device cpu --quick # the same code on tiny shapes, in seconds (a test runs it)

Five randomly initialised models are built from ``GPT2Config()`` (no download; ``--quick``: a
2-layer GPT-2 with d_model 64) directly on the device, and a temp token store of random tokens
(uniform over the vocabulary, a BOS column first) feeds them.

(a) accumulate: our per-fold co-moment update (``CoMoments.update_shifted``: one GEMM into the
    float64 matrix plus the rank-2 mean correction) against ``torch.mm`` alone on the same
    inputs, in fp32, tf32 and bf16 (bf16: ours takes an fp32 output, ``torch.mm`` a bf16 one),
    one fold of ``accumulate`` rows against all of one model's neurons: TFLOP/s of each.
(b) whole run: ``run_correlate`` of the five models (reference vs rest, rotation baseline and
    ceiling) against the forward passes alone (``activation_stream`` over the same tokens).
(c) anchor: the authors' algorithm on the same models and tokens: per pair, per batch, both
    models forward, the full cross product on the GPU, a copy to the host and a float64 add
    into a host array, plus sums and sums of squares. Measured on the first ``--anchor-batches``
    batches of one pair and scaled to every batch of every pair (linear: each batch costs the
    same); a second pass per pair for the rotated baseline would double it (shown separately).
(d) memory: the peak of ``torch.cuda.max_memory_allocated`` during (b) against the peak of
    the plan ``unineurons plan`` prints for the same options (``estimate``); on CPU, n/a.
(e) zoo training on the device: ``zoo train --device``'s loop (``train_seed``, with and
    without its evaluations and checkpoints) against a bare PyTorch loop on the same device
    (same model, batches, fused AdamW, clip): ``benchmarks/zoo_speed.py --device``.

Timings are wall clock with a device synchronisation; on a shared CPU they are noisy: compare
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from unineurons.accumulators.comoments import CoMoments, shift_of, shifted, sum64
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.correlate.estimate import estimate
from unineurons.io import sha256_file, write_json
from unineurons.models.adapters import get_adapter
from unineurons.models.load import LoadedModel, parse_model_spec
from unineurons.progress import set_quiet
from unineurons.stream import activation_stream
from unineurons.tokens import TokenStore

#: (name, compute dtype, allow tf32)
DTYPES = (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextmanager
def _section(name: str, row):
    """Run a section; on failure print its error as a row and go on (one GPU run, all it can give)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the benchmark reports every failure and continues
        import traceback

        traceback.print_exc()
        row(f"({name}) FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", "-", "-")


def _best(fn, device: str, repeat: int = 3) -> float:
    """Fastest of ``repeat`` timed calls after one warm-up, seconds."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def gpt2_config(quick: bool):
    from transformers import GPT2Config

    if quick:
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, vocab_size=512, n_positions=64,
                          bos_token_id=511, eos_token_id=511)
    return GPT2Config()


def build_models(tmp: Path, quick: bool, device: str, n_models: int = 5) -> list[LoadedModel]:
    """``n_models`` randomly initialised GPT-2s on ``device``; each folder holds only its
    config.json (what ``unineurons plan`` reads)."""
    from transformers import GPT2LMHeadModel

    cfg = gpt2_config(quick)
    models = []
    for s in range(n_models):
        folder = tmp / f"gpt2_seed{s}"
        cfg.save_pretrained(folder)
        torch.manual_seed(s)
        with torch.device(device):
            m = GPT2LMHeadModel(cfg).eval()
        spec = parse_model_spec(str(folder))
        models.append(LoadedModel(spec=spec, model=m, adapter=get_adapter(m, spec.spec), tokenizer=None,
                                  weights_sha256=hashlib.sha256(f"random gpt2 seed {s}".encode()).hexdigest()))
    return models


def random_store(path: Path, vocab: int, ctx: int, n_tokens: int, seed: int = 0) -> TokenStore:
    """A token store of ``ceil(n_tokens / ctx)`` contexts of uniform random tokens (BOS first)."""
    rows = -(-n_tokens // ctx)
    path.mkdir(parents=True)
    bos = vocab - 1
    arr = np.random.default_rng(seed).integers(0, vocab - 1, size=(rows, ctx), dtype=np.int32)
    arr[:, 0] = bos
    np.save(path / "tokens.npy", arr)
    write_json(path / "manifest.json", {
        "format_version": 1, "kind": "tokens", "source": "random", "ctx": ctx, "n_contexts": rows,
        "n_tokens": rows * ctx, "split": "heldout", "seed": seed, "heldout_fraction": 0.0,
        "dtype": "int32", "sha256": sha256_file(path / "tokens.npy"), "n_documents": rows,
        "created_by": "benchmarks/gpu.py",
        "tokenizer": {"path": "-", "vocab_size": vocab, "vocab_sha256": None, "bos_id": bos,
                      "eos_id": bos, "pad_id": None, "newline_ids": []},
    })
    return TokenStore.open(path)


def _one_dtype(x, y, sx, sy, dtype: torch.dtype, tf32: bool, device: str) -> dict[str, float]:
    xs, ys = shifted(x, sx, dtype), shifted(y, sy, dtype)
    acc = CoMoments(x.shape[1], y.shape[1], device=device, compute_dtype=dtype)
    # as the engine: column sums once per model and fold, one reused float32 product workspace
    sums = (sum64(xs), sum64(ys))
    work = torch.empty(x.shape[1] * y.shape[1], device=device) if dtype == torch.float32 else None
    with _tf32(tf32):
        plain = _best(lambda: torch.mm(xs.T, ys), device)
        ours = _best(lambda: acc.update_shifted(sx, sy, xs, ys, work, sums), device)
    return {"plain_s": plain, "ours_s": ours}


def bench_accumulate(n: int, d: int, device: str) -> dict[str, dict]:
    """(a): seconds and TFLOP/s of our fold update and of ``torch.mm`` alone, per dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device) + 3
    y = torch.randn(n, d, generator=g, device=device) - 1
    sx, sy = shift_of(x), shift_of(y)
    flop = 2 * n * d * d
    out = {}
    for name, dtype, tf32 in DTYPES:
        out[name] = _one_dtype(x, y, sx, sy, dtype, tf32, device)
        out[name].update(plain_tflops=flop / out[name]["plain_s"] / 1e12,
                         ours_tflops=flop / out[name]["ours_s"] / 1e12)
    return out


def forward_only(models, store: TokenStore, n_tokens: int, batch_size: int, device: str) -> float:
    """(b): seconds of the activation stream of all models over the tokens, nothing else."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in activation_stream(models, store.contexts(n_tokens), store.manifest["tokenizer"],
                               batch_size=batch_size, device=device):
        pass
    _sync(device)
    return time.perf_counter() - t0


def anchor_pair(ref: LoadedModel, other: LoadedModel, store: TokenStore, n_tokens: int, batch_size: int,
                device: str, max_batches: int) -> tuple[list[float], float]:
    """(c): the anchor's algorithm for one pair over its first ``max_batches`` batches: both
    models forward, the full fp32 cross product on the device, a copy to the host and a float64
    add into host arrays; then ρ and each neuron's max. Returns each batch's seconds and the
    seconds of the final ρ."""
    n_all = ref.adapter.n_layers * ref.adapter.d_mlp
    sxy = np.zeros((n_all, n_all))
    sx, sy, sxx, syy = (np.zeros(n_all) for _ in range(4))
    n, times = 0, []
    _sync(device)
    t0 = time.perf_counter()
    for b in activation_stream([ref, other], store.contexts(n_tokens), store.manifest["tokenizer"],
                               batch_size=batch_size, device=device):
        xa, xb = b.acts
        n += xa.shape[0]
        sxy += torch.einsum("ni,nj->ij", xa, xb).cpu().numpy()  # float32 -> float64 add on the host
        sx += xa.sum(0).cpu().numpy()
        sy += xb.sum(0).cpu().numpy()
        sxx += (xa * xa).sum(0).cpu().numpy()
        syy += (xb * xb).sum(0).cpu().numpy()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if len(times) >= max_batches:
            break
    sxy /= n  # ρ in place: the anchor's Σxy/n − x̄ȳ over σσ
    sxy -= np.outer(sx / n, sy / n)
    sxy /= np.sqrt(sxx / n - (sx / n) ** 2)[:, None]
    sxy /= np.sqrt(syy / n - (sy / n) ** 2)[None, :]
    np.nanmax(sxy, axis=1)
    return times, time.perf_counter() - t0


def zoo_rows(dev: str, preset: str, steps: int, repeats: int, row) -> None:
    """(e) ``zoo train --device`` against a bare PyTorch loop on the same device
    (``benchmarks/zoo_speed.py``: same model, batches, AdamW and clip; tokens/s)."""
    spec = importlib.util.spec_from_file_location("zoo_speed", Path(__file__).with_name("zoo_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        out = mod.main(["--device", dev, "--preset", preset, "--steps", str(steps),
                        "--repeats", str(repeats)])
    finally:
        torch.set_num_threads(threads)
    from unineurons.zoo import ZooConfig

    tokens = steps * ZooConfig.from_preset(preset).batch_size * mod.CTX
    ref = dict((name, sec) for name, sec, _ in out)[mod.reference_name(dev)]
    for name, sec, _ in out:
        if name.startswith("zoo train"):
            row(f"(e) {name}, preset {preset}, {steps} steps on {dev}",
                f"{sec:.2f} s ({tokens / sec:,.0f} tok/s)",
                f"bare loop {ref:.2f} s ({tokens / ref:,.0f} tok/s)", f"{sec / ref:.2f}x time")


def main(argv: list[str] | None = None) -> list[tuple[str, str, str, str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and a few thousand tokens (seconds)")
    ap.add_argument("--n-tokens", type=int, help="tokens of (b)-(d) (default 2,097,152; quick: 4,096)")
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--dtype", default="tf32", choices=["float32", "tf32", "bfloat16"],
                    help="correlate's --dtype in (b)")
    ap.add_argument("--memory-budget", default="120GB", help="correlate's --memory-budget in (b)")
    ap.add_argument("--anchor-batches", type=int, default=3, help="(c): batches measured (quick: all)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--zoo-steps", type=int, default=300, help="(e): optimizer steps per contender (quick: 2)")
    ap.add_argument("--zoo-preset", default="small", help="(e): zoo preset (quick: micro)")
    ap.add_argument("--skip", default="", help="comma-separated sections among a-e to skip")
    args = ap.parse_args(argv)
    dev, quick, skip = args.device, args.quick, set(args.skip.split(","))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: --device cuda but torch sees no GPU; use --device cpu --quick")
    n_tokens = args.n_tokens or (4096 if quick else 2_097_152)
    set_quiet(True)
    t_all = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []

    def row(*r: str) -> None:
        rows.append(r)
        print(" | ".join(r), f"[{time.perf_counter() - t_all:.0f} s]", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="unineurons_gpu_bench_"))
    try:
        models = build_models(tmp, quick, dev)
        ad = models[0].adapter
        N = ad.n_layers * ad.d_mlp
        ctx = 64 if quick else 1024
        store = random_store(tmp / "tokens", ad.vocab_size, ctx, n_tokens)
        tok = store.n_contexts_for(n_tokens) * ctx
        print(f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}), "
              f"torch {torch.__version__}; 5 x GPT-2 {ad.n_layers} layers x {ad.d_mlp} = {N:,} neurons; "
              f"{tok:,} tokens", flush=True)
        if "a" not in skip:
            fold = 512 if quick else 8192
            with _section("a", row):
                for name, r in bench_accumulate(fold, N, dev).items():
                    row(f"(a) accumulate {name}, {fold} x {N} x {N}",
                        f"{r['ours_tflops']:.2f} TFLOP/s ({r['ours_s'] * 1e3:.1f} ms)",
                        f"torch.mm {r['plain_tflops']:.2f} TFLOP/s ({r['plain_s'] * 1e3:.1f} ms)",
                        f"{r['plain_s'] / r['ours_s']:.2f}")
        cfg = CorrelateConfig(models=[str(m.spec.spec) for m in models], tokens=str(store.path),
                              n_tokens=n_tokens, batch_size=args.batch_size, device=dev, dtype=args.dtype,
                              memory_budget=args.memory_budget, checkpoint_tokens=10**12)
        fwd = anc = ours = float("nan")
        pairs = len(models) - 1
        if "b" not in skip:
            with _section("b", row), _tf32(args.dtype == "tf32"):
                fwd = forward_only(models, store, n_tokens, args.batch_size, dev)
                row("(b) forward passes alone, 5 models", f"{fwd:.1f} s ({tok / fwd:,.0f} tok/s)", "-", "-")
        if "c" not in skip:
            n_ctx = store.n_contexts_for(n_tokens)
            n_batches = -(-n_ctx // args.batch_size)
            want = n_batches if quick else min(args.anchor_batches, n_batches)
            with _section("c", row), _tf32(args.dtype == "tf32"):
                times, final = anchor_pair(models[0], models[1], store, n_tokens, args.batch_size, dev, want)
                # the first batch also touches the host array's pages for the first time
                per = float(np.mean(times[1:])) if len(times) > 1 else times[0]
                anc = (times[0] + per * (n_batches - 1) + final) * pairs
                row(f"(c) anchor, 1 pair, {len(times)} of {n_batches} batches",
                    f"{sum(times):.1f} s (first {times[0]:.2f} s, then {per:.2f} s/batch)",
                    f"final rho {final:.1f} s", "-")
        if "b" not in skip:
            with _section("b", row):
                if dev.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                with _tf32(args.dtype == "tf32"):
                    res = run_correlate(cfg, tmp / "run", models=models)
                _sync(dev)
                ours = time.perf_counter() - t0
                row(f"(b) correlate, 5 models, ref vs rest, --dtype {args.dtype}",
                    f"{ours:.1f} s ({tok / ours:,.0f} tok/s)", f"forward alone {fwd:.1f} s", f"{ours / fwd:.2f}x")
                plan_peak = estimate(cfg, n_tokens, ctx, rate=1.0).plan.peak_bytes  # = `unineurons plan`
                if dev.startswith("cuda"):
                    peak = torch.cuda.max_memory_allocated() - base
                    reserved = torch.cuda.max_memory_reserved()
                    row(f"(d) peak GPU memory of (b), {len(res.plan.passes)} pass(es)",
                        f"{peak / 1e9:.1f} GB (reserved {reserved / 1e9:.1f} GB)",
                        f"unineurons plan {plan_peak / 1e9:.1f} GB (budget {args.memory_budget})",
                        f"{peak / plan_peak:.2f}")
                else:
                    row(f"(d) peak memory of (b), {len(res.plan.passes)} pass(es)", "n/a on cpu",
                        f"unineurons plan {plan_peak / 1e9:.3f} GB", "-")
        if anc == anc:
            scaled = " (scaled from the batches above)" if not quick else ""
            row(f"(c) anchor rho only, {pairs} pairs{scaled}", f"{anc:.1f} s",
                f"ours {ours:.1f} s (rho, baseline, ceiling)", f"anchor/ours {anc / ours:.2f}")
            row("(c) anchor with its rotated-baseline pass", f"{2 * anc:.1f} s", f"ours {ours:.1f} s",
                f"anchor/ours {2 * anc / ours:.2f}")
        if "e" not in skip:
            with _section("e", row):
                zoo_rows(dev, "micro" if quick else args.zoo_preset, 2 if quick else args.zoo_steps,
                         1 if quick else 2, row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nGPU benchmark: device {dev}, {'quick' if quick else 'full'}, total {time.perf_counter() - t_all:.0f} s")
    w = [max(len(r[i]) for r in rows + [("measure", "ours", "reference", "ratio")]) for i in range(4)]
    for r in [("measure", "ours", "reference", "ratio"), tuple("-" * x for x in w), *rows]:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
