"""Train a whole zoo: validate, lay out the folder, run seeds in parallel worker processes.

Layout::

    ZOO/
      .unineurons.json      marker, kind "zoo"
      zoo.json              preset, resolved config, seeds, steps, checkpoints, token stores
                            (path + sha256), tokenizer, package versions
      seed{S}/              one folder per seed (see :mod:`unineurons.zoo.train`)

Running the same command again resumes every unfinished seed from its last checkpoint; a
finished zoo is left as it is. Seeds may be added to an existing zoo (same settings otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UnineuronsError
from ..io import MARKER, prepare_out_dir, read_json, write_json
from ..progress import progress
from .config import ZooConfig, check_members, member_name, member_seeds
from .train import ZooSpec, seed_dir, train_seed

__all__ = ["train_zoo", "zoo_checkpoints", "zoo_info", "parse_int_list", "default_checkpoints",
           "ZOO_FORMAT"]

#: Bumped when zoo.json's meaning changes.
ZOO_FORMAT = 1

#: zoo.json keys that must match for a rerun to resume (or extend) an existing zoo.
_SAME_KEYS = ("format", "config", "steps", "checkpoints", "ctx", "n_positions", "vocab_size",
              "tokens_sha256", "heldout_sha256")


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; empty or non-integer items are a one-line error."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise UnineuronsError(f"{option} is empty; give comma-separated integers, e.g. 0,1,2")
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            raise UnineuronsError(
                f"{option}: {t!r} is not an integer; give comma-separated integers, e.g. 0,1,2"
            ) from None
    return tuple(out)


def default_checkpoints(steps: int) -> tuple[int, ...]:
    """Steps 1/8, 1/4, 1/2 and all of the way: denser early, where neurons form."""
    return tuple(sorted({s for s in (steps // 8, steps // 4, steps // 2, steps) if s > 0}))


def _check_ints(values: Iterable[Any], what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UnineuronsError(f"{what}: {v!r} is not an integer")
        out.append(int(v))
    return out


def _validate_run(seeds: Sequence[int], steps: int, checkpoints: Sequence[int] | None
                  ) -> tuple[list[int], tuple[int, ...]]:
    seeds = check_members(seeds)  # plain seeds, or grid members init{I}-data{D}
    if not seeds:
        raise UnineuronsError("--seeds is empty; give at least one seed, e.g. 0,1,2,3,4")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise UnineuronsError(f"--seeds: seed {dup[0]} is given twice; each seed trains one model")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UnineuronsError(f"--steps must be a positive integer, got {steps!r}")
    if checkpoints is None:
        ckpts = list(default_checkpoints(steps))
    else:
        ckpts = _check_ints(checkpoints, "checkpoints")
        for c in ckpts:
            if not 0 < c <= steps:
                raise UnineuronsError(
                    f"--checkpoints: step {c} is outside 1..{steps} (--steps); "
                    "give steps between 1 and --steps"
                )
        dup = sorted({c for c in ckpts if ckpts.count(c) > 1})
        if dup:
            raise UnineuronsError(f"--checkpoints: step {dup[0]} is given twice")
    # The final weights are what every analysis reads: always keep them.
    return seeds, tuple(sorted(set(ckpts) | {steps}))


def _open_store(path: str | os.PathLike, option: str) -> Any:
    from ..tokens import TokenStore

    try:
        return TokenStore.open(path)
    except UnineuronsError as e:
        raise UnineuronsError(f"{option}: {e}") from None


def _plan(tokens: str | os.PathLike, out: str | os.PathLike, cfg: ZooConfig, steps: int,
          checkpoints: tuple[int, ...], heldout: str | os.PathLike | None
          ) -> tuple[ZooSpec, dict[str, Any], Any]:
    """Check the token stores and tokenizer; return the spec, zoo.json body and tokenizer."""
    from ..models.load import load_tokenizer

    store = _open_store(tokens, "--tokens")
    tok_info = store.manifest["tokenizer"]
    ctx = cfg.ctx or store.ctx
    if ctx > store.ctx:
        raise UnineuronsError(f"ctx {ctx} is longer than the token store's rows ({store.ctx}); "
                              "use a smaller ctx or a store built with a larger --ctx")
    if store.n_contexts == 0:
        raise UnineuronsError(f"--tokens {tokens}: the token store is empty")
    held_sha = None
    if heldout is not None:
        hs = _open_store(heldout, "--heldout")
        if hs.manifest["tokenizer"].get("vocab_sha256") != tok_info.get("vocab_sha256"):
            raise UnineuronsError(
                f"--heldout {heldout}: built with a different tokenizer than --tokens {tokens}; "
                "build both stores with the same --tokenizer"
            )
        if hs.ctx < ctx:
            raise UnineuronsError(f"--heldout {heldout}: rows of {hs.ctx} tokens are shorter than "
                                  f"the training ctx {ctx}")
        if hs.n_contexts == 0:
            raise UnineuronsError(f"--heldout {heldout}: the token store is empty")
        held_sha = hs.sha256
    # absolute for workers and zoo.json; a moved local folder is an error, never a hub id
    tok_path = store.tokenizer_path
    tokenizer = load_tokenizer(tok_path)
    spec = ZooSpec(
        config=cfg, steps=steps, checkpoints=checkpoints, out=str(Path(out).resolve()),
        tokens=str(Path(tokens).resolve()),
        heldout=None if heldout is None else str(Path(heldout).resolve()),
        tokenizer=tok_path, vocab_size=int(tok_info["vocab_size"]),
        n_positions=int(store.ctx), ctx=int(ctx),
        special={k: tok_info.get(k) for k in ("bos_id", "eos_id", "pad_id")},
    )
    body: dict[str, Any] = {
        "format": ZOO_FORMAT, "preset": cfg.preset, "config": cfg.to_dict(), "steps": steps,
        "checkpoints": list(checkpoints), "ctx": spec.ctx, "n_positions": spec.n_positions,
        "vocab_size": spec.vocab_size, "tokens": spec.tokens, "tokens_sha256": store.sha256,
        "heldout": spec.heldout, "heldout_sha256": held_sha, "tokenizer": spec.tokenizer,
    }
    # Resume states carry this, so a seed folder is never continued under other settings.
    key = json.dumps({k: body[k] for k in _SAME_KEYS}, sort_keys=True)
    spec = dataclasses.replace(spec, fingerprint=hashlib.sha256(key.encode()).hexdigest())
    return spec, body, tokenizer


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"unineurons": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def train_zoo(tokens: str | os.PathLike, out: str | os.PathLike, preset: str = "tiny",
              seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int | None = None,
              checkpoints: Sequence[int] | None = None, heldout: str | os.PathLike | None = None,
              workers: int | None = None, device: str = "cpu", **overrides: Any) -> Path:
    """Train (or resume) one GPT-2 per seed on the token store ``tokens``; return ``out``.

    ``overrides`` are :class:`ZooConfig` fields (``lr``, ``batch_size``, ...). ``steps``
    defaults to the preset's; ``checkpoints`` to :func:`default_checkpoints` (the last step is
    always added). Seeds train in ``workers`` processes (default ``min(len(seeds), cpus)``),
    one CPU thread each. ``device`` (cpu, cuda, cuda:i) holds the models, AdamW states and
    batches; checkpoints are saved from CPU copies. Bad input (a device this machine lacks too)
    raises :class:`UnineuronsError` before anything is written.
    """
    cfg = ZooConfig.from_preset(preset, **overrides)
    steps = cfg.steps if steps is None else steps
    seeds, ckpts = _validate_run(seeds, steps, checkpoints)
    cfg = dataclasses.replace(cfg, steps=steps)  # the config then describes this very run
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers <= 0):
        raise UnineuronsError(f"--workers must be a positive integer, got {workers!r}")
    _check_zoo_device(device)
    spec, body, tokenizer = _plan(tokens, out, cfg, steps, ckpts, heldout)
    spec = dataclasses.replace(spec, device=device)
    n_workers = min(len(seeds), os.cpu_count() or 1) if workers is None else workers
    from ..checks import check_memory

    check_memory(min(n_workers, len(seeds)) * train_memory_bytes(cfg, spec.ctx, spec.vocab_size),
                 f"zoo train (batch {cfg.batch_size} x ctx {spec.ctx}, "
                 f"{min(n_workers, len(seeds))} worker(s))", "lower --batch-size or --workers")

    out = Path(out)
    zoo_json = out / "zoo.json"
    old = None
    if out.is_dir() and (out / MARKER).is_file() and zoo_json.is_file():
        old = read_json(zoo_json, "zoo manifest")
        diff = [k for k in _SAME_KEYS if old.get(k) != body.get(k)]
        if diff:
            raise UnineuronsError(
                f"output folder {out} holds a zoo trained with other settings ({', '.join(diff)} "
                "differ); rerun with the same settings to resume it, or choose another --out"
            )
    all_seeds = sorted(set(check_members(list(seeds) + list(old["seeds"] if old else ()))))
    prepare_out_dir(out, "zoo")
    write_json(zoo_json, {**body, "seeds": all_seeds, "versions": _versions()})

    for s in seeds:  # each member's seeds, read by correlate's partner kinds
        init, data = member_seeds(s)
        write_json(out / member_name(s) / "member.json", {"init_seed": init, "data_seed": data})
    todo = [s for s in seeds if not _finished(spec, s)]
    n_workers = min(n_workers, len(todo))
    with progress(f"zoo {cfg.preset} x{len(seeds)}", total=len(seeds) * steps,
                  unit="steps") as bar:
        bar.advance((len(seeds) - len(todo)) * steps)
        if n_workers == 1:
            _train_here(spec, todo, tokenizer, bar.advance)
        elif n_workers > 1:
            _train_parallel(spec, todo, n_workers, bar.advance)
    return out


def _check_zoo_device(device: Any) -> None:
    """One clear line unless ``device`` is cpu, cuda or cuda:i and usable here."""
    from ..config import check_device, check_device_available

    try:
        check_device_available(check_device(device if isinstance(device, str) else repr(device)))
    except ValueError as e:
        raise UnineuronsError(f"--device: {e}") from None


def train_memory_bytes(cfg: ZooConfig, ctx: int, vocab_size: int) -> int:
    """Estimated peak bytes of training one model of ``cfg`` (one worker), float32: weights,
    gradients and both AdamW moments (16 bytes per parameter), the activations kept for the
    backward pass (per token and layer about 34·d_model + 2·n_inner values and n_head·ctx
    attention probabilities, twice for their gradients; Korthikanti et al. 2022) and the
    logits with their softmax and gradient (3 · vocab values per token)."""
    d, inner, layers, heads = cfg.n_embd, cfg.n_inner, cfg.n_layer, cfg.n_head
    params = layers * (4 * d * d + 2 * d * inner) + (vocab_size + ctx) * d
    tokens = cfg.batch_size * ctx
    acts = tokens * layers * (34 * d + 2 * inner + 2 * heads * ctx) * 4 * 2
    return int(16 * params + acts + tokens * vocab_size * 4 * 3)


def _finished(spec: ZooSpec, seed: int) -> bool:
    """Whether the seed's resume state is at the last step (nothing left to train)."""
    path = seed_dir(spec.out, seed) / "resume" / "state.json"
    if not path.is_file():
        return False
    with contextlib.suppress(UnineuronsError):
        state = read_json(path, "resume state")
        return state.get("step") == spec.steps and state.get("fingerprint") == spec.fingerprint
    return False


