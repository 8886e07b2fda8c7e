"""The correlate stage on a Ray cluster: each pass of the plan as token shards.

``run_correlate`` calls :func:`ray_pass` for each pass of its plan when ``backend == "ray"``.
The shared driver (:func:`unineurons.sharding.run_shards`) runs :func:`correlate_shard` on
the workers: the local path's own code (``engine._folds`` into a fresh ``_PassState``) over
one shard. The driver merges the shards' pass states in context order into the pass state
and saves the merged prefix as the ordinary checkpoint (``state/checkpoint.safetensors``), so
a checkpoint from either backend resumes on either. Shard files are
``RUN/state/pass{p}.shard{c0}-{c1}.safetensors``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..accumulators.comoments import batch_matmul_dtype
from ..io import save_checkpoint
from ..models.load import LoadedModel
from ..rundir import RunDir
from ..sharding import SHARDS_PER_WORKER, RayOptions, ShardWorker, model_job, run_shards
from ..stream import MaskConfig, activation_stream
from .config import CorrelateConfig
from .engine import CHECKPOINT, _folds, _PassState, _save_checkpoint, segments
from .plan import ModelShape, Unit

__all__ = ["ray_pass", "correlate_job", "correlate_shard", "TASK"]

#: The shard function the workers run.
TASK = "unineurons.correlate.distributed:correlate_shard"


def correlate_job(cfg: CorrelateConfig, models: list[LoadedModel], shapes: list[ModelShape],
                  accumulate: int, chash: str) -> dict:
    """Everything a worker needs for this run's shards, as plain data."""
    return {**model_job(models, cfg.tokens, cfg.device), "cfg": cfg.model_dump(mode="json"),
            "accumulate": accumulate, "config_hash": chash,
            "shapes": [dataclasses.asdict(s) for s in shapes]}


def correlate_shard(worker: ShardWorker, job: dict, c0: int, c1: int, *, units: list[dict],
                    fresh_layercov: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Stream contexts ``[c0, c1)`` into a fresh state of the pass's ``units``: the state and
    the kept-token count."""
    models, store = worker.load(job)
    cfg = CorrelateConfig(**job["cfg"])
    if cfg.dtype == "tf32" and job["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shapes = [ModelShape(**s) for s in job["shapes"]]
    cdtype = batch_matmul_dtype(cfg.dtype)
    halves = 2 if cfg.split_half else 1
    st = _PassState([Unit(**u) for u in units], shapes, job["device"], cdtype,
                    None if fresh_layercov else [], halves)
    need = st.models_needed(len(models))
    mask = MaskConfig(cfg.drop_bos, cfg.drop_eos, cfg.drop_pad, cfg.drop_newline)
    contexts = store.contexts(cfg.n_tokens)
    kept = 0
    for s0, s1, half in segments(c0, c1, contexts.shape[0], halves):  # a shard may cross the split
        stream = activation_stream([models[i] for i in need], contexts[:s1],
                                   store.manifest["tokenizer"], batch_size=cfg.batch_size,
                                   start=s0, mask=mask, device=job["device"])
        kept += sum(n for _, n, _ in _folds(stream, s1, need, st, shapes, cdtype,
                                            job["accumulate"], half))
    st.release_work()
    return st.state_dict(), {"kept": kept}


def ray_pass(run: RunDir, cfg: CorrelateConfig, st: _PassState, models: list[LoadedModel],
             shapes: list[ModelShape], contexts, accumulate: int, *, cursor: int, kept: int,
             pass_index: int, n_passes: int, chash: str) -> tuple[int, int]:
    """Stream contexts ``[cursor:]`` on Ray workers and merge them into ``st`` (which holds
    ``[:cursor]``); returns ``(n_contexts, kept tokens)`` like the local ``_stream_pass``."""
    n_ctx, ctx = contexts.shape
    p = pass_index
    ckpt = run.state_dir / CHECKPOINT
    if not ckpt.is_file():  # so a killed run is refused without --resume, as a local one is
        save_checkpoint(ckpt, {}, {"config_hash": chash, "pass": p, "cursor": cursor,
                                   "kept_tokens": kept, "plan": st.plan_key})
    total = {"kept": kept}

    def merge(fh) -> None:
        st.merge_from(fh.get_tensor)
        if p == 0:  # later passes stream the same tokens again
            total["kept"] += int(fh.metadata()["kept"])

    def checkpoint(at: int) -> None:
        _save_checkpoint(run, st, {"config_hash": chash, "pass": p, "cursor": at,
                                   "kept_tokens": total["kept"]})

    job = correlate_job(cfg, models, shapes, accumulate, chash)
    extra = {"units": [dataclasses.asdict(u) for u in st.units], "fresh_layercov": st.fresh_layercov}
    stats = run_shards(RayOptions.of(cfg), task=TASK, job=job, extra=extra, tag=f"pass{p}",
                       state_dir=run.state_dir, start=cursor, stop=n_ctx, ctx=ctx, merge=merge,
                       checkpoint=checkpoint, checkpoint_tokens=cfg.checkpoint_tokens,
                       desc=f"correlate pass {p + 1}/{n_passes}", release=p == n_passes - 1)
    sec = run.manifest().get("correlate_ray", {})
    passes = {**sec.get("passes", {}), str(p): stats}
    run.update_manifest(correlate_ray={"address": cfg.ray_address, "workers": cfg.workers,
                                       "cpus_per_worker": cfg.cpus_per_worker,
                                       "shards_per_worker": SHARDS_PER_WORKER,
                                       "passes": passes})
    return n_ctx, total["kept"]
