"""``unineurons analyze``: per-neuron statistics, top contexts, families, properties.

One pass over the tokens feeds every model of the run into its accumulators (moments, top
contexts, family statistics; :mod:`unineurons.analyses.analyze_pass`, which also checkpoints
the pass and runs it on Ray workers with ``backend="ray"``). Then the weight-based analyses
(:mod:`unineurons.analyses.weights`, ``vocab``, ``roles``) add theirs.

Writes to the run directory (docs/tables.md): ``neurons.parquet`` columns, and the tables
``top_contexts``, ``families``, ``properties`` (universal vs other neurons, z-scored), plus the
weight stage's ``vocab``, ``entropy`` and ``attention``. Usage::

    analyze_run("RUN", AnalyzeConfig())                              # a correlate run
    analyze_models(["model/"], "RUN", AnalyzeConfig(tokens="store/"))  # one model, no partners
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, field_validator

from ..checks import check_store_models
from ..config import MAX_BATCH, MAX_CTX, MAX_INT, MAX_SEED, MAX_TOP_K, MAX_VOCAB, Backend, Device
from ..errors import UnineuronsError
from ..features import Vocabulary, get_features, load_feature_module, token_class_from_file
from ..models.adapters import parse_neuron
from ..models.load import LoadedModel, load_model, load_tokenizer
from ..progress import progress, track
from ..rundir import RunDir
from ..stream import MaskConfig
from .analyze_pass import _ModelAcc, accumulate, clear_state
from .analyze_tables import properties_table, summary_counts, top_contexts_table, write_arrow_rows
from .families import (
    FamilyFeatures,
    assign_families,
    build_family_features,
    family_duplicates,
)
from .interventions import load_run_model, run_contexts, run_model_entries, write_model_rows
from .roles import RoleConfig, entropy_and_attention, role_columns
from .vocab import real_vocab_size

__all__ = ["AnalyzeConfig", "AnalyzeResult", "analyze", "analyze_run", "analyze_models",
           "select_neurons", "STAT_COLUMNS"]

#: The activation-statistics columns this stage adds to neurons.parquet.
STAT_COLUMNS = ["act_mean", "act_var", "act_skew", "act_kurt", "act_max", "act_freq",
                "pre_mean", "pre_var", "pre_skew", "pre_kurt"]


class AnalyzeConfig(Backend):
    """Per-neuron analyses of a run: statistics, top contexts, families, properties."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tokens: str | None = Field(None, description="Token store folder; default: the run's own.")
    n_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="Use the first ceil(N / ctx) contexts; "
                                 "default: the run's token count (all of another store).")
    neurons: str = Field("auto", description="Neurons for the family statistics: 'universal' "
                         "(universal ones plus as many seeded random others), 'all', a FILE of "
                         "addresses (L3.N12, one per line), or 'auto' (universal when the run has "
                         "universality, else all up to max_neurons, else a seeded sample).")
    max_neurons: int = Field(50_000, ge=1, le=MAX_INT, description="'auto' without universality: sample this "
                             "many neurons per model when it has more.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass.")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Top activating tokens kept per neuron.")
    window_before: int = Field(24, ge=0, le=MAX_CTX, description="Tokens before the top token in its window.")
    window_after: int = Field(8, ge=0, le=MAX_CTX, description="Tokens after the top token in its window.")
    unigram_top_n: int = Field(256, ge=1, le=MAX_VOCAB, description="Unigram / previous-token features: the N "
                               "most frequent tokens of the tokens analysed.")
    features: tuple[str, ...] | None = Field(None, description="Library features of the 'class' "
                                             "family; default: every registered one.")
    token_classes: tuple[str, ...] = Field((), description="Text files, one token per line: extra "
                                           "'class' features named after the file.")
    feature_modules: tuple[str, ...] = Field((), description="Python files registering features "
                                             "with @register_feature / @register_token_class.")
    vr_threshold: float = Field(0.5, ge=0, le=1, description="A unigram / previous / alphabet / "
                                "class family needs variance reduction >= this.")
    position_threshold: float = Field(0.3, ge=0, le=1, description="A position family needs "
                                      "I(fires; position) / H(fires) >= this.")
    n_ranked: int = Field(3, ge=1, le=1 << 10, description="Best features per neuron in families.parquet.")
    vocab_k: int = Field(20, ge=1, le=MAX_TOP_K, description="Tokens per neuron, side and direction in "
                         "vocab.parquet (highest / lowest cosine).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the neuron samples.")
    device: Device = Field("cpu", description="cpu or cuda[:i].")
    checkpoint_tokens: int = Field(1_000_000, ge=1, le=MAX_INT, description="Save the token pass's resumable "
                                   "state every this many tokens (--resume continues from it).")
    roles: RoleConfig = Field(RoleConfig(), description="Functional roles: thresholds and the "
                              "entropy / attention analyses (analyses.roles).")


    @field_validator("neurons")
    @classmethod
    def _neurons(cls, v: str) -> str:
        if v not in ("auto", "universal", "all") and not Path(v).is_file():
            raise ValueError(f"neurons must be auto, universal, all or an existing file; {v!r} "
                             "is none of these")
        return v