def _train_here(spec: ZooSpec, seeds: Sequence[int], tokenizer: Any, advance) -> None:
    """One worker: train in this process, with one thread as a worker would (same numbers)."""
    import torch

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    try:
        for seed in seeds:
            train_seed(spec, seed, tokenizer=tokenizer, report=advance)
    finally:  # leave the caller's torch as we found it
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def _worker(spec: ZooSpec, tasks: Any, reports: Any, parent: int) -> None:
    """Worker process: train seeds from ``tasks`` until a None, reporting to ``reports``."""
    import torch

    torch.set_num_threads(1)  # two 1-thread processes beat one 2-thread process on 2 cores
    pending, last = 0, time.monotonic()

    def report(n: int) -> None:
        nonlocal pending, last
        if os.getppid() != parent:  # the parent was killed: stop rather than train orphaned
            os._exit(1)
        pending += n
        now = time.monotonic()
        if now - last > 0.2:  # batch progress messages: a micro step takes microseconds
            reports.put(("steps", seed, pending))
            pending, last = 0, now

    while (seed := tasks.get()) is not None:
        try:
            summary = train_seed(spec, seed, report=report)
        except UnineuronsError as e:
            reports.put(("error", seed, str(e), True))
            return
        except Exception:
            reports.put(("error", seed, traceback.format_exc(), False))
            return
        reports.put(("steps", seed, pending))
        pending = 0
        reports.put(("done", seed, summary))


