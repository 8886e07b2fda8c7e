"""The token pass of ``unineurons analyze``: its accumulators, checkpoints and Ray shards.

One pass over the tokens feeds every model of the run (``activation_stream`` with
pre-activations) into :class:`AnalyzeState`: per model :class:`~unineurons.accumulators.Moments`
of the activation and the pre-activation and :class:`~unineurons.accumulators.TopK` on every
neuron, and the family statistics (:class:`~unineurons.analyses.families.FamilyStats`) on a
neuron subset. All of them merge, so the pass

- checkpoints every ``checkpoint_tokens`` into ``RUN/state/analyze/checkpoint.safetensors``
  (state + context cursor), and ``--resume`` continues from there with the same numbers as an
  uninterrupted run (the same batches in the same order: bitwise);
- runs as token shards on Ray workers with ``--backend ray`` (:mod:`unineurons.sharding`):
  each worker streams ``contexts[c0:c1]`` into a fresh state; the driver merges the states in
  context order (float64 Pébay / Chan merges: equal to the local pass to rounding; TopK
  exactly, since ties break on the token-store row).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..accumulators import Moments, TopK
from ..errors import UnineuronsError
from ..io import load_checkpoint, save_checkpoint
from ..models.load import LoadedModel
from ..progress import progress
from ..rundir import RunDir
from ..stream import MaskConfig, StreamBatch, activation_stream
from .families import FamilyFeatures, FamilyStats

__all__ = ["AnalyzeState", "accumulate", "analyze_hash", "analyze_shard", "TASK", "STATE_DIR"]

#: The shard function Ray workers run.
TASK = "unineurons.analyses.analyze_pass:analyze_shard"
#: The pass's resumable state, under the run's state folder.
STATE_DIR = "analyze"
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class _ModelAcc:
    act: Moments
    pre: Moments
    top: TopK
    subset: torch.Tensor  #: [d_sub] flat indices of the family statistics
    fam: FamilyStats | None

    def parts(self) -> dict:
        return {"act": self.act, "pre": self.pre, "top": self.top,
                **({"fam": self.fam} if self.fam is not None else {})}


class AnalyzeState:
    """The pass's accumulators for ``models`` (one :class:`_ModelAcc` each)."""

    def __init__(self, models: Sequence[LoadedModel], feats: FamilyFeatures,
                 subsets: Sequence[np.ndarray], ctx: int, top_k: int, device: str | torch.device):
        self.feats, self.subsets, self.ctx, self.top_k = feats, subsets, ctx, top_k
        self.dims = [m.adapter.n_layers * m.adapter.d_mlp for m in models]
        self.device = torch.device(device)
        self.accs = [self._acc(n, sub) for n, sub in zip(self.dims, subsets, strict=True)]

    def _acc(self, n: int, sub: np.ndarray) -> _ModelAcc:
        dev = self.device
        return _ModelAcc(act=Moments(n, device=dev), pre=Moments(n, device=dev),
                         top=TopK(n, self.top_k, dev), subset=torch.from_numpy(sub).to(dev),
                         fam=FamilyStats(self.feats, len(sub), self.ctx, dev) if len(sub) else None)

    def update(self, batch: StreamBatch) -> None:
        labels = None  # the features of the batch: the same for every model
        for acc, a, p in zip(self.accs, batch.acts, batch.pre_acts or [], strict=True):
            acc.act.update(a)  # a, p: [n, L*d_mlp]
            acc.pre.update(p)
            acc.top.update(a, batch.rows, batch.positions)
            if acc.fam is not None:
                if labels is None:
                    labels = acc.fam.batch_labels(batch)
                acc.fam.update(a[:, acc.subset], p[:, acc.subset] > 0, labels, batch.positions)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys ``{model index}.{act|pre|top|fam}.{name}``."""
        return {f"{i}.{part}.{k}": v for i, acc in enumerate(self.accs)
                for part, a in acc.parts().items() for k, v in a.state_dict().items()}

    def _loaded(self, get: Callable[[str], torch.Tensor], keys: Sequence[str]) -> list[_ModelAcc]:
        out = []
        for i, (n, sub) in enumerate(zip(self.dims, self.subsets, strict=True)):
            acc = self._acc(n, sub)
            for part, a in acc.parts().items():
                pre = f"{i}.{part}."
                a.load_state_dict({k[len(pre):]: get(k) for k in keys if k.startswith(pre)})
            out.append(acc)
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.accs = self._loaded(state.__getitem__, list(state))

    def merge_from(self, get: Callable[[str], torch.Tensor], keys: Sequence[str]) -> None:
        """Merge a saved state (read tensor by tensor with ``get``) into this one."""
        for acc, other in zip(self.accs, self._loaded(get, keys), strict=True):
            for part, a in acc.parts().items():
                a.merge(other.parts()[part])


def analyze_hash(cfg, models: Sequence[LoadedModel], tokens_info: dict,
                 subsets: Sequence[np.ndarray], feats: FamilyFeatures, mask: MaskConfig) -> str:
    """What the pass's numbers depend on: not the device, backend or checkpoint interval."""
    d = cfg.model_dump(mode="json", exclude={"device", "checkpoint_tokens", "backend", "ray_address",
                                             "workers", "cpus_per_worker"})
    d.update(weights=[m.weights_sha256 for m in models], tokens=tokens_info.get("sha256"),
             n_contexts=tokens_info.get("n_contexts"), mask=vars(mask),
             subsets=[hashlib.sha256(np.ascontiguousarray(s, dtype=np.int64).tobytes()).hexdigest()
                      for s in subsets],
             unigram=[int(i) for i in feats.unigram_ids], classes=[f.name for f in feats.classes])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def state_dir(run: RunDir) -> Path:
    path = run.state_dir / STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_state(run: RunDir) -> None:
    """Delete the pass's checkpoint and shard files (the tables hold the results now)."""
    for f in state_dir(run).glob("*.safetensors"):
        f.unlink()


