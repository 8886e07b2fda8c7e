"""Group ablations of universal, non-universal and random neurons (Nandan et al. 2025).

For each model of a run, neurons are ranked by excess correlation (``neurons.parquet``) and
sets of growing size are ablated together (activation fixed at zero, at the neuron's mean, or
at a value) while next-token loss, KL to the clean model, entropy and top-1 accuracy are
measured on a token store (see :mod:`unineurons.analyses.interventions` for the loop, the
scored positions and the metrics).

Sets, at size n (``all`` = the whole universal set, so all three are compared at one size):

- ``universal``: the top n universal neurons by excess correlation (``--rank-all``: every
  neuron ranked, below the threshold too, for models with few or no universal neurons);
- ``non-universal``: in each layer, that layer's share of the universal set taken from the
  lowest-excess neurons that are not universal (layer-matched, so depth explains nothing);
- ``random``: in each layer, the same share drawn uniformly from all the layer's neurons,
  seeded, ``random_draws`` times; draws are nested (a draw's set at size 4 holds its size 2).

Layer shares for n up to the universal set's size are exactly the layer counts of the top-n
universal neurons; beyond it (the random curve must go further than the universal set for
the headline) they are n split in the universal set's layer proportions (largest remainder).
With no universal neurons at all, the split is even across layers. ``per_layer`` adds the
same sets restricted to one layer at a time (Nandan et al. Fig. 5). Sets that come out
smaller than asked are ``capped``; empty sets get a row with NaN metrics and cost no pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import ConfigDict, Field, field_validator

from ..accumulators.moments import Moments
from ..checks import check_store_models
from ..config import MAX_BATCH, MAX_DRAWS, MAX_INT, MAX_SEED, Backend, Device
from ..errors import UnineuronsError
from ..models.load import LoadedModel
from ..progress import progress
from ..stream import activation_stream
from .effects import BOOT_COLUMN, group_interval
from .effects import headline as _headline
from .interventions import (
    CI_COLUMNS,
    DEFAULT_BOOTSTRAP,
    evaluate_patches,
    load_run_model,
    make_patch,
    run_contexts,
    run_model_entries,
    write_model_rows,
)

__all__ = ["AblateConfig", "NeuronSet", "build_sets", "neuron_means", "ablate_model",
           "run_ablations", "summarize", "headline", "parse_method", "SET_NAMES"]

SET_NAMES = ("universal", "non-universal", "random")
#: The calibrated universal set (q < FDR, ranked by p-value; correlate's ``--null-rotations``),
#: ablated at its own sizes ('all' = the whole calibrated set) beside the paper's.
CALIBRATED_SET = "universal-calibrated"
_DEFAULT_SIZES: list[int | str] = [2 ** k for k in range(15)] + ["all"]
_METRIC_COLS = ["loss", "delta_loss", "kl", "entropy", "delta_entropy", "top1_acc"]


def parse_method(method: str) -> tuple[str, float | None]:
    """``zero`` | ``mean`` | ``value:X`` -> (kind, X or None)."""
    if method in ("zero", "mean"):
        return method, None
    if method.startswith("value:"):
        try:
            x = float(method[len("value:"):])
        except ValueError:
            x = float("nan")
        if np.isfinite(x):
            return "value", x
    raise UnineuronsError(f"ablation method {method!r} is not zero, mean or value:X "
                          "(X a finite number, e.g. value:-1.5)")


class AblateConfig(Backend):
    """Group ablations of universal vs non-universal vs random neurons. With
    ``backend="ray"`` the patched forward passes run as token shards on Ray workers
    (analyses.ablate_shards); the means of ``method="mean"`` are streamed here."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    models: list[str] | None = Field(None, description="Model specs of the run; all when unset.")
    sets: list[Literal["universal", "non-universal", "random", "universal-calibrated"]] = Field(
        list(SET_NAMES), description="Neuron sets to ablate.")
    method: str = Field("zero", description="zero, mean (each neuron's mean activation on the "
                        "same tokens) or value:X (activation fixed at X).")
    sizes: list[Annotated[int, Field(ge=1, le=MAX_INT)] | Literal["all"]] = Field(
        _DEFAULT_SIZES, description="Set sizes; 'all' = the whole universal set.")
    per_layer: bool = Field(False, description="Also ablate the sets one layer at a time.")
    random_draws: int = Field(5, ge=1, le=MAX_DRAWS, description="Random sets drawn per size.")
    rank_all: bool = Field(False, description="Rank every neuron by excess correlation for the "
                           "universal set, below the threshold too.")
    tokens: str | None = Field(None, description="Token store folder; the run's when unset.")
    n_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="Evaluate on the first ceil(N / ctx) "
                                 "contexts; the run's token count (run's store) or the whole "
                                 "store when unset. Each configuration costs one forward pass.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the random sets.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass.")
    device: Device = Field("cpu", description="cpu or cuda[:i].")
    n_bootstrap: int = Field(DEFAULT_BOOTSTRAP, ge=0, le=1 << 20, description="Paired-bootstrap resamples "
                             "of the contexts behind each effect's 95% interval (seeded with "
                             "seed); 0: no intervals.")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        try:
            parse_method(v)
        except UnineuronsError as e:
            raise ValueError(str(e)) from None
        return v


    @field_validator("sets")
    @classmethod
    def _sets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one set of {', '.join(SET_NAMES)}")
        return list(dict.fromkeys(v))

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int | str]) -> list[int | str]:
        if not v or any(isinstance(s, int) and s < 1 for s in v):
            raise ValueError("sizes must be positive integers or 'all'")
        return list(dict.fromkeys(v))


