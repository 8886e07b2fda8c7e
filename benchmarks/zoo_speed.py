"""Zoo training speed: ``zoo train``'s loop against a bare PyTorch loop on the same model.

Usage (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/zoo_speed.py               # tiny preset, 60 steps
    PYTHONPATH=src .venv/bin/python benchmarks/zoo_speed.py --preset small --steps 20

Method. One process, one torch thread (as every zoo worker: ``torch.set_num_threads(1)``).
Each contender trains the same model (``build_model`` of the preset, seed 0) on the same batches
(the zoo's data order over a random-token store of the preset's shape: vocabulary 4096, ctx
128) with the same AdamW settings, LR schedule and gradient clipping, for ``--steps`` steps.
Time is *process CPU time* (``time.process_time``): the machine is shared and noisy, and CPU
time does not count the time spent waiting for a core other processes hold. Contenders are
interleaved and each is the best of ``--repeats`` rounds, so drift in the machine's load hits
all of them alike; only ratios measured in this one run are compared.

Contenders:

- ``zoo train``: :func:`unineurons.zoo.train.train_seed` as ``zoo train`` runs it, with its
  metrics rows, held-out evaluations (``eval_every`` scaled to the run: 5 per run) and
  checkpoints (the default 1/8, 1/4, 1/2, 1: HF folder plus resume state) included;
- ``zoo steps only``: the same with no held-out store and one checkpoint at the end;
- ``bare loop``: ``model(x).logits``, cross entropy, backward, clip, ``AdamW(foreach=False)``
  (the zoo's optimizer arithmetic on CPU), nothing else;
- ``bare, foreach AdamW`` / ``bare, fused AdamW``: the same with ``foreach=True`` /
  ``fused=True`` (and a foreach clip), the levers the issue names;
- with ``--compile``: ``bare, torch.compile, fused AdamW``: the fused loop with the model's
  forward and backward through ``torch.compile`` (inductor, compiled in this process:
  ``compile_threads=1``, so the compile's CPU time is counted; a fresh compile every round).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unineurons.io import sha256_file, write_json
from unineurons.zoo import ZooConfig, ZooSpec, build_model
from unineurons.zoo.config import lr_at
from unineurons.zoo.run import default_checkpoints
from unineurons.zoo.train import _Order, train_seed

VOCAB, CTX = 4096, 128


class _NoTokenizer:
    """Checkpoints need a tokenizer to save beside the weights; random tokens have none."""

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)


def random_store(path: Path, n_rows: int, seed: int) -> Path:
    """A token store of ``n_rows`` contexts of ``CTX`` uniform random tokens (BOS first)."""
    path.mkdir(parents=True)
    arr = np.random.default_rng(seed).integers(0, VOCAB - 1, size=(n_rows, CTX), dtype=np.int32)
    arr[:, 0] = VOCAB - 1
    np.save(path / "tokens.npy", arr)
    write_json(path / "manifest.json", {
        "format_version": 1, "kind": "tokens", "source": "random", "ctx": CTX,
        "n_contexts": n_rows, "n_tokens": n_rows * CTX, "split": "train", "seed": seed,
        "heldout_fraction": 0.0, "dtype": "int32", "sha256": sha256_file(path / "tokens.npy"),
        "n_documents": n_rows, "created_by": "benchmarks/zoo_speed.py",
        "tokenizer": {"path": "-", "vocab_size": VOCAB, "vocab_sha256": None,
                      "bos_id": VOCAB - 1, "eos_id": VOCAB - 1, "pad_id": None,
                      "newline_ids": []},
    })
    return path


def _clock(device: str) -> float:
    """Process CPU seconds on CPU; on a GPU wall seconds after a sync (the GPU does the work)."""
    if device == "cpu":
        return time.process_time()
    torch.cuda.synchronize(device)
    return time.perf_counter()


def zoo_run(spec: ZooSpec) -> float:
    """Seconds (see :func:`_clock`) of ``train_seed`` on seed 0 (a fresh folder each time)."""
    shutil.rmtree(spec.out, ignore_errors=True)
    t0 = _clock(spec.device)
    train_seed(spec, 0, tokenizer=_NoTokenizer())
    return _clock(spec.device) - t0


def bare_run(spec: ZooSpec, optim: str) -> float:
    """Seconds (see :func:`_clock`) of a bare loop: same model, batches, AdamW settings,
    schedule and clip, on ``spec.device``."""
    from unineurons.tokens import TokenStore

    cfg = spec.config
    dev = spec.device
    data = TokenStore.open(spec.tokens, verify=False).tokens
    t0 = _clock(dev)
    model = build_model(spec, 0).to(dev)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    kw = {"foreach": False} if optim == "loop" else {optim.removeprefix("compile+"): True}
    fwd = model
    if optim.startswith("compile+"):
        from torch import _dynamo
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1  # compile here: process CPU time counts it
        _dynamo.reset()
        fwd = torch.compile(model)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
    order = _Order(0, data.shape[0], cfg.batch_size)
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, spec.steps)
        x = torch.from_numpy(np.asarray(data[order.rows(step), :spec.ctx], dtype=np.int64)).to(dev)
        logits = fwd(input_ids=x).logits  # (B, ctx, vocab)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip,
                                       foreach=optim != "loop")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _clock(dev) - t0


def reference_name(device: str) -> str:
    """The contender every time is divided by: the bare loop with the zoo's own optimizer
    (``foreach=False`` AdamW on CPU, fused on a GPU; ``zoo.train._optimizer``)."""
    return "bare loop, AdamW foreach=False" if device == "cpu" else "bare loop, AdamW fused=True"


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="zoo preset (micro, tiny, small)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per contender")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each contender's best counts")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile contender")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (wall time after a sync; the zoo "
                    "uses fused AdamW there, so the reference bare loop does too)")
    args = ap.parse_args(argv)
    dev = args.device
    torch.set_num_threads(1)  # as every zoo worker
    cfg = ZooConfig.from_preset(args.preset)
    cfg = dataclasses.replace(cfg, steps=args.steps, eval_every=max(1, args.steps // 5))
    tmp = Path(tempfile.mkdtemp(prefix="zoo-speed-"))
    try:
        train = random_store(tmp / "train", max(cfg.batch_size * args.steps, 64), 0)
        held = random_store(tmp / "heldout", cfg.eval_contexts, 1)
        full = ZooSpec(config=cfg, steps=args.steps,
                       checkpoints=default_checkpoints(args.steps), out=str(tmp / "zoo"),
                       tokens=str(train), heldout=str(held), tokenizer="-", vocab_size=VOCAB,
                       n_positions=CTX, ctx=CTX, device=dev)
        steps_only = dataclasses.replace(full, heldout=None, checkpoints=(args.steps,))
        runs = {
            "zoo train (evals, checkpoints)": lambda: zoo_run(full),
            "zoo train, steps only": lambda: zoo_run(steps_only),
            "bare loop, AdamW foreach=False": lambda: bare_run(full, "loop"),
            "bare loop, AdamW foreach=True": lambda: bare_run(full, "foreach"),
            "bare loop, AdamW fused=True": lambda: bare_run(full, "fused"),
        }
        ref_name = reference_name(dev)
        if args.compile:
            runs["bare loop, torch.compile, fused"] = lambda: bare_run(full, "compile+fused")
        best = dict.fromkeys(runs, float("inf"))
        for r in range(args.repeats):
            for name, fn in runs.items():
                best[name] = min(best[name], fn())
            print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = args.steps * cfg.batch_size * CTX
    ref = best[ref_name]
    clock = "process CPU time" if dev == "cpu" else f"wall time on {dev}"
    print(f"\n{args.preset}: {args.steps} steps of {cfg.batch_size} x {CTX} tokens, 1 thread, "
          f"best of {args.repeats}, {clock}; reference: {ref_name}")
    print("| contender | s | tokens/s | time / reference |\n| --- | --- | --- | --- |")
    out = []
    for name, sec in best.items():
        print(f"| {name} | {sec:.2f} | {tokens / sec:,.0f} | {sec / ref:.3f} |")
        out.append((name, sec, sec / ref))
    return out


if __name__ == "__main__":
    main()
