"""The correlate stage on a Ray cluster: token shards out, accumulator states back.

``run_correlate`` calls :func:`ray_pass` for each pass of its plan when ``backend == "ray"``.
The contexts the pass still has to stream are split into contiguous shards (about
``workers x SHARDS_PER_WORKER``). A pool of Ray actors, one per worker, each holding the
run's models (loaded once, kept across the passes of a run), streams a shard
through the local path's own code (``engine._folds`` into a fresh ``_PassState``) and returns
the state as the bytes of a safetensors file: no pickle, and the bytes are the shard file.

The driver saves every finished shard atomically (``RUN/state/pass{p}.shard{c0}-{c1}
.safetensors``, contexts ``[c0, c1)``) and merges shards into the pass state in context order,
whatever order they finish in: the result is deterministic for a given shard layout. A merged
prefix becomes the ordinary checkpoint (``state/checkpoint.safetensors`` with its cursor), and
the shard files it covers are deleted, so a checkpoint from either backend resumes on either.
On resume, finished shards past the checkpoint are loaded, not recomputed; only the gaps are
split again. A shard that fails (an exception, or its worker process dying: Ray restarts the
actor) is submitted again, up to ``MAX_RETRIES`` times.

Why merge in order rather than as a tree: a tree over K shards holds log2 K pass states at
once on the driver (a GPT-2-small pair is 10.9 GB each) and saves nothing, since every merge
runs on the driver anyway; Chan's float64 merge makes the order irrelevant to accuracy.

Ray is imported only here and only when this backend runs: the package works without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..accumulators.comoments import batch_matmul_dtype
from ..errors import UnineuronsError
from ..io import atomic_path, save_tensors
from ..models.load import LoadedModel, load_model, parse_model_spec
from ..progress import progress, set_quiet
from ..rundir import RunDir
from ..stream import MaskConfig, activation_stream
from ..tokens import TokenStore
from .config import CorrelateConfig
from .engine import CHECKPOINT, _folds, _PassState, _save_checkpoint
from .plan import ModelShape, Unit

__all__ = ["ray_pass", "shard_ranges", "ShardWorker", "release_workers", "require_ray",
           "SHARDS_PER_WORKER", "MAX_RETRIES", "FAULT_ENV"]

#: Shards per worker and pass: enough for load balancing and fine-grained resume, few enough
#: that each shard amortises its fold buffers and the transfer of its state.
SHARDS_PER_WORKER = 4
#: Times a failed shard is submitted again before the run stops (finished shards are kept).
MAX_RETRIES = 3
#: Test hook, read by the workers: a folder in which a file ``pass{p}.shard{c0}.raise`` makes
#: the worker starting that shard raise once, ``.exit`` kill its process once, and ``.hang``
#: block while the file exists.
FAULT_ENV = "UNINEURONS_TEST_SHARD_FAULT"

_log = logging.getLogger(__name__)


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


def _inject_fault(pass_index: int, c0: int) -> None:
    root = os.environ.get(FAULT_ENV)
    if not root:
        return
    name = f"pass{pass_index}.shard{c0}"
    if (f := Path(root) / f"{name}.raise").exists():
        f.unlink()
        raise RuntimeError(f"injected fault in shard {c0} of pass {pass_index}")
    if (f := Path(root) / f"{name}.exit").exists():
        f.unlink()
        os._exit(1)
    while (Path(root) / f"{name}.hang").exists():
        time.sleep(0.05)


class ShardWorker:
    """What one Ray actor runs. Plain Python: tests also run it in-process, without Ray.

    ``job`` (JSON-able, built by the driver) names the config, where every model and the
    token store are, and their expected hashes; the worker loads them on first use, checks
    the hashes (a node that sees other files must not add wrong numbers) and keeps them while
    the job stays the same.
    """

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._job_key: str | None = None
        self.models: list[LoadedModel] = []

    def _setup(self, job: dict) -> None:
        key = json.dumps({k: job[k] for k in ("cfg", "locations", "weights", "tokens")}, sort_keys=True)
        if key == self._job_key:
            return
        set_quiet(True)
        torch.set_num_threads(self.threads)
        self._job_key, self.models = None, []  # drop the last job's models first
        cfg = CorrelateConfig(**job["cfg"])
        self.device = "cuda" if cfg.device.startswith("cuda") else "cpu"  # Ray assigns the GPU
        if cfg.dtype == "tf32" and self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        node = socket.gethostname()
        models = []
        for loc, spec, sha in zip(job["locations"], cfg.models, job["weights"], strict=True):
            try:
                m = load_model(loc, device=self.device, with_tokenizer=False)
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
        self.cfg, self.models, self.store = cfg, models, store
        self.contexts = store.contexts(cfg.n_tokens)
        self.shapes = [ModelShape(**s) for s in job["shapes"]]
        self._job_key = key

    @torch.inference_mode()
    def run_shard(self, job: dict, pass_index: int, units: list[dict], fresh_layercov: bool,
                  c0: int, c1: int) -> bytes:
        """Stream contexts ``[c0, c1)`` into a fresh state of the pass's ``units``; return it
        as safetensors bytes (metadata: ``kept`` tokens, the range, the node, wall and CPU
        seconds)."""
        _inject_fault(pass_index, c0)
        t0, cpu0 = time.time(), time.process_time()
        self._setup(job)
        cfg = self.cfg
        cdtype = batch_matmul_dtype(cfg.dtype)
        st = _PassState([Unit(**u) for u in units], self.shapes, self.device, cdtype,
                        None if fresh_layercov else [])
        need = st.models_needed(len(self.models))
        mask = MaskConfig(cfg.drop_bos, cfg.drop_eos, cfg.drop_pad, cfg.drop_newline)
        stream = activation_stream([self.models[i] for i in need], self.contexts[c0:c1],
                                   self.store.manifest["tokenizer"], batch_size=cfg.batch_size,
                                   mask=mask, device=self.device)
        kept = sum(n for _, n, _ in _folds(stream, c1 - c0, need, st, self.shapes, cdtype,
                                            job["accumulate"]))
        state = {k: v.detach().to("cpu").contiguous() for k, v in st.state_dict().items()}
        meta = {"config_hash": job["config_hash"], "pass": str(pass_index), "c0": str(c0),
                "c1": str(c1), "kept": str(kept), "node": socket.gethostname(),
                "seconds": f"{time.time() - t0:.3f}", "cpu_seconds": f"{time.process_time() - cpu0:.3f}"}
        return save(state, metadata=meta)


# ---- the driver ------------------------------------------------------------------------------

class _Pool:
    def __init__(self, key: tuple, actors: list):
        self.key, self.actors = key, actors


_POOL: _Pool | None = None


def release_workers() -> None:
    """End the worker actors of this process (``ray_pass`` does after a run's last pass)."""
    global _POOL
    if _POOL is not None:
        import ray

        for a in _POOL.actors:
            with contextlib.suppress(Exception):  # already gone with its cluster
                ray.kill(a)
    _POOL = None


def _connect(ray, cfg: CorrelateConfig) -> None:
    if ray.is_initialized():
        return
    kwargs: dict = {"address": cfg.ray_address, "logging_level": logging.WARNING}
    if cfg.ray_address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a private local instance
    try:
        ray.init(**kwargs)
    except Exception as e:  # Ray raises several types for a bad address
        where = cfg.ray_address or "a local instance"
        raise UnineuronsError(
            f"cannot start or join the Ray cluster ({where}): {str(e).splitlines()[0]}; start one "
            "with `ray start --head` and pass --ray-address HOST:PORT (or auto)"
        ) from None


def _pool(ray, cfg: CorrelateConfig) -> _Pool:
    global _POOL
    gpu = cfg.device.startswith("cuda")
    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), ctx.get_node_id(), cfg.workers, cfg.cpus_per_worker, gpu)
    if _POOL is not None and _POOL.key == key:
        return _POOL
    release_workers()
    res = ray.cluster_resources()
    if res.get("CPU", 0) < cfg.workers * cfg.cpus_per_worker or (gpu and res.get("GPU", 0) < cfg.workers):
        raise UnineuronsError(
            f"the Ray cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs; --workers "
            f"{cfg.workers} x --cpus-per-worker {cfg.cpus_per_worker}{' and one GPU each' if gpu else ''} "
            "do not fit: lower them or add nodes"
        )
    # restarts are unbounded here: the driver's per-shard retry count is the bound
    cls = ray.remote(ShardWorker).options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if gpu else 0,
                                          max_restarts=-1, max_task_retries=0)
    _POOL = _Pool(key, [cls.remote(cfg.cpus_per_worker) for _ in range(cfg.workers)])
    return _POOL