@dataclass
class AnalyzeResult:
    """What :func:`analyze` wrote, for the CLI's summary."""

    neurons: pd.DataFrame  #: the updated neurons table (all models of the run)
    families: pd.DataFrame  #: neuron counts per family, universal and other
    roles: pd.DataFrame | None  #: neuron counts per role, when roles were assigned
    properties: pd.DataFrame | None  #: universal vs other z-scores; None without universality
    notes: list[str] = field(default_factory=list)  #: what was skipped and why
    #: neuron counts per role under the calibrated rule (``roles``: the paper rule's)
    roles_calibrated: pd.DataFrame | None = None
    #: per model spec, both rules' role thresholds (analyses.roles.role_columns)
    role_thresholds: dict = field(default_factory=dict)


def select_neurons(model: str, n_layers: int, d_mlp: int, choice: str, table: pd.DataFrame | None,
                   max_neurons: int = 50_000, seed: int = 0) -> np.ndarray:
    """Flat neuron indices (``layer * d_mlp + neuron``, sorted) of the family statistics.

    ``table`` holds the model's rows of neurons.parquet (with ``is_universal`` after correlate).
    The random sample depends on ``seed`` and the model spec only.
    """
    n = n_layers * d_mlp
    rng = np.random.default_rng([seed, zlib.crc32(model.encode())])
    has_univ = (table is not None and "is_universal" in table.columns
                and bool(table["is_universal"].notna().any()))
    n_univ = int(table["is_universal"].fillna(False).astype(bool).sum()) if has_univ else 0
    if choice == "all":
        return np.arange(n)
    # auto with no neuron above the threshold (a small zoo) analyses like a model without partners
    if choice == "universal" or (choice == "auto" and n_univ > 0):
        if not has_univ:
            raise UnineuronsError(f"model {model}: the run has no universality (is_universal) "
                                  "columns; use --neurons all or run `unineurons correlate` first")
        univ = table[table["is_universal"].fillna(False).astype(bool)]
        flat = (univ["layer"].to_numpy() * d_mlp + univ["neuron"].to_numpy()).astype(np.int64)
        rest = np.setdiff1d(np.arange(n), flat)
        extra = rng.choice(rest, size=min(len(flat), len(rest)), replace=False)
        return np.sort(np.concatenate([flat, extra]))
    if choice == "auto":
        if n <= max_neurons:
            return np.arange(n)
        return np.sort(rng.choice(n, max_neurons, replace=False))
    flat = []
    for line in Path(choice).read_text().splitlines():
        if not line.strip():
            continue
        layer, idx = parse_neuron(line)
        if not (0 <= layer < n_layers and 0 <= idx < d_mlp):
            raise UnineuronsError(f"neuron {line.strip()} in {choice} is outside model {model} "
                                  f"({n_layers} layers x {d_mlp} neurons)")
        flat.append(layer * d_mlp + idx)
    return np.unique(np.array(flat, dtype=np.int64))