@dataclass(frozen=True)
class NeuronSet:
    """One ablation configuration's neurons (before choosing values)."""

    set: str
    layer: int  #: -1: the whole model; else the one layer the set is restricted to
    size: str  #: the size as asked: "8" or "all"
    draw: int  #: random draw index; 0 for the deterministic sets
    n_requested: int  #: the size asked for, "all" resolved
    neurons: tuple[tuple[int, int], ...]  #: (layer, index), sorted


def _split(n: int, weights: np.ndarray, cap: int) -> np.ndarray:
    """n split over layers in proportion to ``weights`` (largest remainder), at most ``cap``
    per layer."""
    raw = n * weights / weights.sum()  # [L]
    out = np.floor(raw).astype(np.int64)
    order = np.lexsort((np.arange(len(raw)), -(raw - out)))  # biggest remainder, then layer
    out[order[: n - int(out.sum())]] += 1
    return np.minimum(out, cap)


def build_sets(table: pd.DataFrame, n_layers: int, d_mlp: int, sets: Sequence[str],
               sizes: Sequence[int | str], *, per_layer: bool = False, draws: int = 5,
               rank_all: bool = False, seed: int = 0) -> list[NeuronSet]:
    """Every configuration to ablate for one model (rules in the module docstring).

    ``table`` has one row per neuron with ``layer, neuron, excess_corr, is_universal``;
    neurons with NaN excess are never ranked (random sets may still draw them).
    """
    t = table[np.isfinite(table["excess_corr"].to_numpy(dtype=float))].copy()
    t["is_universal"] = t["is_universal"].fillna(False).astype(bool)
    cal = _calibrated_ranking(t, rank_all) if CALIBRATED_SET in sets else []
    ranked = t if rank_all else t[t["is_universal"]]
    ranked = ranked.sort_values(["excess_corr", "layer", "neuron"], ascending=[False, True, True])
    uni = [(int(a), int(b)) for a, b in zip(ranked["layer"], ranked["neuron"], strict=True)]
    low = t[~t["is_universal"]].sort_values(["excess_corr", "layer", "neuron"])
    nonuni = {layer: [(layer, int(i)) for i in g["neuron"]] for layer, g in low.groupby("layer")}
    perms = [[np.random.default_rng([seed, d, layer]).permutation(d_mlp) for layer in
              range(n_layers)] for d in range(draws)]
    uni_counts = np.bincount([a for a, _ in uni], minlength=n_layers).astype(float)  # [L]
    out: list[NeuronSet] = []

    def emit(name: str, layer: int, size: Any, n: int, counts: np.ndarray,
             top: list[tuple[int, int]]) -> None:
        label = str(size)
        if name == "universal":
            out.append(NeuronSet(name, layer, label, 0, n, tuple(sorted(top))))
        elif name == CALIBRATED_SET:  # its own ranking and sizes
            pool = [x for x in cal if layer < 0 or x[0] == layer]
            k = len(pool) if size == "all" else int(size)
            out.append(NeuronSet(name, layer, label, 0, k, tuple(sorted(pool[:k]))))
        elif name == "non-universal":
            pick = [x for lay in range(n_layers) for x in nonuni.get(lay, [])[: counts[lay]]]
            out.append(NeuronSet(name, layer, label, 0, n, tuple(sorted(pick))))
        else:
            for d in range(draws):
                pick = [(lay, int(i)) for lay in range(n_layers)
                        for i in perms[d][lay][: counts[lay]]]
                out.append(NeuronSet(name, layer, label, d, n, tuple(sorted(pick))))

    for size in sizes:
        n = len(uni) if size == "all" else int(size)
        if n <= len(uni):  # exactly the top-n universal neurons' layer counts
            counts = np.bincount([a for a, _ in uni[:n]], minlength=n_layers)
        else:
            weights = uni_counts if uni else np.ones(n_layers)
            counts = _split(n, weights, d_mlp)
        for name in sets:
            emit(name, -1, size, n, counts, uni[:n])
    if per_layer:
        for layer in range(n_layers):
            uni_l = [x for x in uni if x[0] == layer]
            for size in sizes:
                n = len(uni_l) if size == "all" else int(size)
                counts = np.zeros(n_layers, dtype=np.int64)
                counts[layer] = min(n, d_mlp)
                for name in sets:
                    emit(name, layer, size, n, counts, uni_l[:n])
    return out


