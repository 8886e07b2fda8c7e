"""Ablations on a Ray cluster: every patched configuration over token shards.

An ablation run costs one forward pass per neuron set and token (``ablate`` with the default
sizes: about a hundred sets), so with ``--backend ray`` the evaluation pass of
:func:`~unineurons.analyses.interventions.evaluate_patches` runs as token shards
(:mod:`unineurons.sharding`): each worker loads the model once and returns the clean and
per-patch :class:`~unineurons.analyses.interventions.LMMetrics` states of its contexts; the
driver adds them up in context order. The metrics are float64 sums, an integer rank
histogram and per-context sums (the paired bootstrap's unit), so the result equals the local
pass to float rounding (the rank statistics and the context ids exactly).

Shard files live in ``RUN/state/ablate/`` until the model's ablations are written; a rerun of
the same command after a crash loads the finished ones (their config hash covers the weights,
the tokens and the patches) and computes the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from ..models.load import LoadedModel
from ..rundir import RunDir
from .interventions import LMMetrics, NeuronPatch, patch_metrics, patch_results

__all__ = ["ray_evaluate_patches", "patch_shard", "patches_to_json", "patches_from_json", "TASK"]

#: Tensors of one LMMetrics state in a shard file (per-context sums for the bootstrap).
_STATE_KEYS = ("n", "sums", "rank_hist", "ctx_id", "ctx_sums")

#: The shard function Ray workers run.
TASK = "unineurons.analyses.ablate_shards:patch_shard"


def patches_to_json(patches: Sequence[NeuronPatch]) -> list[dict[str, list]]:
    """``[{layer: [indices, values]}]``: float32 values survive JSON exactly (as doubles)."""
    return [{str(layer): [idx.tolist(), vals.tolist()] for layer, (idx, vals) in p.items()}
            for p in patches]


def patches_from_json(data: list[dict[str, list]]) -> list[NeuronPatch]:
    return [{int(layer): (torch.tensor(idx, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32))
             for layer, (idx, vals) in p.items()} for p in data]


def _state(clean: LMMetrics, accs: Sequence[LMMetrics]) -> dict[str, torch.Tensor]:
    """Keys ``clean.{n,sums,rank_hist}`` and ``p{i}.{...}`` for patch i."""
    named = [("clean", clean)] + [(f"p{i}", a) for i, a in enumerate(accs)]
    return {f"{name}.{k}": v for name, acc in named for k, v in acc.state_dict().items()}


def patch_shard(worker, job: dict, c0: int, c1: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The clean and patched metrics of contexts ``[c0, c1)``."""
    (m,), store = worker.load(job)
    contexts = store.contexts(job["n_contexts"] * store.ctx)
    clean, accs = patch_metrics(m, contexts[:c1], store.manifest["tokenizer"],
                                patches_from_json(job["patches"]), batch_size=job["batch_size"],
                                start=c0)
    return _state(clean, accs), {}


def ray_evaluate_patches(run: RunDir, m: LoadedModel, tokens_info: dict,
                         patches: Sequence[NeuronPatch], cfg, desc: str
                         ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """:func:`~unineurons.analyses.interventions.evaluate_patches` of ``m`` over the run's
    evaluation contexts (``tokens_info``: path, sha256, n_contexts, ctx), on Ray workers."""
    from ..sharding import RayOptions, model_job, run_shards

    data = patches_to_json(patches)
    job = {**model_job([m], tokens_info["path"], cfg.device), "patches": data,
           "batch_size": cfg.batch_size, "n_contexts": tokens_info["n_contexts"]}
    key = {k: job[k] for k in ("weights", "token_sha256", "patches", "batch_size", "n_contexts")}
    key["state_keys"] = _STATE_KEYS  # shard files of an older layout are never merged
    job["config_hash"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    vocab = m.adapter.vocab_size
    clean, accs = LMMetrics(vocab), [LMMetrics(vocab) for _ in patches]

    def merge(fh) -> None:
        for name, acc in [("clean", clean)] + [(f"p{i}", a) for i, a in enumerate(accs)]:
            acc.merge(LMMetrics(vocab).load_state_dict(
                {k: fh.get_tensor(f"{name}.{k}") for k in _STATE_KEYS}))

    folder = run.state_dir / "ablate"
    folder.mkdir(parents=True, exist_ok=True)
    stats = run_shards(RayOptions.of(cfg), task=TASK, job=job, extra={}, tag="ablate",
                       state_dir=folder, start=0, stop=int(tokens_info["n_contexts"]),
                       ctx=int(tokens_info["ctx"]), merge=merge, checkpoint=None,
                       checkpoint_tokens=0, desc=desc,
                       rerun="rerun the same command (the finished shards are reused)")
    for f in folder.glob("*.safetensors"):  # the model's results are about to be written
        f.unlink()
    section = dict(run.manifest().get("ablate_ray", {}))
    section[m.name] = {"address": cfg.ray_address, "workers": cfg.workers,
                       "cpus_per_worker": cfg.cpus_per_worker, **stats}
    run.update_manifest(ablate_ray=section)
    return patch_results(clean, accs, n_boot=cfg.n_bootstrap, seed=cfg.seed, replicates=True)
