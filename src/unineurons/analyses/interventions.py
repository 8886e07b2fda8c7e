"""Evaluate a model with some neurons fixed: the loop behind interventions and ablations.

A *patch* fixes chosen neurons' activations (the input of the MLP output projection, see
:mod:`unineurons.models.adapters`) at given values on every position, through
``Adapter.intervene``. :func:`evaluate_patches` streams the tokens once: per batch it runs the
clean model once and then the model under every patch, and folds next-token metrics into one
:class:`LMMetrics` accumulator per configuration, so no logits outlive their batch.

Scored predictions: position t predicting token t+1, except where token t+1 is BOS, EOS or
pad (the positions the activation stream's token mask drops: BOS and pad are not text and EOS
is a document boundary, whose prediction measures document-length guessing, not language) or
where token t is pad. Newlines *are* scored: they are text the model has to predict.

:func:`intervene_neurons` is Gurnee et al. section 5 (fix one neuron at several values and
watch loss, entropy, the true token's rank and the final norm's scale); :func:`run_interventions`
wires it to a run directory (``unineurons intervene``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..checks import check_store_models, run_model_source
from ..config import MAX_BATCH, MAX_DRAWS, MAX_INT, MAX_SEED, Device
from ..errors import UnineuronsError
from ..models.adapters import neuron_name, parse_neuron
from ..models.load import LoadedModel, load_model
from ..models.partial import record_block_inputs, restart_at
from ..progress import progress
from .metrics import CONTEXT_COLUMNS, METRICS, LMMetrics

__all__ = ["LMMetrics", "CONTEXT_COLUMNS", "CI_COLUMNS", "DEFAULT_BOOTSTRAP", "NeuronPatch",
           "make_patch", "target_mask", "final_norm_scale",
           "evaluate_patches", "patch_metrics", "patch_results", "intervene_neurons",
           "random_late_neurons", "InterveneConfig",
           "run_interventions", "METRICS", "run_model_entries", "load_run_model", "run_contexts",
           "write_model_rows"]


#: Bootstrap resamples behind each effect's interval; CI_COLUMNS: the intervals (effects.py).
DEFAULT_BOOTSTRAP = 1000
CI_COLUMNS = ["delta_loss_lo", "delta_loss_hi", "delta_entropy_lo", "delta_entropy_hi"]

#: layer -> (neuron indices [k] int64, values [k] float32): activations fixed by a patch.
NeuronPatch = dict[int, tuple[torch.Tensor, torch.Tensor]]


# ---- patches and the evaluation loop -------------------------------------------------------
def make_patch(neurons: Sequence[tuple[int, int]], values: float | Sequence[float]) -> NeuronPatch:
    """A patch fixing neuron ``(layer, index)`` number i at ``values[i]`` (or all at one value)."""
    vals = np.broadcast_to(np.asarray(values, dtype=np.float32), (len(neurons),))
    by_layer: dict[int, tuple[list[int], list[float]]] = {}
    for (layer, idx), v in zip(neurons, vals, strict=True):
        ids, vs = by_layer.setdefault(int(layer), ([], []))
        ids.append(int(idx))
        vs.append(float(v))
    return {layer: (torch.tensor(ids, dtype=torch.int64), torch.tensor(vs, dtype=torch.float32))
            for layer, (ids, vs) in sorted(by_layer.items())}


def _check_patch(patch: NeuronPatch, m: LoadedModel) -> None:
    ad = m.adapter
    for layer, (idx, _) in patch.items():
        for i in idx.tolist():
            if not (0 <= layer < ad.n_layers and 0 <= i < ad.d_mlp):
                raise UnineuronsError(
                    f"neuron {neuron_name(layer, i)} does not exist in model {m.name} "
                    f"({ad.n_layers} layers x {ad.d_mlp} neurons); give addresses "
                    f"L0..L{ad.n_layers - 1}, N0..N{ad.d_mlp - 1}"
                )


def _patch_fn(patch: NeuronPatch):
    def fn(layer: int, act: torch.Tensor) -> torch.Tensor:  # act [B, T, d_mlp]
        idx, vals = patch[layer]
        act = act.clone()  # never write into a tensor the model may reuse
        act[..., idx] = vals.to(act.dtype)  # [B, T, k] <- [k], broadcast over positions
        return act
    return fn


def target_mask(tokens: torch.Tensor, special: dict) -> torch.Tensor:
    """Bool ``[B, T-1]``: True where position t's prediction of token t+1 is scored."""
    skip = [int(special[k]) for k in ("bos_id", "eos_id", "pad_id") if special.get(k) is not None]
    tgt = tokens[:, 1:]  # [B, T-1]
    keep = torch.ones_like(tgt, dtype=torch.bool)
    if skip:
        keep &= ~torch.isin(tgt, torch.tensor(sorted(set(skip)), device=tokens.device))
    if special.get("pad_id") is not None:
        keep &= tokens[:, :-1] != int(special["pad_id"])
    return keep