def _train_parallel(spec: ZooSpec, seeds: Sequence[int], n_workers: int, advance) -> None:
    # spawn, not fork: a forked torch (with its thread pools) can deadlock, and spawn behaves
    # the same on every platform.
    ctx = mp.get_context("spawn")
    tasks, reports = ctx.Queue(), ctx.Queue()
    for s in seeds:
        tasks.put(s)
    for _ in range(n_workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(spec, tasks, reports, os.getpid()), daemon=True,
                         name=f"unineurons-zoo-{i}") for i in range(n_workers)]
    remaining, quiet_polls = set(seeds), 0
    try:
        for p in procs:
            p.start()
        while remaining:
            try:
                msg = reports.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                stopped = dead or all(p.exitcode is not None for p in procs)
                # Two empty polls after the workers stopped: their last words were read.
                quiet_polls = quiet_polls + 1 if stopped else 0
                if quiet_polls >= 2:
                    code = dead[0].exitcode if dead else 0
                    raise RuntimeError(
                        f"a zoo worker stopped (exit code {code}) before seeds "
                        f"{sorted(remaining)} finished; rerun the same command to resume"
                    ) from None
                continue
            kind, seed = msg[0], msg[1]
            if kind == "steps":
                advance(msg[2])
            elif kind == "done":
                remaining.discard(seed)
            elif msg[3]:
                raise UnineuronsError(f"seed {seed}: {msg[2]}")
            else:
                raise RuntimeError(f"training seed {seed} failed in a worker:\n{msg[2]}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        tasks.cancel_join_thread()  # unread sentinels must not block our exit


# ---- reading a zoo -------------------------------------------------------------------------

def _open_zoo(zoo_dir: str | os.PathLike) -> dict[str, Any]:
    z = Path(zoo_dir)
    marker = z / MARKER
    if not marker.is_file() or read_json(marker, "marker").get("kind") != "zoo":
        raise UnineuronsError(f"{z} is not a zoo folder; make one with `unineurons zoo train`")
    return read_json(z / "zoo.json", "zoo manifest")


def zoo_checkpoints(zoo_dir: str | os.PathLike) -> dict[int, dict[int, Path]]:
    """``{seed: {step: checkpoint folder}}`` for every checkpoint written so far, sorted.

    Every seed of the zoo is a key, with an empty dict if it has no checkpoint yet.
    """
    z = _open_zoo(zoo_dir)
    out: dict[int, dict[int, Path]] = {}
    for seed in sorted(z["seeds"]):
        found = {}
        for step in z["checkpoints"]:
            p = seed_dir(zoo_dir, seed) / f"step{step}"
            if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
                found[step] = p
        out[seed] = found
    return out


def zoo_info(zoo_dir: str | os.PathLike) -> dict[str, Any]:
    """zoo.json plus, per seed, its checkpoints and its last logged losses; ``notes`` says
    which metrics files could not be read (wholly or in part)."""
    z = _open_zoo(zoo_dir)
    ckpts = zoo_checkpoints(zoo_dir)
    per_seed = {}
    notes: list[str] = []
    for seed in sorted(z["seeds"]):
        mpath = seed_dir(zoo_dir, seed) / "metrics.jsonl"
        rows, bad = _metrics_rows(mpath)
        if bad:
            notes.append(f"seed {seed}: {mpath} has {len(bad)} unreadable line(s) (first: line "
                         f"{bad[0]}); its losses and step are from the lines that could be read"
                         + ("" if rows else " (none): the step shown is its last checkpoint's"))
        held = [r for r in rows if "heldout_loss" in r]
        per_seed[seed] = {
            "checkpoints": sorted(ckpts[seed]),
            "step": rows[-1]["step"] if rows else max(ckpts[seed], default=0),
            "train_loss": rows[-1]["train_loss"] if rows else None,
            "heldout_loss": held[-1]["heldout_loss"] if held else None,
            "elapsed_s": rows[-1]["elapsed_s"] if rows else None,
        }
    return {**z, "per_seed": per_seed, "notes": notes}


def _metrics_rows(path: Path) -> tuple[list[dict], list[int]]:
    """The rows of a seed's metrics.jsonl (dicts with a step and a train loss) and the numbers
    of the lines that are not; a last line cut off by a kill is not counted as damage."""
    if not path.is_file():
        return [], []
    lines = path.read_bytes().split(b"\n")
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line.decode("utf-8"))
            if not (isinstance(r, dict) and "step" in r and "train_loss" in r):
                raise ValueError
            rows.append(r)
        except ValueError:  # JSON and UTF-8 decoding errors are ValueErrors
            if i < len(lines) or not line.strip().startswith(b"{"):
                bad.append(i)
    return rows, bad