def accumulate(run: RunDir, models: Sequence[LoadedModel], contexts: np.ndarray, special: dict,
               feats: FamilyFeatures, subsets: Sequence[np.ndarray], cfg, mask: MaskConfig,
               tokens_info: dict, *, resume: bool) -> AnalyzeState:
    """The pass over ``contexts``: from a checkpoint with ``resume``, locally or on Ray."""
    n_ctx, ctx = contexts.shape
    chash = analyze_hash(cfg, models, tokens_info, subsets, feats, mask)
    st = AnalyzeState(models, feats, subsets, ctx, cfg.top_k, cfg.driver_device)
    folder = state_dir(run)
    ckpt = folder / CHECKPOINT
    cursor = 0
    if resume and ckpt.is_file():
        saved, prog = load_checkpoint(
            ckpt, chash, "analyze checkpoint",
            f"run {run.path} holds an unfinished analyze pass of a different configuration "
            f"(models, tokens, neurons or options changed); rerun the same command, or delete "
            f"{folder} to start over")
        st.load(saved)
        cursor = int(prog["cursor"])
    elif not resume and (ckpt.is_file() or any(folder.glob("*.shard*.safetensors"))):
        # like correlate: an interrupted pass is never thrown away silently
        raise UnineuronsError(
                f"run {run.path} holds an unfinished analyze pass; add --resume to continue it, or "
            f"delete {folder} to start over")

    def checkpoint(at: int) -> None:
        save_checkpoint(ckpt, st.state_dict(), {"config_hash": chash, "cursor": at})

    if cfg.backend == "ray":
        from ..sharding import RayOptions, model_job, run_shards

        job = {**model_job(models, tokens_info["path"], cfg.device), "config_hash": chash,
               **shard_job(cfg, feats, subsets, mask, n_ctx)}
        stats = run_shards(RayOptions.of(cfg), task=TASK, job=job, extra={}, tag="analyze",
                           state_dir=folder, start=cursor, stop=n_ctx, ctx=ctx,
                           merge=lambda fh: st.merge_from(fh.get_tensor, list(fh.keys())),
                           checkpoint=checkpoint, checkpoint_tokens=cfg.checkpoint_tokens,
                           desc="analyze")
        run.update_manifest(analyze_ray={"address": cfg.ray_address, "workers": cfg.workers,
                                         "cpus_per_worker": cfg.cpus_per_worker, **stats})
        return st
    since = 0
    with progress("analyze", n_ctx * ctx, unit="tokens") as bar:
        bar.advance(cursor * ctx)
        for batch in activation_stream(models, contexts, special, batch_size=cfg.batch_size,
                                       start=cursor, mask=mask, pre_activation=True, device=cfg.device):
            st.update(batch)
            bar.advance(batch.n_contexts * ctx)
            since += batch.n_contexts * ctx
            end = batch.start + batch.n_contexts
            if since >= cfg.checkpoint_tokens and end < n_ctx:
                checkpoint(end)
                since = 0
    return st


# ---- the worker side -------------------------------------------------------------------------

def shard_job(cfg, feats: FamilyFeatures, subsets: Sequence[np.ndarray], mask: MaskConfig,
              n_ctx: int) -> dict:
    """What a worker needs besides the models: the config (file options as absolute paths:
    workers run in other folders), the feature lists and neuron subsets the driver fixed."""
    d = cfg.model_dump(mode="json")
    for key in ("token_classes", "feature_modules"):
        d[key] = [str(Path(p).resolve()) for p in d[key]]
    d["neurons"] = "all"  # the driver chose them: the subsets below (a FILE may not be there)
    return {"cfg": d, "unigram_ids": [int(i) for i in feats.unigram_ids],
            "classes": [f.name for f in feats.classes], "mask": vars(mask), "n_contexts": n_ctx,
            "subsets": [[int(i) for i in s] for s in subsets]}


def analyze_shard(worker, job: dict, c0: int, c1: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Stream contexts ``[c0, c1)`` into a fresh :class:`AnalyzeState`."""
    from ..features import get_features, load_feature_module, token_class_from_file
    from .analyze import AnalyzeConfig, _vocabulary

    models, store = worker.load(job)
    cfg = AnalyzeConfig(**job["cfg"])
    for path in cfg.feature_modules:
        load_feature_module(path)
    classes = get_features(cfg.features, [token_class_from_file(p) for p in cfg.token_classes])
    if [f.name for f in classes] != job["classes"]:
        raise UnineuronsError("a Ray worker sees other token features than the driver (another "
                              "unineurons version or feature module on that node)")
    special = store.manifest["tokenizer"]
    # decoding the vocabulary once per job, not per shard
    vocab = worker.memo(("vocabulary", job["tokens"]), lambda: _vocabulary(special, models)[0])
    feats = FamilyFeatures(vocab=vocab, unigram_ids=np.asarray(job["unigram_ids"], dtype=np.int64),
                           classes=tuple(classes))
    subsets = [np.asarray(s, dtype=np.int64) for s in job["subsets"]]
    contexts = store.contexts(job["n_contexts"] * store.ctx)
    st = AnalyzeState(models, feats, subsets, store.ctx, cfg.top_k, job["device"])
    for batch in activation_stream(models, contexts[:c1], special, batch_size=cfg.batch_size, start=c0,
                                   mask=MaskConfig(**job["mask"]), pre_activation=True,
                                   device=job["device"]):
        st.update(batch)
    return st.state_dict(), {}