def _model_columns(m: LoadedModel, acc: _ModelAcc, feats: FamilyFeatures, cfg: AnalyzeConfig
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(neurons.parquet columns of every neuron, families.parquet rows of the subset)."""
    L, D = m.adapter.n_layers, m.adapter.d_mlp
    ra = {k: v.cpu().numpy() for k, v in acc.act.result().items()}
    rp = {k: v.cpu().numpy() for k, v in acc.pre.result().items()}
    df = pd.DataFrame({"model": m.name, "layer": np.repeat(np.arange(L), D),
                       "neuron": np.tile(np.arange(D), L)})
    for s in ("mean", "var", "skew", "kurt"):
        df[f"act_{s}"] = ra[s]
    df["act_max"] = ra["max"]
    df["act_freq"] = rp["freq"]  # share of tokens with pre-activation > 0
    for s in ("mean", "var", "skew", "kurt"):
        df[f"pre_{s}"] = rp[s]
    df["family"] = pd.Series([None] * len(df), dtype=object)
    df["family_feature"] = pd.Series([None] * len(df), dtype=object)
    df["family_score"] = np.nan
    df["position_score"] = np.nan
    if acc.fam is None:
        return df, pd.DataFrame()
    vr, pos = acc.fam.scores()
    cols, ranked = assign_families(vr, pos, feats.names(), feats.token_ids(), cfg.vr_threshold,
                                   cfg.position_threshold, cfg.n_ranked)
    sub = acc.subset.cpu().numpy()
    for c in cols.columns:
        df.loc[sub, c] = cols[c].to_numpy()
    flat = sub[ranked.pop("idx").to_numpy()]
    ranked.insert(0, "model", m.name)
    ranked.insert(1, "layer", flat // D)
    ranked.insert(2, "neuron", flat % D)
    return df, ranked


def _vocabulary(special: dict, models: Sequence[LoadedModel]) -> tuple[Vocabulary, Any]:
    """Decoded strings of the token store's tokenizer (a model's if that one is gone), and
    that tokenizer."""
    size = max([int(special.get("vocab_size") or 0)] + [m.adapter.vocab_size for m in models])
    specials = [special.get(k) for k in ("bos_id", "eos_id", "pad_id")]
    for src in [special.get("path")] + [m.name for m in models]:
        if not src:
            continue
        try:
            tok = load_tokenizer(str(src))
        except UnineuronsError:
            continue
        return Vocabulary.from_tokenizer(tok, size, specials), tok
    raise UnineuronsError("no tokenizer found to decode tokens: the token store's tokenizer "
                          f"({special.get('path')}) and the models' folders have none; restore "
                          "the tokenizer folder the token store was built with")


def _mask(run: RunDir) -> MaskConfig:
    """The run's correlate token mask, so statistics see the positions correlations saw."""
    c = (run.manifest().get("correlate") or {}).get("config") or {}
    return MaskConfig(**{k: bool(c[k]) for k in ("drop_bos", "drop_eos", "drop_pad",
                                                 "drop_newline") if k in c})


