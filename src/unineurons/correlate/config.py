"""The correlate stage's configuration: validated, frozen, documented; also the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from ..config import MAX_BATCH, MAX_DRAWS, MAX_INT, MAX_SEED, MAX_TOP_K, Backend, Device
from ..errors import UnineuronsError
from .plan import parse_bytes

__all__ = ["CorrelateConfig"]


class CorrelateConfig(Backend):
    """Cross-seed neuron correlations, the rotation baseline and universal neurons."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    models: list[str] = Field(description="Model specs (folder or HUB_ID[@REVISION]); the first is the reference.")
    tokens: str = Field(description="Token store folder.")
    n_tokens: int | None = Field(None, ge=1, le=MAX_INT, description=(
        "Use the first ceil(N / ctx) contexts; all when unset."))
    pairs: Literal["reference", "all"] = Field("reference", description=(
        "reference: model 0 against each other; all: every model gets its own universality."
    ))
    baseline: Literal["rotation", "none"] = Field("rotation", description=(
        "Random-rotation baseline (Gurnee et al. eq. 2) or none."
    ))
    threshold: float = Field(0.5, ge=-1, le=1, description="Universal if excess correlation > threshold.")
    null_rotations: int = Field(32, ge=0, le=MAX_DRAWS, description=(
        "Seeded rotations per layer for the calibrated null of each neuron's max correlation "
        "(p_value, q_value, is_universal_calibrated); 0: no calibrated criterion."
    ))
    fdr: float = Field(0.01, gt=0, lt=1, description=(
        "Calibrated universal if the Benjamini-Hochberg q-value < fdr."
    ))
    split_half: bool = Field(False, description=(
        "Also find the universal sets on two disjoint halves of the contexts (split_half.parquet)."
    ))
    ceiling: bool = Field(True, description=(
        "Also correlate each model with its own rotated activations (ceiling_corr, excess_norm)."
    ))
    similarity: bool = Field(True, description=(
        "Layer similarity (CKA, ridge R², layer_similarity.parquet) and one-to-one matching "
        "(assigned_neuron, assigned_corr, mutual_best in matches.parquet); off: neither is "
        "computed nor planned for."
    ))
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="Top matches kept per neuron and partner.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass.")
    accumulate_tokens: int | None = Field(None, ge=1, le=1 << 30, description=(
        "Fold activations into the co-moments once at least this many kept tokens are buffered: "
        "one large GEMM amortises the float64 merge (memory: this many rows of every model). "
        "Unset: the largest power of two up to 8192 whose buffers take at most a quarter of the budget."
    ))
    device: Device = Field("cpu", description="cpu or cuda[:i].")
    dtype: Literal["float32", "tf32", "bfloat16", "float64"] = Field("float32", description=(
        "Dtype of each batch's cross product; accumulation is float64 always."
    ))
    memory_budget: str = Field("8GB", description=(
        "Bytes the accumulators and batch buffers may use; more pairs take more passes."
    ))
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the random rotations.")
    save_full_matrix: bool = Field(False, description=(
        "Also save every pair's full correlation matrix (float16; refused up front when the "
        "out folder's disk cannot hold them twice)."))
    checkpoint_tokens: int = Field(1_000_000, ge=1, le=MAX_INT, description=(
        "Save resumable state every this many tokens."))
    drop_bos: bool = True
    drop_eos: bool = True
    drop_pad: bool = True
    drop_newline: bool = Field(True, description="Drop positions whose token is a newline (as in the paper).")

    @field_validator("models")
    @classmethod
    def _two_models(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("needs at least two --model (the first is the reference)")
        if len(set(v)) != len(v):
            raise ValueError("a model is given twice; each --model must be a different model")
        return v

    @field_validator("null_rotations")
    @classmethod
    def _null(cls, v: int) -> int:
        if 0 < v < 8:
            raise ValueError("needs 0 (no calibrated criterion) or at least 8 null rotations")
        return v

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        try:
            parse_bytes(v)
        except UnineuronsError as e:
            raise ValueError(str(e)) from None
        return v

    @property
    def budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)