def _calibrated_ranking(t: pd.DataFrame, rank_all: bool) -> list[tuple[int, int]]:
    """(layer, neuron) of the calibrated universal set (every neuron with a p-value under
    ``rank_all``), by p-value, then excess correlation, descending."""
    if "is_universal_calibrated" not in t or "p_value" not in t:
        raise UnineuronsError(f"the {CALIBRATED_SET} set needs p-values in neurons.parquet; run "
                              "`unineurons correlate` with --null-rotations (default 32) first")
    c = t[np.isfinite(t["p_value"].to_numpy(dtype=float))]
    c = c if rank_all else c[c["is_universal_calibrated"].fillna(False).astype(bool)]
    c = c.sort_values(["p_value", "excess_corr", "layer", "neuron"], ascending=[True, False, True, True])
    return [(int(a), int(b)) for a, b in zip(c["layer"], c["neuron"], strict=True)]


@torch.inference_mode()
def neuron_means(m: LoadedModel, contexts: np.ndarray, special: dict, batch_size: int = 8
                 ) -> torch.Tensor:
    """``[L, d_mlp]`` float32: each neuron's mean activation over the positions the
    activation stream keeps (its default token mask), streamed with :class:`Moments`."""
    ad = m.adapter
    device = next(m.model.parameters()).device
    acc = Moments(ad.n_layers * ad.d_mlp, device=device)
    with progress(f"mean activations of {m.name}", contexts.shape[0] * contexts.shape[1],
                  unit="tokens") as bar:
        for batch in activation_stream([m], contexts, special, batch_size=batch_size,
                                       device=device):
            acc.update(batch.acts[0])  # [n, L*d_mlp]
            bar.advance(batch.n_contexts * contexts.shape[1])
    if float(acc.n) == 0:
        raise UnineuronsError("mean ablation: the token mask kept no positions; use more tokens")
    return acc.mean.reshape(ad.n_layers, ad.d_mlp).float().cpu()  # [L, d_mlp]


