"""Token shards on a Ray cluster: the driver loop and the worker that every stage shares.

A stage that runs with ``--backend ray`` (correlate, analyze, and dynamics through correlate)
splits the contexts it still has to stream into contiguous shards (about
``workers x SHARDS_PER_WORKER``). A pool of Ray actors (:class:`ShardWorker`), one per worker,
each loading the run's models once and keeping them while the job stays the same, runs the
stage's *shard function* on a shard: it streams ``contexts[c0:c1]`` through the local path's own
code into fresh accumulators and returns their states as the bytes of a safetensors file (no
pickle; the bytes are the shard file).

:func:`run_shards` is the driver. It saves every finished shard atomically
(``STATE/{tag}.shard{c0}-{c1}.safetensors``) and hands shards to the stage's ``merge`` callback
in context order, whatever order they finish in: the result is deterministic for a shard
layout. Every ``checkpoint_tokens`` the stage's ``checkpoint`` callback saves the merged prefix
(the stage's ordinary checkpoint, so a run resumes on either backend) and the shard files it
covers are deleted. On resume, finished shards past the checkpoint are loaded, not recomputed;
only the gaps are split again. A shard that fails (an exception, or its worker process dying:
Ray restarts the actor) is submitted again, up to ``MAX_RETRIES`` times; after that the running
shards finish and are saved, and the error says to rerun with ``--resume``.

Why merge in order rather than as a tree: a tree over K shards holds log2 K states at once on
the driver (a GPT-2-small pair is 10.9 GB) and saves nothing, since every merge runs on the
driver anyway; the float64 merges (Chan, Pébay) make the order irrelevant to accuracy.

Ray is imported only when this backend runs: the package works without it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from .errors import UnineuronsError
from .io import atomic_path
from .models.load import LoadedModel, load_model, parse_model_spec
from .progress import progress, set_quiet
from .tokens import TokenStore

__all__ = ["RayOptions", "run_shards", "shard_ranges", "ShardWorker", "release_workers",
           "require_ray", "model_job", "SHARDS_PER_WORKER", "MAX_RETRIES", "FAULT_ENV"]

#: Shards per worker and pass: enough for load balancing and fine-grained resume, few enough
#: that each shard amortises its buffers and the transfer of its state.
SHARDS_PER_WORKER = 4
#: Times a failed shard is submitted again before the run stops (finished shards are kept).
MAX_RETRIES = 3
#: Test hook, read by the workers: a folder in which a file ``{tag}.shard{c0}.raise`` makes the
#: worker starting that shard raise once, ``.exit`` kill its process once, and ``.hang`` block
#: while the file exists.
FAULT_ENV = "UNINEURONS_TEST_SHARD_FAULT"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how many workers: the stage config's ``--ray-address`` / ``--workers`` /
    ``--cpus-per-worker``, and whether each worker needs a GPU (``--device cuda``)."""

    address: str | None
    workers: int
    cpus_per_worker: int
    gpu: bool

    @classmethod
    def of(cls, cfg) -> RayOptions:
        return cls(cfg.ray_address, cfg.workers, cfg.cpus_per_worker, cfg.device.startswith("cuda"))


def require_ray():
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UnineuronsError(
            "--backend ray needs Ray, which is not installed: pip install 'unineurons[ray]' "
            "(or pip install 'ray>=2.40,<3'), on the driver and on every node of the cluster"
        ) from None
    return ray