def _job(cfg: CorrelateConfig, models: list[LoadedModel], shapes: list[ModelShape],
         accumulate: int, chash: str) -> dict:
    """Everything a worker needs, as plain data: local paths made absolute (workers run in
    other folders), hub ids as given."""
    store = TokenStore.open(cfg.tokens, verify=False)
    locs = []
    for m in models:
        ms = parse_model_spec(m.name)
        locs.append(str(Path(ms.location).resolve()) if ms.local else m.name)
    return {"cfg": cfg.model_dump(mode="json"), "locations": locs,
            "weights": [m.weights_sha256 for m in models], "tokens": str(Path(cfg.tokens).resolve()),
            "token_sha256": store.manifest.get("sha256"), "accumulate": accumulate,
            "config_hash": chash, "shapes": [dataclasses.asdict(s) for s in shapes]}


def _shard_path(run: RunDir, p: int, c0: int, c1: int) -> Path:
    return run.state_dir / f"pass{p}.shard{c0}-{c1}.safetensors"


def _finished_shards(run: RunDir, chash: str, p: int, cursor: int, n_ctx: int
                     ) -> dict[tuple[int, int], tuple[Path, int]]:
    """Shard files of this pass past ``cursor`` from an earlier attempt; others are deleted
    (earlier passes, or ranges the checkpoint already holds)."""
    found = {}
    for f in sorted(run.state_dir.glob("pass*.shard*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata() or {}
            c0, c1 = int(meta["c0"]), int(meta["c1"])
            ok = (meta.get("config_hash") == chash and int(meta["pass"]) == p
                  and cursor <= c0 < c1 <= n_ctx)
        except Exception:  # a damaged file is simply recomputed
            ok = False
        if ok:
            found[(c0, c1)] = (f, int(meta["kept"]))
        else:
            f.unlink()
    return found


def _cause(e: Exception) -> tuple[BaseException, str]:
    """The exception raised in the worker (Ray wraps it) and a one-line description."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return cause, f"{type(cause).__name__}: {text[0] if text else ''}"


def ray_pass(run: RunDir, cfg: CorrelateConfig, st: _PassState, models: list[LoadedModel],
             shapes: list[ModelShape], contexts, accumulate: int, *, cursor: int, kept: int,
             pass_index: int, n_passes: int, chash: str) -> tuple[int, int]:
    """Stream contexts ``[cursor:]`` on Ray workers and merge them into ``st`` (which holds
    ``[:cursor]``); returns ``(n_contexts, kept tokens)`` like the local ``_stream_pass``."""
    ray = require_ray()
    _connect(ray, cfg)
    n_ctx, ctx = contexts.shape
    p, t0, start = pass_index, time.time(), cursor
    ckpt = run.state_dir / CHECKPOINT
    if not ckpt.is_file():  # so a killed run is refused without --resume, as a local one is
        save_tensors(ckpt, {}, metadata={"progress": json.dumps(
            {"config_hash": chash, "pass": p, "cursor": cursor, "kept_tokens": kept})})
    files = _finished_shards(run, chash, p, cursor, n_ctx)
    todo = shard_ranges(cursor, n_ctx, list(files), cfg.workers * SHARDS_PER_WORKER)
    layout = sorted([*files, *todo])
    loaded = len(files)
    merged: list[Path] = []  # merged shard files the checkpoint does not hold yet
    since = 0

    def advance() -> None:
        """Merge the finished shards that continue the prefix; checkpoint now and then."""
        nonlocal cursor, kept, since
        while layout and layout[0] in files:
            rng = layout.pop(0)
            path, k = files.pop(rng)
            with safe_open(str(path), framework="pt") as fh:
                st.merge_from(fh.get_tensor)
            cursor = rng[1]
            kept += k if p == 0 else 0
            since += (rng[1] - rng[0]) * ctx
            merged.append(path)
        if since >= cfg.checkpoint_tokens and cursor < n_ctx:
            _save_checkpoint(run, st, {"config_hash": chash, "pass": p, "cursor": cursor,
                                       "kept_tokens": kept})
            for f in merged:
                f.unlink()
            merged.clear()
            since = 0

    stats = {"shards": len(layout), "loaded_shards": loaded, "computed_shards": 0, "retries": 0,
             "start_context": start, "worker_seconds": 0.0, "worker_cpu_seconds": 0.0}
    failure: str | None = None
    queue = deque(todo)
    attempts: dict[tuple[int, int], int] = {}
    inflight: dict = {}  # ObjectRef -> (actor, range)
    with progress(f"correlate pass {p + 1}/{n_passes} on {cfg.workers} Ray worker(s)",
                  total=n_ctx * ctx) as bar:
        bar.advance((start + sum(b - a for a, b in files)) * ctx)
        advance()
        if queue:
            pool = _pool(ray, cfg)
            job = _job(cfg, models, shapes, accumulate, chash)
            units = [dataclasses.asdict(u) for u in st.units]
            idle = list(pool.actors)
        try:
            while queue or inflight:
                while queue and idle:
                    actor, rng = idle.pop(0), queue.popleft()
                    ref = actor.run_shard.remote(job, p, units, st.fresh_layercov, *rng)
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
                    attempts[rng] = attempts.get(rng, 0) + 1
                    if attempts[rng] > MAX_RETRIES:
                        failure = f"contexts [{rng[0]}, {rng[1]}) failed {attempts[rng]} times ({text})"
                        queue.clear()  # let the running shards finish and be saved, start no more
                    else:
                        _log.warning("shard [%d, %d) of pass %d failed (%s); retrying", *rng, p, text)
                        stats["retries"] += 1
                        queue.appendleft(rng)
                    continue
                path = _shard_path(run, p, *rng)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata()
                files[rng] = (path, int(meta["kept"]))
                del data
                stats["computed_shards"] += 1
                stats["worker_seconds"] += float(meta["seconds"])
                stats["worker_cpu_seconds"] += float(meta["cpu_seconds"])
                bar.advance((rng[1] - rng[0]) * ctx)
                advance()
        except BaseException:
            release_workers()  # also ends tasks still running on the actors
            raise
    if failure or p == n_passes - 1:
        # the workers live for one run: idle actors would keep their CPUs (GPUs) reserved
        release_workers()
    if failure:
        raise UnineuronsError(
            f"correlate pass {p + 1} on Ray: {failure}; the finished shards are saved in {run.state_dir}: "
            "fix the cause and rerun the same command with --resume"
        )
    stats["seconds"] = round(time.time() - t0, 3)
    stats["worker_seconds"] = round(stats["worker_seconds"], 3)
    stats["worker_cpu_seconds"] = round(stats["worker_cpu_seconds"], 3)
    sec = run.manifest().get("correlate_ray", {})
    passes = {**sec.get("passes", {}), str(p): stats}
    run.update_manifest(correlate_ray={"address": cfg.ray_address, "workers": cfg.workers,
                                       "cpus_per_worker": cfg.cpus_per_worker,
                                       "shards_per_worker": SHARDS_PER_WORKER, "passes": passes})
    return cursor, kept
