"""Functional roles of neurons (Gurnee et al. 2024 section 5): one ``role`` per neuron.

Roles, in order of precedence (the first that applies wins):

1. ``entropy``: confirmed entropy neuron (:mod:`unineurons.analyses.entropy`: large late
   ``w_out`` in the unembedding's null space, and fixing it moves entropy far more than loss);
2. ``attention``: attention (de)activation neuron (:mod:`unineurons.analyses.attention`:
   ``|attn_max_z| >= attn_role_z`` for some later head);
3. ``prediction``: ``vocab_kurt > prediction_kurt`` and ``vocab_skew > 0`` (a few tokens'
   logits raised);
4. ``suppression``: ``vocab_kurt > prediction_kurt`` and ``vocab_skew < 0`` (a few lowered);
5. ``partition``: ``vocab_var > partition_var`` (a broad split of the vocabulary);
6. ``none``.

The two mechanistic roles come first because an intervention or a specific circuit confirms
them, while the vocabulary roles are weight statistics; prediction/suppression (heavy tails)
come before partition (high variance), the broadest test, which a heavy-tailed neuron often
passes too.

**Two rules for the vocabulary roles.** The thresholds above (``paper``) were set on GPT-2
small; in a small model a random direction already has ``vocab_var`` near 1/d_model (0.008 at
d_model 128, above 0.005). The ``calibrated`` rule judges each statistic against a null made
from the same model: ``null_directions`` seeded random unit directions of d_model, folded and
centred exactly as a neuron's ``w_out`` (:func:`vocab_null`), give the null distribution of
(var, skew, kurt); a role needs the statistic beyond the null's ``null_quantile`` q in the
role's direction: prediction ``kurt > K_q`` and ``skew > S_q``; suppression ``kurt > K_q`` and
``skew < S_(1-q)``; partition ``var > V_q``. A random direction passes each test with
probability 1 - q. Both rules are always computed (``role_paper``, ``role_calibrated``);
``thresholds`` picks the one in ``role``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..accumulators.moments import Moments
from ..config import MAX_BATCH, MAX_DRAWS, MAX_SEED
from ..errors import UnineuronsError
from ..models.load import LoadedModel
from ..progress import progress
from .attention import attention_scores
from .entropy import find_entropy_neurons
from .vocab import DEFAULT_MAX_BYTES, folded_unembed, is_layernorm

__all__ = ["RoleConfig", "ROLES", "assign_roles", "entropy_and_attention", "RoleThresholds",
           "null_directions", "vocab_null", "null_thresholds", "role_columns", "rules_sentence"]

#: Every value of the ``role`` column, in order of precedence.
ROLES = ["entropy", "attention", "prediction", "suppression", "partition", "none"]


class RoleConfig(BaseModel):
    """Thresholds and options of the functional-role analyses (defaults from Gurnee et al.)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    prediction_kurt: float = Field(
        10.0, ge=0, description="vocab_kurt (non-excess) above which a neuron is a prediction "
        "(vocab_skew > 0) or suppression (vocab_skew < 0) neuron.")
    partition_var: float = Field(
        0.005, ge=0, description="vocab_var above which a neuron is a partition neuron.")
    entropy_layers: int = Field(
        1, ge=1, le=1 << 12, description="Entropy neurons are searched in the last N layers.")
    entropy_null_dims: int | None = Field(
        None, ge=1, le=1 << 20, description="Bottom singular directions of the folded unembedding that "
        "form its effective null space; 2% of d_model (at least 1) when unset.")
    entropy_min_null_frac: float = Field(
        0.5, ge=0, le=1, description="Least share of |w_out|^2 in the null space for an "
        "entropy candidate.")
    entropy_norm_quantile: float = Field(
        0.9, ge=0, le=1, description="An entropy candidate's w_out_norm is at least this "
        "quantile of its layer's.")
    entropy_max_candidates: int = Field(
        10, ge=0, le=1 << 20, description="At most this many candidates (largest null-space norm first) "
        "are confirmed by intervention.")
    entropy_n_random: int = Field(
        10, ge=0, le=MAX_DRAWS, description="Random neurons of the same late layers given the same "
        "interventions as the baseline.")
    entropy_values: tuple[float, ...] = Field(
        (0.0, 1.0, 2.0, 4.0), min_length=1, description="Activation values each tested "
        "neuron is fixed at on every position (see entropy_value_mode).")
    entropy_value_mode: Literal["scale", "absolute"] = Field(
        "scale", description="'scale': entropy_values times the neuron's largest absolute "
        "activation on the evaluation tokens; 'absolute': the values as given.")
    entropy_n_contexts: int = Field(
        32, ge=1, le=1 << 30, description="Contexts (from the start of the token store) the interventions "
        "are evaluated on.")
    entropy_effect_factor: float = Field(
        2.0, ge=0, description="A confirmed entropy neuron moves mean entropy at least this "
        "many times as much as any random baseline neuron.")
    entropy_loss_ratio: float = Field(
        2.0, ge=0, description="... and at least this many times as much as it moves the "
        "mean loss (largest absolute changes over the values, in nats).")
    attn_n_contexts: int = Field(
        8, ge=1, le=1 << 30, description="Contexts whose BOS keys are averaged for the attention scores.")
    attn_n_random: int = Field(
        1000, ge=2, le=1 << 20, description="Random residual directions forming each head's baseline.")
    attn_z: float = Field(
        3.0, gt=0, description="Neuron-head pairs with |z| at least this go to "
        "attention.parquet and count in attn_n_heads.")
    attn_role_z: float = Field(
        5.0, gt=0, description="|attn_max_z| at least this makes an attention neuron (stricter "
        "than attn_z: each neuron is tested against every later head).")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the random neurons and random directions.")
    thresholds: Literal["paper", "calibrated"] = Field(
        "paper", description="Which rule fills the role column: 'paper' (the fixed thresholds "
        "prediction_kurt, partition_var) or 'calibrated' (beyond the null_quantile of random "
        "directions); both are always written, as role_paper and role_calibrated.")
    null_directions: int = Field(
        10_000, ge=1, le=1 << 24, description="Seeded random unit directions of d_model (folded and "
        "centred like w_out) whose vocabulary statistics form the calibrated rule's null.")
    null_quantile: float = Field(
        0.999, gt=0.5, lt=1, description="Calibrated rule: a vocabulary statistic must lie beyond "
        "this quantile of the null in the role's direction (a random direction passes each "
        "test with probability 1 - null_quantile).")

    @model_validator(mode="after")
    def _null_size(self) -> RoleConfig:
        tail = self.null_directions * (1 - self.null_quantile)
        if tail < 10 - 1e-9:
            need = int(np.ceil(10 / (1 - self.null_quantile) - 1e-6))
            raise ValueError(f"null_directions {self.null_directions} leaves {tail:.3g} null "
                             f"values beyond the {self.null_quantile} quantile; use at least "
                             f"{need} directions (10 beyond the quantile) or a lower quantile")
        return self