def ablate_model(m: LoadedModel, table: pd.DataFrame, contexts: np.ndarray, special: dict,
                 cfg: AblateConfig, *, run: Any = None, tokens_info: dict | None = None
                 ) -> pd.DataFrame:
    """Run every configuration of ``cfg`` on one model (one pass over ``contexts``).

    ``table``: the model's rows of ``neurons.parquet``. Returns one row per configuration
    (columns in docs/tables.md, ``ablations.parquet``). ``backend="ray"`` needs the ``run``
    (for its shard files) and ``tokens_info`` (the store and context count of ``contexts``).
    """
    kind, value = parse_method(cfg.method)
    ad = m.adapter
    sets = build_sets(table, ad.n_layers, ad.d_mlp, cfg.sets, cfg.sizes, per_layer=cfg.per_layer,
                      draws=cfg.random_draws, rank_all=cfg.rank_all, seed=cfg.seed)
    means = neuron_means(m, contexts, special, cfg.batch_size).numpy() if kind == "mean" else None
    # one evaluation per distinct non-empty neuron set: capped sizes and draws repeat sets
    distinct = list(dict.fromkeys(s.neurons for s in sets if s.neurons))
    patches = []
    for neurons in distinct:
        if means is not None:
            idx = np.array(neurons)  # [k, 2] (layer, index)
            vals: Any = means[idx[:, 0], idx[:, 1]]  # [k]
        else:
            vals = 0.0 if kind == "zero" else value
        patches.append(make_patch(neurons, vals))
    results = []
    desc = f"ablating in {m.name} ({len(patches)} sets)"
    if patches and cfg.backend == "ray":
        from .ablate_shards import ray_evaluate_patches

        if run is None or tokens_info is None:
            raise UnineuronsError("ablate on Ray needs the run directory and its token store")
        _, results = ray_evaluate_patches(run, m, tokens_info, patches, cfg, desc)
    elif patches:  # all sets empty: nothing to run
        _, results = evaluate_patches(m, contexts, special, patches, batch_size=cfg.batch_size,
                                      desc=desc, n_boot=cfg.n_bootstrap, boot_seed=cfg.seed,
                                      replicates=True)
    by_set = dict(zip(distinct, results, strict=True))
    universal = {(int(a), int(b)) for a, b, u in
                 zip(table["layer"], table["neuron"], table["is_universal"].fillna(False),
                     strict=True) if u}
    rows = []
    for s in sets:
        res = by_set.get(s.neurons, {})
        n = len(s.neurons)
        row = {"model": m.name, "set": s.set, "method": cfg.method, "layer": s.layer,
               "size": s.size, "draw": s.draw, "n_requested": s.n_requested, "n_ablated": n,
               "capped": n < s.n_requested,
               "n_above_threshold": sum(x in universal for x in s.neurons)}
        row.update({k: res.get(k, float("nan")) for k in _METRIC_COLS})
        row["efficiency"] = row["delta_loss"] / n if n else float("nan")
        row.update({k: res.get(k, float("nan")) for k in CI_COLUMNS})
        row["n_targets"] = int(res.get("n_targets", 0))
        row[BOOT_COLUMN] = np.asarray(res.get(BOOT_COLUMN, np.zeros(0)), dtype=np.float64)
        rows.append(row)
    return pd.DataFrame(rows)