def final_norm_scale(norm: nn.Module, x: torch.Tensor, layernorm: bool | None = None
                     ) -> torch.Tensor:
    """``x [..., d_model]`` (the final norm's input) -> ``[...]``, the factor the norm
    multiplies its (centred) input by: 1 / sqrt(var + eps) for LayerNorm, 1 / sqrt(mean(x^2)
    + eps) for RMSNorm. Smaller means a larger residual norm squashing the logits."""
    eps = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", 1e-5)  # Llama's RMSNorm; OLMo's fixed 1e-5
    x = x.float()
    centred = isinstance(norm, nn.LayerNorm) if layernorm is None else layernorm  # OLMo: own class
    second = x.var(-1, unbiased=False) if centred else x.pow(2).mean(-1)  # [...]
    return torch.rsqrt(second + float(eps))


def _forward(m: LoadedModel, tokens: torch.Tensor, valid: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored log-probs ``[n, V]`` (float32) and final-norm scales ``[n]`` of one forward."""
    norm = m.adapter.final_norm()
    seen: dict[str, torch.Tensor] = {}
    handle = norm.register_forward_pre_hook(lambda _mod, args: seen.__setitem__("x", args[0]))
    try:
        logits = m.model(input_ids=tokens, use_cache=False).logits  # [B, T, V]
    finally:
        handle.remove()
    logp = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)  # [n, V]
    return logp, final_norm_scale(norm, seen["x"][:, :-1][valid],
                                  m.adapter.spec.layernorm)  # [n, V], [n]


@torch.inference_mode()
def evaluate_patches(m: LoadedModel, contexts: np.ndarray, special: dict,
                     patches: Sequence[NeuronPatch], *, batch_size: int = 8,
                     desc: str = "evaluating", n_boot: int = DEFAULT_BOOTSTRAP,
                     boot_seed: int = 0, replicates: bool = False
                     ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Metrics of the clean model and of the model under each patch, over ``contexts``.

    One pass over the tokens: per batch one clean forward (its log-probs are the KL
    reference) and one forward per patch. Returns ``(clean, [per patch])``, dicts of
    :data:`METRICS`; the per-patch dicts also hold ``delta_loss``, ``delta_entropy`` and
    ``delta_final_norm_scale`` (patched minus clean) and the 95 % paired-bootstrap intervals
    of :func:`patch_results`. An empty patch is the clean model.
    """
    n_ctx, ctx = contexts.shape
    with progress(desc, total=n_ctx * ctx * (1 + len(patches)), unit="tokens") as bar:
        clean, accs = patch_metrics(m, contexts, special, patches, batch_size=batch_size,
                                    advance=bar.advance)
    return patch_results(clean, accs, n_boot=n_boot, seed=boot_seed, replicates=replicates)


@torch.inference_mode()
def patch_metrics(m: LoadedModel, contexts: np.ndarray, special: dict,
                  patches: Sequence[NeuronPatch], *, batch_size: int = 8, start: int = 0,
                  advance: Callable[[int], None] = lambda n: None
                  ) -> tuple[LMMetrics, list[LMMetrics]]:
    """The accumulators of :func:`evaluate_patches` over ``contexts[start:]``: the clean
    model's and one per patch (they merge: a token shard's states add up to the whole)."""
    if batch_size < 1:
        raise UnineuronsError(f"--batch-size must be at least 1, got {batch_size}")
    ad = m.adapter
    device = next(m.model.parameters()).device
    for p in patches:
        _check_patch(p, m)
    dev_patches = [{layer: (i.to(device), v.to(device)) for layer, (i, v) in p.items()}
                   for p in patches]
    clean = LMMetrics(ad.vocab_size, device)
    accs = [LMMetrics(ad.vocab_size, device) for _ in patches]
    restarts = sorted({min(p) for p in patches if p and min(p) > 0})
    for b0 in range(start, contexts.shape[0], batch_size):
        tokens = torch.from_numpy(np.asarray(contexts[b0:b0 + batch_size]).astype(np.int64))
        if int(tokens.max()) >= ad.vocab_size:
            raise UnineuronsError(
                f"model {m.name}: token id {int(tokens.max())} is outside its vocabulary of "
                f"{ad.vocab_size}; the token store was made with another tokenizer"
            )
        tokens = tokens.to(device)  # [B, T]
        valid = target_mask(tokens, special)  # [B, T-1]
        targets = tokens[:, 1:][valid]  # [n]
        ctx_ids = torch.arange(b0, b0 + tokens.shape[0], device=device)[:, None].expand_as(
            valid)[valid]  # [n]: each scored prediction's context, for the paired bootstrap
        # the residual entering each patch's first layer, to restart there (models/partial.py)
        with record_block_inputs(ad, restarts) as inputs:
            clean_logp, clean_scale = _forward(m, tokens, valid)
        clean.update(clean_logp, targets, clean_scale, clean_logp, ctx_ids)
        advance(tokens.numel())
        for patch, acc in zip(dev_patches, accs, strict=True):
            with ad.intervene(_patch_fn(patch), layers=sorted(patch)), \
                    restart_at(ad, min(patch, default=0), inputs):
                logp, scale = _forward(m, tokens, valid)
            acc.update(logp, targets, scale, clean_logp, ctx_ids)
            advance(tokens.numel())
    return clean, accs


def patch_results(clean: LMMetrics, accs: Sequence[LMMetrics], *,
                  n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, replicates: bool = False
                  ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``(clean metrics, [per patch metrics with the deltas to clean])``; each patch's dict
    also holds :data:`CI_COLUMNS` (and with ``replicates`` ``delta_loss_boot``): see
    :func:`unineurons.analyses.effects.patch_intervals`."""
    from .effects import patch_intervals

    base = clean.result()
    out = []
    for acc in accs:
        r = acc.result()
        for k in ("loss", "entropy", "final_norm_scale"):
            r[f"delta_{k}"] = r[k] - base[k]
        out.append(r)
    for r, ci in zip(out, patch_intervals(clean, accs, n_boot, seed, replicates), strict=True):
        r.update(ci)
    return base, out


# ---- a run directory's models and tokens (shared with analyses.ablate) ---------------------
def _same_spec(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def run_model_entries(run: Any, requested: Sequence[str] | None) -> list[dict]:
    """The run manifest's ``models`` entries for the ``requested`` specs (a folder may be
    spelled differently), all of them in run order when None."""
    models = run.manifest().get("models") or []
    if not models:
        raise UnineuronsError(f"run {run.path} lists no models in its manifest; run "
                              "`unineurons correlate ... --out RUN` first")
    if requested is None:
        return list(models)
    out = []
    for spec in requested:
        hit = next((e for e in models if _same_spec(spec, e["spec"])), None)
        if hit is None:
            known = ", ".join(e["spec"] for e in models)
            raise UnineuronsError(f"model {spec} is not part of run {run.path}; its models are: "
                                  f"{known}")
        out.append(hit)
    return out


def load_run_model(entry: dict, device: str = "cpu") -> LoadedModel:
    """Load a run's model in float32 (as the run hashed it), refusing changed weights."""
    m = load_model(run_model_source(entry), device=device, dtype=torch.float32,
                   with_tokenizer=False)
    if m.name != entry["spec"]:  # loaded from the recorded folder: keep the run's name for it
        m.spec = dataclasses.replace(m.spec, spec=entry["spec"])
    want = entry.get("weights_sha256")
    if want and m.weights_sha256 != want:
        raise UnineuronsError(
            f"model {m.name}: its weights changed since the run was made (sha256 "
            f"{m.weights_sha256[:12]} != {want[:12]}); the run's neuron table describes other "
            "weights: re-run the correlate stage into a new run"
        )
    return m


def run_contexts(run: Any, tokens: str | None, n_tokens: int | None
                 ) -> tuple[np.ndarray, dict, dict]:
    """``(contexts [n, ctx], special ids, tokens info)`` from ``tokens`` or the run's own store.

    ``n_tokens`` None means the run's token count for the run's store, all of another store.
    """
    from ..tokens import TokenStore

    recorded = run.manifest().get("tokens") or {}
    if tokens is None:
        if not recorded.get("path"):
            raise UnineuronsError(f"run {run.path} records no token store; pass --tokens DIR")
        tokens = recorded["path"]
        if n_tokens is None:
            n_tokens = recorded.get("n_tokens")
    store = TokenStore.open(tokens)
    contexts = store.contexts(n_tokens)
    info = {"path": str(store.path), "sha256": store.sha256, "split": store.manifest["split"],
            "ctx": store.ctx, "n_contexts": int(contexts.shape[0]),
            "n_tokens": int(contexts.shape[0]) * store.ctx}
    return contexts, store.manifest["tokenizer"], info


def write_model_rows(run: Any, name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Write table ``name``: the models in ``df`` replace their old rows, others stay."""
    if run.has_table(name):
        old = run.read_table(name)
        old = old[~old["model"].isin(set(df["model"]))]
        if len(old):
            df = pd.concat([old, df], ignore_index=True)
    run.write_table(name, df)
    return df


# ---- single-neuron interventions -----------------------------------------------------------
def random_late_neurons(n_layers: int, d_mlp: int, k: int, seed: int,
                        exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """``k`` distinct neurons of the last layer drawn with ``seed`` (fewer if the layer runs
    out), skipping ``exclude``; sorted by index."""
    last = n_layers - 1
    taken = {i for (layer, i) in exclude if layer == last}
    pool = np.array([i for i in range(d_mlp) if i not in taken], dtype=np.int64)
    pick = np.random.default_rng(seed).choice(pool, size=min(k, len(pool)), replace=False)
    return [(last, int(i)) for i in sorted(pick)]


def intervene_neurons(m: LoadedModel, contexts: np.ndarray, special: dict,
                      neurons: Sequence[tuple[int, int]], values: Sequence[float], *,
                      kinds: Sequence[str] | None = None, batch_size: int = 8) -> pd.DataFrame:
    """Fix each neuron alone at each value on every position; one row per (neuron, value).

    Columns: ``model, address, layer, neuron, kind, value`` then :data:`METRICS` and
    ``delta_loss, delta_entropy, delta_final_norm_scale`` against the clean model on the same
    tokens, and their 95 % intervals :data:`CI_COLUMNS` (paired bootstrap over contexts).
    ``kinds`` labels each neuron (default ``"target"``). All configurations share one pass.
    """
    kinds = list(kinds) if kinds is not None else ["target"] * len(neurons)
    if len(kinds) != len(neurons):
        raise ValueError("kinds must give one label per neuron")
    if not neurons or not len(values):
        raise UnineuronsError("intervene needs at least one --neuron and one --values entry")
    configs = [(nrn, kind, float(v)) for nrn, kind in zip(neurons, kinds, strict=True)
               for v in values]
    patches = [make_patch([nrn], [v]) for nrn, _, v in configs]
    _, results = evaluate_patches(m, contexts, special, patches, batch_size=batch_size,
                                  desc=f"intervening on {m.name}")
    rows = [{"model": m.name, "address": neuron_name(*nrn), "layer": nrn[0], "neuron": nrn[1],
             "kind": kind, "value": v, **res}
            for (nrn, kind, v), res in zip(configs, results, strict=True)]
    df = pd.DataFrame(rows)
    return df.astype({"layer": "int64", "neuron": "int64", "n_targets": "int64"})


class InterveneConfig(BaseModel):
    """Single-neuron interventions (Gurnee et al. section 5) on neurons of a run's model."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str | None = Field(
        None, description="Model spec of the run; the run's first (reference) model when unset.")
    neurons: list[str] = Field(description="Neuron addresses L{layer}.N{index} to intervene on.")
    values: list[float] = Field(
        [-1.0, 0.0, 1.0, 2.0, 4.0, 6.0],
        description="Activation values each neuron is fixed at, on every position.")
    random_baseline: int = Field(
        5, ge=0, le=MAX_DRAWS, description="Random last-layer neurons (not among the targets) given the same "
        "interventions as a baseline.")
    tokens: str | None = Field(
        None, description="Token store folder; the run's token store when unset.")
    n_tokens: int | None = Field(
        None, ge=1, le=MAX_INT, description="Evaluate on the first ceil(N / ctx) contexts; the run's token "
        "count with the run's store, the whole store otherwise, when unset.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the random baseline neurons.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass.")
    device: Device = Field("cpu", description="cpu or cuda[:i].")

    @field_validator("neurons")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one --neuron L{layer}.N{index}")
        for a in v:
            try:
                parse_neuron(a)
            except UnineuronsError as e:
                raise ValueError(str(e)) from None
        return v


    @field_validator("values")
    @classmethod
    def _values(cls, v: list[float]) -> list[float]:
        if not v or not all(np.isfinite(v)):
            raise ValueError("--values needs at least one finite number")
        return v


def run_interventions(run: Any, cfg: InterveneConfig) -> pd.DataFrame:
    """Run ``cfg`` on ``run`` (a :class:`~unineurons.rundir.RunDir`): write
    ``interventions.parquet`` (this model's rows replaced, other models' kept) and the
    manifest section ``intervene`` (per model: config and tokens used); return the new rows."""
    entry = run_model_entries(run, None if cfg.model is None else [cfg.model])[0]
    contexts, special, tok_info = run_contexts(run, cfg.tokens, cfg.n_tokens)
    m = load_run_model(entry, cfg.device)
    check_store_models([m], special, contexts.shape[1], tok_info["path"], cfg.batch_size)
    targets = list(dict.fromkeys(parse_neuron(a) for a in cfg.neurons))  # dedupe, keep order
    rand = random_late_neurons(m.adapter.n_layers, m.adapter.d_mlp, cfg.random_baseline,
                               cfg.seed, exclude=targets)
    df = intervene_neurons(m, contexts, special, targets + rand, cfg.values,
                           kinds=["target"] * len(targets) + ["random"] * len(rand),
                           batch_size=cfg.batch_size)
    write_model_rows(run, "interventions", df)
    section = dict(run.manifest().get("intervene", {}))
    section[m.name] = {"config": cfg.model_dump(mode="json"), "tokens": tok_info}
    run.update_manifest(intervene=section)
    return df
