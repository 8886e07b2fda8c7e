"""Tune zoo presets for held-out loss per CPU-second; print one table.

Usage (from the repository root; builds a stdlib token store on first use)::

    .venv/bin/python benchmarks/zoo_presets.py                   # tiny-preset sweep, 40 s budget
    .venv/bin/python benchmarks/zoo_presets.py --seconds 160 --settings lr1e-3,lr3e-3_b16
    .venv/bin/python benchmarks/zoo_presets.py --presets          # micro / tiny / small as they are

Method. On a shared machine wall-clock timings are noisy, so time enters only once, as a
throughput: each shape's (model, batch, ctx) tokens/s is the best of ``--repeats`` short bursts on
one thread, interleaved across shapes, timed in *thread CPU time* (time spent waiting for a core held by
other processes does not count; best-of discounts cache and memory contention). A setting
then trains for ``seconds x tokens/s`` tokens, i.e. the number of steps it would do in that
budget, with its schedule fitted to those steps; the resulting held-out loss depends on the
step count only, not on how busy the machine is while it runs. Runs go ``--parallel`` at a
time in separate processes (one thread each, as zoo workers). The held-out loss is measured at
the end on the first ``--eval-contexts`` held-out contexts, over the first 64 positions (so
ctx-64 and ctx-128 models are compared on the same tokens) and over the model's full ctx.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

#: Settings of the tiny-preset sweep: name -> overrides of the preset.
SETTINGS: dict[str, dict] = {
    "lr1e-3": {"lr": 1e-3},  # the starting point (batch 32 x 128)
    "lr3e-3": {"lr": 3e-3},
    "lr6e-3": {"lr": 6e-3},
    "lr1e-2": {"lr": 1e-2},
    "lr2e-3": {"lr": 2e-3},
    "lr4e-3": {"lr": 4e-3},
    "lr3e-3_b16": {"lr": 3e-3, "batch_size": 16},
    "lr2e-3_b16": {"lr": 2e-3, "batch_size": 16},
    "lr4e-3_b16": {"lr": 4e-3, "batch_size": 16},
    "lr2e-3_b8": {"lr": 2e-3, "batch_size": 8},
    "lr3e-3_b8": {"lr": 3e-3, "batch_size": 8},
    "lr6e-3_b64": {"lr": 6e-3, "batch_size": 64},
    "lr3e-3_ctx64_b64": {"lr": 3e-3, "ctx": 64, "batch_size": 64},
    "lr3e-3_ctx64_b32": {"lr": 3e-3, "ctx": 64, "batch_size": 32},
}


def ensure_stores(cache: Path) -> tuple[Path, Path]:
    """A 4096-token BPE on stdlib and train / held-out stores of ctx 128 (built once)."""
    tok, train, held = cache / "tok", cache / "train", cache / "heldout"
    cli = [sys.executable, "-c", "from unineurons.cli import main; main()"]
    if not (tok / "tokenizer.json").is_file():
        subprocess.run([*cli, "tokenizer", "train", "--source", "stdlib", "--vocab-size", "4096",
                        "--out", str(tok)], check=True)
    for out, split, n in ((train, "train", 4_000_000), (held, "heldout", 200_000)):
        if not (out / "manifest.json").is_file():
            subprocess.run([*cli, "tokens", "build", "--source", "stdlib", "--tokenizer", str(tok),
                            "--ctx", "128", "--n-tokens", str(n), "--split", split, "--out",
                            str(out)], check=True)
    return train, held


def throughput(preset: str, overrides: dict, tokens: Path, steps: int = 8) -> float:
    """Tokens per CPU-second of training steps on one thread (after 3 warm-up steps)."""
    import numpy as np
    import torch

    from unineurons.tokens import TokenStore
    from unineurons.zoo import ZooConfig, ZooSpec, build_model
    from unineurons.zoo.train import _lm_loss, _optimizer

    torch.set_num_threads(1)
    store = TokenStore.open(tokens, verify=False)
    cfg = ZooConfig.from_preset(preset, **overrides)
    ctx = cfg.ctx or store.ctx
    spec = ZooSpec(config=cfg, steps=1, checkpoints=(1,), out="", tokens=str(tokens),
                   heldout=None, tokenizer="", vocab_size=store.vocab_size,
                   n_positions=store.ctx, ctx=ctx)
    model = build_model(spec, 0)
    opt = _optimizer(model, cfg)
    x = torch.from_numpy(np.asarray(store.tokens[:cfg.batch_size, :ctx], dtype=np.int64))
    for i in range(3 + steps):
        if i == 3:
            t0 = time.thread_time()
        _lm_loss(model, x).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # CPU time of this thread, not wall time: waiting for a core that other processes hold
    # does not count, so a busy machine reads (nearly) as an idle one.
    return steps * cfg.batch_size * ctx / (time.thread_time() - t0)


def train_and_eval(preset: str, overrides: dict, steps: int, tokens: Path, heldout: Path,
                   out: Path, eval_contexts: int) -> dict:
    """Train one seed for ``steps`` (one thread) and measure its held-out loss."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from unineurons.progress import set_quiet
    from unineurons.tokens import TokenStore
    from unineurons.zoo import train_zoo, zoo_checkpoints

    hf_logging.disable_progress_bar()
    set_quiet(True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train_zoo(tokens, out, preset=preset, seeds=(0,), steps=steps, checkpoints=(steps,),
              heldout=None, workers=1, **overrides)
    wall = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(zoo_checkpoints(out)[0][steps]).eval()
    ctx = overrides.get("ctx") or TokenStore.open(tokens, verify=False).ctx
    x = torch.from_numpy(np.asarray(TokenStore.open(heldout, verify=False).tokens[:eval_contexts,
                                                                                   :ctx],
                                    dtype=np.int64))
    nll = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            xb = x[i:i + 64]
            logits = model(input_ids=xb).logits[:, :-1]  # (B, ctx-1, vocab)
            nll.append(F.cross_entropy(logits.transpose(1, 2), xb[:, 1:], reduction="none"))
    nll = torch.cat(nll)  # (N, ctx-1)
    return {"loss64": float(nll[:, :63].mean()), "loss_ctx": float(nll.mean()), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=Path, help="training token store (default: built in --cache)")
    ap.add_argument("--heldout", type=Path, help="held-out token store (same tokenizer)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/unineurons-bench-zoo"))
    ap.add_argument("--seconds", type=float, default=40.0,
                    help="training budget per setting, in single-thread CPU seconds")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma-separated names from SETTINGS")
    ap.add_argument("--presets", action="store_true",
                    help="measure the micro, tiny and small presets as they are instead")
    ap.add_argument("--repeats", type=int, default=3, help="throughput bursts per setting")
    ap.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    ap.add_argument("--eval-contexts", type=int, default=512)
    args = ap.parse_args()

    if args.tokens is None:
        args.tokens, args.heldout = ensure_stores(args.cache)
    if args.presets:
        runs = {p: (p, {}) for p in ("micro", "tiny", "small")}
    else:
        names = args.settings.split(":") if ":" in args.settings else args.settings.split(",")
        names = [n for n in names if n]
        if set(names) - set(SETTINGS):  # "lr3e-3_b16" split on commas: rejoin known names
            names = [args.settings] if args.settings in SETTINGS else names
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            sys.exit(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
        runs = {n: ("tiny", SETTINGS[n]) for n in names}

    from unineurons.zoo import ZooConfig

    # Throughput: interleaved bursts, best of --repeats (in a fresh 1-thread process each
    # round would cost an import per burst; one process, torch.set_num_threads(1), suffices).
    # Settings that differ only in optimiser numbers (lr, ...) share one throughput, so that
    # timing noise cannot hand one of them more tokens than another.
    def shape(preset: str, ov: dict) -> tuple:
        c = ZooConfig.from_preset(preset, **ov)
        return (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.batch_size, c.ctx)

    shapes = {shape(*r): r for r in runs.values()}
    best = dict.fromkeys(shapes, 0.0)
    for _ in range(args.repeats):
        for key, (preset, ov) in shapes.items():
            best[key] = max(best[key], throughput(preset, ov, args.tokens))
    tps = {n: best[shape(*r)] for n, r in runs.items()}
    plan = {}
    for n, (preset, ov) in runs.items():
        cfg = ZooConfig.from_preset(preset, **ov)
        per_step = cfg.batch_size * (cfg.ctx or 128)
        plan[n] = max(10, round(args.seconds * tps[n] / per_step))

    print(f"budget {args.seconds:.0f} s per setting; training {len(runs)} runs, "
          f"{args.parallel} at a time ...", file=sys.stderr)
    with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn")) as pool:
        futs = {n: pool.submit(train_and_eval, preset, ov, plan[n], args.tokens, args.heldout,
                               args.cache / "runs" / n, args.eval_contexts)
                for n, (preset, ov) in runs.items()}
        res = {n: f.result() for n, f in futs.items()}

    log_v = math.log(4096)
    print(f"\nheld-out loss after {args.seconds:.0f} single-thread CPU seconds "
          f"(stdlib, BPE 4096; {args.eval_contexts} held-out contexts)")
    head = (f"{'setting':<20} {'tokens/s':>9} {'steps':>6} {'tokens':>9} {'loss@64':>8} "
            f"{'loss@ctx':>8} {'(ln V - loss@64)/s':>19}")
    print(head)
    print("-" * len(head))
    for n in runs:
        preset, ov = runs[n]
        cfg = ZooConfig.from_preset(preset, **ov)
        r = res[n]
        ntok = plan[n] * cfg.batch_size * (cfg.ctx or 128)
        print(f"{n:<20} {tps[n]:>9,.0f} {plan[n]:>6} {ntok:>9,} {r['loss64']:>8.3f} "
              f"{r['loss_ctx']:>8.3f} {(log_v - r['loss64']) / args.seconds:>19.4f}")


if __name__ == "__main__":
    main()