def _model_table(run: Any, spec: str) -> pd.DataFrame:
    if not run.has_table("neurons"):
        raise UnineuronsError(f"run {run.path} has no neurons.parquet; run `unineurons "
                              "correlate` first: ablations rank neurons by excess correlation")
    t = run.read_table("neurons")
    missing = [c for c in ("excess_corr", "is_universal") if c not in t.columns]
    if missing:
        raise UnineuronsError(f"run {run.path}: neurons.parquet has no {', '.join(missing)}; "
                              "run `unineurons correlate` (with a baseline) first")
    t = t[t["model"] == spec]
    if t.empty:
        raise UnineuronsError(f"run {run.path}: neurons.parquet has no rows for model {spec}; "
                              "ablations need the model's excess correlations (use --model with "
                              "a model the correlate stage ranked, e.g. the reference)")
    return t[["layer", "neuron", "excess_corr", "is_universal",
              *[c for c in ("p_value", "q_value", "is_universal_calibrated") if c in t]]]


def run_ablations(run: Any, cfg: AblateConfig) -> pd.DataFrame:
    """Run ``cfg`` on ``run`` (a :class:`~unineurons.rundir.RunDir`): write
    ``ablations.parquet`` (each model's rows replaced, other models' kept) and the manifest
    section ``ablate`` (per model: config and tokens used); return the new rows."""
    entries = run_model_entries(run, cfg.models)
    if cfg.models is None and run.has_table("neurons"):
        # by default, the models the correlate stage ranked (in reference mode: the reference)
        neurons = run.read_table("neurons")
        ranked = set(neurons.loc[neurons["excess_corr"].notna(), "model"]) \
            if "excess_corr" in neurons else set()
        entries = [e for e in entries if e["spec"] in ranked] or entries
    tables = {e["spec"]: _model_table(run, e["spec"]) for e in entries}  # fail before loading
    contexts, special, tok_info = run_contexts(run, cfg.tokens, cfg.n_tokens)
    frames = []
    for e in entries:
        m = load_run_model(e, cfg.driver_device)
        check_store_models([m], special, contexts.shape[1], tok_info["path"], cfg.batch_size)
        frames.append(ablate_model(m, tables[e["spec"]], contexts, special, cfg, run=run,
                                   tokens_info=tok_info))
        del m
    df = pd.concat(frames, ignore_index=True)
    write_model_rows(run, "ablations", df)
    section = dict(run.manifest().get("ablate", {}))
    for e in entries:
        section[e["spec"]] = {"config": cfg.model_dump(mode="json"), "tokens": tok_info}
    run.update_manifest(ablate=section)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, layer, set, size): draws, mean n_ablated, mean and standard
    deviation (over draws; 0 for one draw) of delta_loss, its 95 % interval
    ``delta_loss_lo, delta_loss_hi`` (contexts and draws resampled:
    :func:`~unineurons.analyses.effects.group_interval`; NaN without replicates), mean KL and
    efficiency."""
    keys = ["model", "method", "layer", "set", "n_requested", "size"]
    g = df.groupby(keys, sort=True, dropna=False)
    out = g.agg(draws=("draw", "size"), n_ablated=("n_ablated", "mean"),
                delta_loss=("delta_loss", "mean"),
                delta_loss_std=("delta_loss", lambda x: float(np.std(x, ddof=0))),
                kl=("kl", "mean"), efficiency=("efficiency", "mean")).reset_index()
    ci = [group_interval(rows) for _, rows in g]  # same group order as the aggregation
    out["delta_loss_lo"] = [c[0] for c in ci]
    out["delta_loss_hi"] = [c[1] for c in ci]
    return out.drop(columns="n_requested")


def headline(df: pd.DataFrame, sets: Sequence[str] | None = None) -> str:
    """How many random neurons match the loss increase of each target set (``universal``, or
    any set but ``random`` / ``non-universal``), per model and method, with 95 % intervals
    (paired bootstrap over contexts, draws resampled) or the note that the difference is not
    distinguishable at this token count: :func:`unineurons.analyses.effects.headline`. The
    point value: the whole-model random curve (mean delta_loss over draws vs mean set size,
    from (0, 0)) interpolated linearly at the target set's delta_loss at its largest size."""
    return _headline(df, sets)