def _bool(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return df[col].fillna(False).astype(bool).to_numpy()


@dataclass(frozen=True)
class RoleThresholds:
    """Bounds of the vocabulary roles: prediction ``kurt > kurt and skew > skew_hi``,
    suppression ``kurt > kurt and skew < skew_lo``, partition ``var > var`` (strict)."""

    rule: str  #: "paper" or "calibrated"
    kurt: float
    skew_hi: float
    skew_lo: float
    var: float
    quantile: float | None = None  #: calibrated: the null quantile q
    n_null: int | None = None  #: calibrated: null directions
    null_role_share: float | None = None  #: calibrated: share of null directions given a role

    @classmethod
    def paper(cls, cfg: RoleConfig) -> RoleThresholds:
        """Gurnee et al.'s fixed thresholds (``prediction_kurt``, skew sign, ``partition_var``)."""
        return cls("paper", cfg.prediction_kurt, 0.0, 0.0, cfg.partition_var)

    def as_dict(self) -> dict:
        return asdict(self)


def assign_roles(neurons: pd.DataFrame, cfg: RoleConfig = RoleConfig(),
                 thresholds: RoleThresholds | None = None) -> pd.Series:
    """The ``role`` of each row of ``neurons`` (index kept), one of :data:`ROLES`.

    Needs ``vocab_kurt``, ``vocab_skew``, ``vocab_var`` (:func:`~.weights.weight_columns`);
    uses ``is_entropy`` and ``attn_max_z`` when present (absent or NaN: role not given).
    ``thresholds`` bounds the vocabulary roles; None means the paper's (from ``cfg``).
    """
    th = RoleThresholds.paper(cfg) if thresholds is None else thresholds
    missing = [c for c in ("vocab_kurt", "vocab_skew", "vocab_var") if c not in neurons.columns]
    if missing:
        raise UnineuronsError(f"neuron table has no {', '.join(missing)} column; compute the "
                              "weight statistics (analyses.weights.weight_columns) first")
    kurt = neurons["vocab_kurt"].to_numpy(dtype=float)
    skew = neurons["vocab_skew"].to_numpy(dtype=float)
    var = neurons["vocab_var"].to_numpy(dtype=float)
    attn_z = (neurons["attn_max_z"].to_numpy(dtype=float) if "attn_max_z" in neurons.columns
              else np.full(len(neurons), np.nan))
    with np.errstate(invalid="ignore"):  # NaN compares False: no role from a missing value
        tests = [_bool(neurons, "is_entropy"), np.abs(attn_z) >= cfg.attn_role_z,
                 (kurt > th.kurt) & (skew > th.skew_hi),
                 (kurt > th.kurt) & (skew < th.skew_lo), var > th.var]
    role = np.select(tests, ROLES[:-1], default="none")
    return pd.Series(role, index=neurons.index, name="role", dtype=object)


def entropy_and_attention(m: LoadedModel, contexts: np.ndarray, special: dict,
                          neurons: pd.DataFrame | None = None, cfg: RoleConfig = RoleConfig()
                          ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Entropy and attention-(de)activation analyses of one model.

    ``contexts [n, ctx]`` are token-store rows and ``special`` the store's tokenizer section.
    ``neurons``: the neuron table; its rows for ``m`` (all rows if it has no ``model`` column;
    every neuron when None or empty) select the neurons of ``columns`` and of the attention
    rows. Entropy candidates are searched among all late-layer neurons whatever ``neurons``
    holds, and every tested neuron stays in the entropy rows.

    Returns ``(columns, entropy_rows, attention_rows)``: ``columns`` has ``model, layer,
    neuron`` plus :data:`~.entropy.ENTROPY_COLUMNS` and :data:`~.attention.ATTENTION_COLUMNS`
    (for ``RunDir.update_neurons``); the other two are ``entropy.parquet`` and
    ``attention.parquet`` (see docs/tables.md).
    """
    keys = None
    if neurons is not None and len(neurons):
        sel = neurons[neurons["model"] == m.name] if "model" in neurons.columns else neurons
        keys = list(zip(sel["layer"].astype(int), sel["neuron"].astype(int), strict=True))
    ent_cols, ent_rows = find_entropy_neurons(
        m, contexts, special, layers=min(cfg.entropy_layers, m.adapter.n_layers),
        null_dims=cfg.entropy_null_dims, min_null_frac=cfg.entropy_min_null_frac,
        norm_quantile=cfg.entropy_norm_quantile, max_candidates=cfg.entropy_max_candidates,
        n_random=cfg.entropy_n_random, values=cfg.entropy_values,
        value_mode=cfg.entropy_value_mode, n_contexts=cfg.entropy_n_contexts,
        effect_factor=cfg.entropy_effect_factor, loss_ratio=cfg.entropy_loss_ratio,
        batch_size=cfg.batch_size, seed=cfg.seed)
    att_cols, att_rows = attention_scores(
        m, contexts, n_contexts=cfg.attn_n_contexts, n_random=cfg.attn_n_random,
        z_threshold=cfg.attn_z, seed=cfg.seed, neurons=keys)
    cols = ent_cols.merge(att_cols, on=["model", "layer", "neuron"],
                          how="left" if keys is None else "inner")
    return cols.reset_index(drop=True), ent_rows, att_rows


# ---- the calibrated rule: a null from random directions ------------------------------------
def null_directions(d_model: int, k: int, seed: int, centre: bool) -> torch.Tensor:
    """``[k, d_model]`` float32 unit rows: standard Gaussian directions (``torch.Generator``
    seeded with ``seed``, float64), centred over d_model when ``centre`` (LayerNorm families,
    as :func:`~.vocab.out_directions` centres ``w_out``), then normalised."""
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(k, d_model, generator=g, dtype=torch.float64)  # [k, d_model]
    if centre:
        x = x - x.mean(1, keepdim=True)
    return (x / x.norm(dim=1, keepdim=True)).float()


@torch.no_grad()
def vocab_null(m: LoadedModel, k: int, seed: int = 0, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> dict[str, np.ndarray]:
    """Vocabulary statistics of ``k`` random directions of model ``m``: ``var, skew, kurt``,
    each ``[k]`` float64, computed exactly as a neuron's ``vocab_*`` columns (cosines with the
    folded, centred unembedding's unit columns; moments over the vocabulary as
    :class:`~unineurons.accumulators.moments.Moments`: population variance, biased skew,
    non-excess kurtosis). Directions: :func:`null_directions` (centred for LayerNorm)."""
    w_u = folded_unembed(m)  # [d_model, V]
    tgt = w_u / w_u.norm(dim=0, keepdim=True).clamp_min(1e-30)  # [d_model, V] unit columns
    dirs = null_directions(m.adapter.d_model, k, seed, is_layernorm(m)).to(tgt.device)
    nb = max(1, int(max_bytes // (m.adapter.vocab_size * 48)))  # Moments' float64 copies
    out: dict[str, list[np.ndarray]] = {"var": [], "skew": [], "kurt": []}
    with progress(f"role null of {m.name}", k, unit="directions") as bar:
        for s in range(0, k, nb):
            cos = dirs[s:s + nb] @ tgt  # [nb, V]
            res = Moments(cos.shape[0], device=cos.device).update(cos.T).result()  # over vocab
            for key in out:
                out[key].append(res[key].cpu().numpy())
            bar.advance(cos.shape[0])
    return {key: np.concatenate(v).astype(np.float64) for key, v in out.items()}


def null_thresholds(null: dict[str, np.ndarray], quantile: float) -> RoleThresholds:
    """The calibrated :class:`RoleThresholds` of a null (:func:`vocab_null`): ``kurt`` and
    ``var`` at ``quantile``, ``skew_hi`` at ``quantile`` and ``skew_lo`` at ``1 - quantile``
    (``numpy.quantile``, linear interpolation). ``null_role_share``: the share of the null's own
    directions that these bounds give a vocabulary role (in-sample; at most 3 (1 - q))."""
    kurt, skew, var = (np.asarray(null[k], dtype=np.float64) for k in ("kurt", "skew", "var"))
    th = RoleThresholds("calibrated", float(np.quantile(kurt, quantile)),
                        float(np.quantile(skew, quantile)), float(np.quantile(skew, 1 - quantile)),
                        float(np.quantile(var, quantile)), quantile, len(kurt))
    role = ((kurt > th.kurt) & ((skew > th.skew_hi) | (skew < th.skew_lo))) | (var > th.var)
    return RoleThresholds(**{**th.as_dict(), "null_role_share": float(role.mean())})


def role_columns(neurons: pd.DataFrame, models: Sequence[LoadedModel],
                 cfg: RoleConfig = RoleConfig()) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Roles of ``neurons`` (rows of the ``models``, with their ``vocab_*`` columns) under both
    rules. Returns ``(columns, thresholds)``: ``columns`` has ``model, layer, neuron, role,
    role_paper, role_calibrated`` (``role`` as ``cfg.thresholds`` picks) and ``thresholds``
    maps each model spec to both rules' :class:`RoleThresholds` as dicts (``paper``,
    ``calibrated``). Raises :class:`UnineuronsError` for a row of a model not in ``models``."""
    by_name = {m.name: m for m in models}
    unknown = sorted(set(neurons["model"]) - set(by_name))
    if unknown:
        raise UnineuronsError(f"roles: neuron rows of model {unknown[0]} but no such model was "
                              "loaded; pass every model whose rows are given")
    parts, thresholds = [], {}
    paper = RoleThresholds.paper(cfg)
    for name, rows in neurons.groupby("model", sort=False):
        cal = null_thresholds(vocab_null(by_name[name], cfg.null_directions, cfg.seed),
                              cfg.null_quantile)
        thresholds[str(name)] = {"paper": paper.as_dict(), "calibrated": cal.as_dict()}
        out = rows[["model", "layer", "neuron"]].copy()
        out["role_paper"] = assign_roles(rows, cfg, paper)
        out["role_calibrated"] = assign_roles(rows, cfg, cal)
        out["role"] = out["role_paper" if cfg.thresholds == "paper" else "role_calibrated"]
        parts.append(out[["model", "layer", "neuron", "role", "role_paper", "role_calibrated"]])
    cols = pd.concat(parts) if parts else pd.DataFrame(
        columns=["model", "layer", "neuron", "role", "role_paper", "role_calibrated"])
    return cols, thresholds


def rules_sentence(neurons: pd.DataFrame) -> str:
    """One sentence comparing the vocabulary-role counts of ``neurons`` under both rules (empty
    when the table has no ``role_paper`` / ``role_calibrated`` columns), and why they differ."""
    if not {"role_paper", "role_calibrated"} <= set(neurons.columns):
        return ""

    def counts(col: str) -> str:
        c = neurons[col].value_counts()
        return ", ".join(f"{r} {int(c.get(r, 0))}" for r in ("prediction", "suppression",
                                                            "partition"))

    return (f"Of {len(neurons)} neurons, the paper's fixed thresholds give {counts('role_paper')}; "
            f"the calibrated rule (beyond a high quantile of random directions through the same "
            f"unembedding) gives {counts('role_calibrated')}. They differ because a random "
            "direction's vocab_var is about 1/d_model, above the paper's 0.005 in any model "
            "narrower than 200, while the calibrated bounds come from this model itself.")
