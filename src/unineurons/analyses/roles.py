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
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UnineuronsError
from ..models.load import LoadedModel
from .attention import attention_scores
from .entropy import find_entropy_neurons

__all__ = ["RoleConfig", "ROLES", "assign_roles", "entropy_and_attention"]

#: Every value of the ``role`` column, in order of precedence.
ROLES = ["entropy", "attention", "prediction", "suppression", "partition", "none"]


class RoleConfig(BaseModel):
    """Thresholds and options of the functional-role analyses (defaults from Gurnee et al.)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    prediction_kurt: float = Field(
        10.0, description="vocab_kurt (non-excess) above which a neuron is a prediction "
        "(vocab_skew > 0) or suppression (vocab_skew < 0) neuron.")
    partition_var: float = Field(
        0.005, ge=0, description="vocab_var above which a neuron is a partition neuron.")
    entropy_layers: int = Field(
        1, ge=1, description="Entropy neurons are searched in the last N layers.")
    entropy_null_dims: int | None = Field(
        None, ge=1, description="Bottom singular directions of the folded unembedding that "
        "form its effective null space; 2% of d_model (at least 1) when unset.")
    entropy_min_null_frac: float = Field(
        0.5, ge=0, le=1, description="Least share of |w_out|^2 in the null space for an "
        "entropy candidate.")
    entropy_norm_quantile: float = Field(
        0.9, ge=0, le=1, description="An entropy candidate's w_out_norm is at least this "
        "quantile of its layer's.")
    entropy_max_candidates: int = Field(
        10, ge=0, description="At most this many candidates (largest null-space norm first) "
        "are confirmed by intervention.")
    entropy_n_random: int = Field(
        10, ge=0, description="Random neurons of the same late layers given the same "
        "interventions as the baseline.")
    entropy_values: tuple[float, ...] = Field(
        (0.0, 1.0, 2.0, 4.0), min_length=1, description="Activation values each tested "
        "neuron is fixed at on every position (see entropy_value_mode).")
    entropy_value_mode: Literal["scale", "absolute"] = Field(
        "scale", description="'scale': entropy_values times the neuron's largest absolute "
        "activation on the evaluation tokens; 'absolute': the values as given.")
    entropy_n_contexts: int = Field(
        32, ge=1, description="Contexts (from the start of the token store) the interventions "
        "are evaluated on.")
    entropy_effect_factor: float = Field(
        2.0, ge=0, description="A confirmed entropy neuron moves mean entropy at least this "
        "many times as much as any random baseline neuron.")
    entropy_loss_ratio: float = Field(
        2.0, ge=0, description="... and at least this many times as much as it moves the "
        "mean loss (largest absolute changes over the values, in nats).")
    attn_n_contexts: int = Field(
        8, ge=1, description="Contexts whose BOS keys are averaged for the attention scores.")
    attn_n_random: int = Field(
        1000, ge=2, description="Random residual directions forming each head's baseline.")
    attn_z: float = Field(
        3.0, gt=0, description="Neuron-head pairs with |z| at least this go to "
        "attention.parquet and count in attn_n_heads.")
    attn_role_z: float = Field(
        5.0, gt=0, description="|attn_max_z| at least this makes an attention neuron (stricter "
        "than attn_z: each neuron is tested against every later head).")
    batch_size: int = Field(8, ge=1, description="Contexts per forward pass.")
    seed: int = Field(0, description="Seed of the random neurons and random directions.")


def _bool(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return df[col].fillna(False).astype(bool).to_numpy()


def assign_roles(neurons: pd.DataFrame, cfg: RoleConfig = RoleConfig()) -> pd.Series:
    """The ``role`` of each row of ``neurons`` (index kept), one of :data:`ROLES`.

    Needs ``vocab_kurt``, ``vocab_skew``, ``vocab_var`` (:func:`~.weights.weight_columns`);
    uses ``is_entropy`` and ``attn_max_z`` when present (absent or NaN: role not given).
    """
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
                 (kurt > cfg.prediction_kurt) & (skew > 0),
                 (kurt > cfg.prediction_kurt) & (skew < 0), var > cfg.partition_var]
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