def _weight_stage(run: RunDir, models: Sequence[LoadedModel], contexts: np.ndarray,
                  special: dict, tokenizer: Any, subsets: Sequence[np.ndarray],
                  cfg: AnalyzeConfig) -> pd.DataFrame:
    """The weight-based analyses (analyses.weights, vocab, roles): weight columns for every
    neuron; vocabulary tokens, entropy and attention analyses for the subset; then roles."""
    from .vocab import vocab_table
    from .weights import weight_columns

    run.update_neurons(pd.concat([weight_columns(m) for m in models], ignore_index=True))
    vocab_rows, role_cols, ent_rows, att_rows = [], [], [], []
    for m, sub in zip(models, subsets, strict=True):
        d = m.adapter.d_mlp
        pairs = [(int(i) // d, int(i) % d) for i in sub]
        if not pairs:
            continue
        vocab_rows.append(vocab_table(m, tokenizer, pairs, k=cfg.vocab_k))
        keys = pd.DataFrame({"model": m.name, "layer": sub // d, "neuron": sub % d})
        cols, ent, att = entropy_and_attention(m, contexts, special, keys, cfg.roles)
        role_cols.append(cols)
        ent_rows.append(ent)
        att_rows.append(att)
    for name, rows in (("vocab", vocab_rows), ("entropy", ent_rows), ("attention", att_rows)):
        if rows:
            write_model_rows(run, name, pd.concat(rows, ignore_index=True))
    if role_cols:
        run.update_neurons(pd.concat(role_cols, ignore_index=True))
    neurons = run.read_table("neurons")
    mine = neurons["model"].isin([m.name for m in models])
    # after entropy / attention: the roles use them; both rules (paper, calibrated)
    roles, thresholds = role_columns(neurons[mine], models, cfg.roles)
    run.update_manifest(roles={**(run.manifest().get("roles") or {}), **thresholds})
    return run.update_neurons(roles)


def analyze(run: RunDir, models: Sequence[LoadedModel], contexts: np.ndarray, special: dict,
            tokens_info: dict, cfg: AnalyzeConfig, *, resume: bool = False) -> AnalyzeResult:
    """Run every analysis of ``models`` on ``contexts`` and write it into ``run``; with
    ``resume``, the token pass continues from its checkpoint (analyses.analyze_pass)."""
    t0 = time.perf_counter()
    notes: list[str] = []
    mask = _mask(run)
    for path in cfg.feature_modules:
        load_feature_module(path)
    classes = get_features(cfg.features, [token_class_from_file(p) for p in cfg.token_classes])
    vocab, tokenizer = _vocabulary(special, models)
    for m in models:  # padded vocabularies: W_U / W_E statistics over real token ids only
        real_vocab_size(m, tokenizer)
    feats = build_family_features(contexts, special, vocab, cfg.unigram_top_n, classes, mask)
    table = run.read_table("neurons") if run.has_table("neurons") else None
    subsets = [select_neurons(m.name, m.adapter.n_layers, m.adapter.d_mlp, cfg.neurons,
                              None if table is None else table[table["model"] == m.name],
                              cfg.max_neurons, cfg.seed) for m in models]
    accs = accumulate(run, models, contexts, special, feats, subsets, cfg, mask, tokens_info,
                      resume=resume).accs

    cols, ranked, tops = [], [], []
    # families, statistics and top-context windows of every neuron: seconds per model
    with progress("neuron statistics and top contexts",
                  sum(m.adapter.n_layers * m.adapter.d_mlp for m in models), unit="neurons") as bar:
        for m, acc in zip(models, accs, strict=True):
            c, r = _model_columns(m, acc, feats, cfg)
            cols.append(c)
            ranked.append(r)
            tops.append(top_contexts_table(m.name, m.adapter.d_mlp, acc.top.result(), contexts,
                                           vocab, cfg.window_before, cfg.window_after))
            bar.advance(m.adapter.n_layers * m.adapter.d_mlp)
    new = pd.concat(cols, ignore_index=True)
    new["family_duplicates"] = family_duplicates(new)
    neurons = run.update_neurons(new)
    write_model_rows(run, "families", pd.concat(ranked, ignore_index=True))
    write_arrow_rows(run, "top_contexts", tops)

    neurons = _weight_stage(run, models, contexts, special, tokenizer, subsets, cfg)
    specs = [m.name for m in models]
    mine = neurons[neurons["model"].isin(specs)]
    props = properties_table(mine)
    if props is None:
        notes.append("properties.parquet skipped: the run has no universality (is_universal) "
                     "column; run `unineurons correlate` to compare universal and other neurons")
    else:
        write_model_rows(run, "properties", props)
    run.update_manifest(analyze={
        "config": cfg.model_dump(mode="json"), "models": specs, "tokens": tokens_info,
        "mask": vars(mask), "unigram_tokens": [int(i) for i in feats.unigram_ids],
        "n_vocab": {m.name: real_vocab_size(m) for m in models},
        "class_features": [f.name for f in classes],
        "n_family_neurons": {m.name: int(len(s)) for m, s in zip(models, subsets, strict=True)},
        "notes": notes, "elapsed_s": round(time.perf_counter() - t0, 3)})
    clear_state(run)  # the tables hold the token pass now
    paper = "role_paper" if "role_paper" in mine.columns else "role"
    roles = summary_counts(mine, paper) if paper in mine.columns else None
    cal = (summary_counts(mine, "role_calibrated") if "role_calibrated" in mine.columns
           else None)
    role_th = {k: v for k, v in (run.manifest().get("roles") or {}).items() if k in specs}
    return AnalyzeResult(neurons=neurons, families=summary_counts(mine, "family"), roles=roles,
                         properties=props, notes=notes, roles_calibrated=cal,
                         role_thresholds=role_th)


def analyze_run(run_path: str | Path, cfg: AnalyzeConfig, models: Sequence[str] | None = None,
                *, resume: bool = False) -> AnalyzeResult:
    """Analyze the models of a correlate run (all, or the ``models`` named), on its tokens."""
    run = RunDir.open(run_path)
    entries = run_model_entries(run, models)
    contexts, special, info = run_contexts(run, cfg.tokens, cfg.n_tokens)
    loaded = [load_run_model(e, cfg.driver_device)
              for e in track(entries, "loading models", unit="models")]
    check_store_models(loaded, special, contexts.shape[1], info["path"], cfg.batch_size)
    return analyze(run, loaded, contexts, special, info, cfg, resume=resume)


def analyze_models(specs: Sequence[str], out: str | Path, cfg: AnalyzeConfig, *,
                   resume: bool = False) -> AnalyzeResult:
    """Analyze models on their own (no partners, so no universality) into run ``out``."""
    if cfg.tokens is None:
        raise UnineuronsError("analyze --model needs --tokens DIR: the token store to stream")
    if not specs:
        raise UnineuronsError("analyze needs a run directory or at least one --model")
    run = RunDir.create(out)
    contexts, special, info = run_contexts(run, cfg.tokens, cfg.n_tokens)
    loaded = [load_model(s, device=cfg.driver_device)
              for s in track(specs, "loading models", unit="models")]
    check_store_models(loaded, special, contexts.shape[1], info["path"], cfg.batch_size)
    entries = [e for e in run.manifest().get("models") or [] if e["spec"] not in specs]
    entries += [{"spec": m.name, "location": m.spec.location, "revision": m.spec.revision,
                 "weights_sha256": m.weights_sha256, **m.info} for m in loaded]
    run.update_manifest(models=entries, tokens=info)
    return analyze(run, loaded, contexts, special, info, cfg, resume=resume)