def shard_ranges(start: int, stop: int, done: list[tuple[int, int]], n_shards: int
                 ) -> list[tuple[int, int]]:
    """Context ranges ``[c0, c1)`` that cover ``[start, stop)`` minus the ``done`` ranges, in
    order, each gap cut into near-equal pieces of at most ``ceil(remaining / n_shards)``."""
    gaps, at = [], start
    for c0, c1 in sorted(done):
        if c0 > at:
            gaps.append((at, c0))
        at = max(at, c1)
    if at < stop:
        gaps.append((at, stop))
    remaining = sum(b - a for a, b in gaps)
    if remaining == 0:
        return []
    size = -(-remaining // max(1, n_shards))
    out = []
    for a, b in gaps:
        pieces = -(-(b - a) // size)
        edges = [a + (b - a) * i // pieces for i in range(pieces + 1)]
        out += list(zip(edges[:-1], edges[1:], strict=True))
    return out


def model_job(models: list[LoadedModel], tokens: str | Path, device: str) -> dict:
    """The part of a job every shard function shares: where the models and the token store
    are (local paths made absolute: workers run in other folders; hub ids as given), and the
    hashes a worker checks them against."""
    store = TokenStore.open(tokens, verify=False)
    locs = []
    for m in models:
        ms = getattr(m, "spec", None) or parse_model_spec(m.name)  # where it was loaded from
        locs.append(str(Path(ms.location).resolve()) if ms.local else m.name)
    return {"locations": locs, "specs": [m.name for m in models],
            "weights": [m.weights_sha256 for m in models], "tokens": str(Path(tokens).resolve()),
            "token_sha256": store.manifest.get("sha256"),
            "device": "cuda" if device.startswith("cuda") else "cpu"}  # Ray assigns the GPU


def _inject_fault(tag: str, c0: int) -> None:
    root = os.environ.get(FAULT_ENV)
    if not root:
        return
    name = f"{tag}.shard{c0}"
    if (f := Path(root) / f"{name}.raise").exists():
        f.unlink()
        raise RuntimeError(f"injected fault in shard {c0} of {tag}")
    if (f := Path(root) / f"{name}.exit").exists():
        f.unlink()
        os._exit(1)
    while (Path(root) / f"{name}.hang").exists():
        time.sleep(0.05)


class ShardWorker:
    """What one Ray actor runs. Plain Python: tests also run it in-process, without Ray.

    :meth:`run` calls a stage's shard function, named ``"unineurons.module:function"`` by the
    driver, as ``fn(worker, job, c0, c1, **extra) -> (state tensors, metadata)``. The function
    gets its models and token store from :meth:`load`, which checks their hashes against the
    driver's (a node that sees other files must not add wrong numbers) and keeps them while
    the job's files stay the same.
    """

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._key: str | None = None
        self.models: list[LoadedModel] = []
        self.store: TokenStore | None = None
        self._memo: dict = {}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per key while the job's files stay the same."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def load(self, job: dict) -> tuple[list[LoadedModel], TokenStore]:
        key = json.dumps({k: job[k] for k in ("locations", "weights", "tokens", "token_sha256",
                                              "device")}, sort_keys=True)
        if key == self._key and self.store is not None:
            return self.models, self.store
        set_quiet(True)
        torch.set_num_threads(self.threads)
        self._key, self.models, self.store = None, [], None  # drop the last job's models first
        self._memo = {}
        node = socket.gethostname()
        models = []
        for loc, spec, sha in zip(job["locations"], job["specs"], job["weights"], strict=True):
            try:
                m = load_model(loc, device=job["device"], with_tokenizer=False)
            except UnineuronsError as e:
                raise UnineuronsError(f"on Ray node {node}: {e} (every node must reach the models: "
                                      "a shared filesystem or hub ids)") from None
            if m.weights_sha256 != sha:
                raise UnineuronsError(
                    f"on Ray node {node}: model {spec} at {loc} has other weights than on the driver "
                    f"(sha256 {m.weights_sha256[:12]} != {sha[:12]}); every node must see the same files"
                )
            models.append(m)
        store = TokenStore.open(job["tokens"])
        if store.manifest.get("sha256") != job["token_sha256"]:
            raise UnineuronsError(f"on Ray node {node}: token store {job['tokens']} differs from the "
                                  "driver's (sha256); every node must see the same store")
        self.models, self.store, self._key = models, store, key
        return models, store

    def run(self, task: str, job: dict, tag: str, c0: int, c1: int, extra: dict) -> bytes:
        """Run shard function ``task`` on contexts ``[c0, c1)``; its state as safetensors bytes
        (metadata: the function's, plus the config hash, tag, range, node, wall and CPU s)."""
        _inject_fault(tag, c0)
        t0, cpu0 = time.time(), time.process_time()
        module, _, name = task.partition(":")
        if not module.startswith("unineurons."):  # the driver names only our own functions
            raise ValueError(f"not a unineurons shard function: {task}")
        fn = getattr(importlib.import_module(module), name)
        with torch.inference_mode():
            state, meta = fn(self, job, c0, c1, **extra)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        meta = {**{k: str(v) for k, v in meta.items()}, "config_hash": job["config_hash"],
                "tag": tag, "c0": str(c0), "c1": str(c1), "node": socket.gethostname(),
                "seconds": f"{time.time() - t0:.3f}", "cpu_seconds": f"{time.process_time() - cpu0:.3f}"}
        return save(state, metadata=meta)


# ---- the driver ------------------------------------------------------------------------------

class _Pool:
    def __init__(self, key: tuple, actors: list):
        self.key, self.actors = key, actors


_POOL: _Pool | None = None


def release_workers() -> None:
    """End the worker actors of this process (a stage does after its last shards)."""
    global _POOL
    if _POOL is not None:
        import ray

        for a in _POOL.actors:
            with contextlib.suppress(Exception):  # already gone with its cluster
                ray.kill(a)
    _POOL = None


def _connect(ray, opts: RayOptions) -> None:
    if ray.is_initialized():
        return
    kwargs: dict = {"address": opts.address, "logging_level": logging.WARNING}
    if opts.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a private local instance
    try:
        ray.init(**kwargs)
    except Exception as e:  # Ray raises several types for a bad address
        where = opts.address or "a local instance"
        raise UnineuronsError(
            f"cannot start or join the Ray cluster ({where}): {str(e).splitlines()[0]}; start one "
            "with `ray start --head` and pass --ray-address HOST:PORT (or auto)"
        ) from None


def _pool(ray, opts: RayOptions) -> _Pool:
    global _POOL
    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), ctx.get_node_id(), opts.workers, opts.cpus_per_worker, opts.gpu)
    if _POOL is not None and _POOL.key == key:
        return _POOL
    release_workers()
    res = ray.cluster_resources()
    if res.get("CPU", 0) < opts.workers * opts.cpus_per_worker or (opts.gpu and res.get("GPU", 0) < opts.workers):
        raise UnineuronsError(
            f"the Ray cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs; --workers "
            f"{opts.workers} x --cpus-per-worker {opts.cpus_per_worker}{' and one GPU each' if opts.gpu else ''} "
            "do not fit: lower them or add nodes"
        )
    # restarts are unbounded here: the driver's per-shard retry count is the bound
    cls = ray.remote(ShardWorker).options(num_cpus=opts.cpus_per_worker, num_gpus=1 if opts.gpu else 0,
                                          max_restarts=-1, max_task_retries=0)
    _POOL = _Pool(key, [cls.remote(opts.cpus_per_worker) for _ in range(opts.workers)])
    return _POOL


def _finished_shards(state_dir: Path, chash: str, tag: str, cursor: int, stop: int
                     ) -> dict[tuple[int, int], Path]:
    """Shard files of ``tag`` past ``cursor`` from an earlier attempt; other shard files in
    ``state_dir`` are deleted (earlier passes, or ranges the checkpoint already holds)."""
    found = {}
    for f in sorted(state_dir.glob("*.shard*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata() or {}
            c0, c1 = int(meta["c0"]), int(meta["c1"])
            ok = meta.get("config_hash") == chash and meta.get("tag") == tag and cursor <= c0 < c1 <= stop
        except Exception:  # a damaged file is simply recomputed
            ok = False
        if ok:
            found[(c0, c1)] = f
        else:
            f.unlink()
    return found


def _cause(e: Exception) -> tuple[BaseException, str]:
    """The exception raised in the worker (Ray wraps it) and a one-line description."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return cause, f"{type(cause).__name__}: {text[0] if text else ''}"


#: Called with each shard's open safetensors file (``get_tensor``, ``keys``, ``metadata``).
Merge = Callable[[Any], None]


def run_shards(opts: RayOptions, *, task: str, job: dict, extra: dict, tag: str, state_dir: Path,
               start: int, stop: int, ctx: int, merge: Merge,
               checkpoint: Callable[[int], None] | None, checkpoint_tokens: int, desc: str,
               release: bool = True, rerun: str = "rerun the same command with --resume") -> dict:
    """Stream contexts ``[start, stop)`` as shards of ``task`` on Ray workers.

    ``merge(file)`` receives each shard's open state file in context order; every
    ``checkpoint_tokens`` merged tokens ``checkpoint(cursor)`` saves the merged prefix and the
    shard files it holds are deleted (``checkpoint=None``: the caller deletes them when done;
    until then a rerun reuses them). ``job``
    must hold ``config_hash`` (shard files of another hash are never merged) and
    :func:`model_job`'s keys. ``release``: end the workers afterwards (the last call of a
    stage; idle actors would keep their CPUs and GPUs reserved). ``rerun``: how the user
    continues after a failure. Returns statistics for the manifest.
    """
    ray = require_ray()
    _connect(ray, opts)
    t0, cursor = time.time(), start
    chash = job["config_hash"]
    files = _finished_shards(state_dir, chash, tag, start, stop)
    todo = shard_ranges(start, stop, list(files), opts.workers * SHARDS_PER_WORKER)
    layout = sorted([*files, *todo])
    merged: list[Path] = []  # merged shard files the checkpoint does not hold yet
    since = 0

    def advance() -> None:
        """Merge the finished shards that continue the prefix; checkpoint now and then."""
        nonlocal cursor, since
        while layout and layout[0] in files:
            rng = layout.pop(0)
            path = files.pop(rng)
            with safe_open(str(path), framework="pt") as fh:
                merge(fh)
            cursor = rng[1]
            since += (rng[1] - rng[0]) * ctx
            merged.append(path)
        if checkpoint is not None and since >= checkpoint_tokens and cursor < stop:
            checkpoint(cursor)
            for f in merged:
                f.unlink()
            merged.clear()
            since = 0

    stats = {"shards": len(layout), "loaded_shards": len(files), "computed_shards": 0, "retries": 0,
             "start_context": start, "worker_seconds": 0.0, "worker_cpu_seconds": 0.0}
    failure: str | None = None
    queue = deque(todo)
    attempts: dict[tuple[int, int], int] = {}
    inflight: dict = {}  # ObjectRef -> (actor, range)
    with progress(f"{desc} on {opts.workers} Ray worker(s)", total=stop * ctx) as bar:
        bar.advance((start + sum(b - a for a, b in files)) * ctx)
        advance()
        if queue:
            pool = _pool(ray, opts)
            job_ref = ray.put(job)  # once, not with every shard
            idle = list(pool.actors)
        try:
            while queue or inflight:
                while queue and idle:
                    actor, rng = idle.pop(0), queue.popleft()
                    ref = actor.run.remote(task, job_ref, tag, *rng, extra)
                    inflight[ref] = (actor, rng)
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, rng = inflight.pop(ref)
                idle.append(actor)
                try:
                    data = ray.get(ref)
                except Exception as e:  # any failure of the task or its actor
                    cause, text = _cause(e)
                    if isinstance(cause, UnineuronsError):  # wrong files on a node: no retry helps
                        raise UnineuronsError(str(cause)) from None
                    if failure:  # stopping: the others' failures need no retry either
                        continue
                    attempts[rng] = attempts.get(rng, 0) + 1
                    if attempts[rng] > MAX_RETRIES:
                        failure = f"contexts [{rng[0]}, {rng[1]}) failed {attempts[rng]} times ({text})"
                        queue.clear()  # let the running shards finish and be saved, start no more
                    else:
                        _log.warning("shard [%d, %d) of %s failed (%s); retrying", *rng, tag, text)
                        stats["retries"] += 1
                        queue.appendleft(rng)
                    continue
                path = state_dir / f"{tag}.shard{rng[0]}-{rng[1]}.safetensors"
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata()
                files[rng] = path
                del data
                stats["computed_shards"] += 1
                stats["worker_seconds"] += float(meta["seconds"])
                stats["worker_cpu_seconds"] += float(meta["cpu_seconds"])
                bar.advance((rng[1] - rng[0]) * ctx)
                advance()
        except BaseException:
            release_workers()  # also ends tasks still running on the actors
            raise
    if failure or release:
        release_workers()
    if failure:
        raise UnineuronsError(
            f"{desc} on Ray: {failure}; the finished shards are saved in {state_dir}: "
            f"fix the cause and {rerun}"
        )
    stats["seconds"] = round(time.time() - t0, 3)
    stats["worker_seconds"] = round(stats["worker_seconds"], 3)
    stats["worker_cpu_seconds"] = round(stats["worker_cpu_seconds"], 3)
    return stats
