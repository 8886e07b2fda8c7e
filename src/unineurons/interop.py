"""Neuron names other tools understand: TransformerLens hooks and Hugging Face module paths.

A unineurons neuron ``L{layer}.N{index}`` is the input of the MLP's output projection
(:mod:`unineurons.models.adapters`). The same number is

- in TransformerLens: ``blocks.{layer}.mlp.hook_post``, index ``{index}`` of its last
  dimension (``hook_post`` is the input of ``W_out`` for plain and gated MLPs alike; LayerNorm
  folding and weight centring do not change it);
- in Hugging Face transformers: the input of the output projection module, e.g.
  ``transformer.h.{layer}.mlp.c_proj`` (GPT-2), ``gpt_neox.layers.{layer}.mlp.dense_4h_to_h``
  (GPT-NeoX / Pythia), ``model.layers.{layer}.mlp.down_proj`` (Llama): a forward pre-hook on
  it sees ``args[0][..., index]``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from .errors import UnineuronsError

__all__ = ["tl_hook_name", "hf_module_path", "name_table", "export_neurons", "EXPORT_COLUMNS"]

#: Columns of ``neurons.parquet`` copied into an export when the run has them.
EXPORT_COLUMNS = ["excess_corr", "max_corr", "baseline_corr", "ceiling_corr", "excess_norm",
                  "is_universal", "is_universal_calibrated", "p_value", "q_value", "role",
                  "role_paper", "role_calibrated", "family", "family_feature"]


def tl_hook_name(layer: int) -> str:
    """TransformerLens hook whose last dimension holds the layer's neuron activations."""
    return f"blocks.{int(layer)}.mlp.hook_post"


def hf_module_path(model_type: str, layer: int) -> str:
    """Dotted path of the layer's MLP output projection in the Hugging Face model.

    Raises:
        UnineuronsError: an architecture unineurons has no adapter for.
    """
    from .models.adapters import ARCHITECTURES

    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnineuronsError(f"architecture {model_type!r} has no adapter; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    return f"{spec.blocks}.{int(layer)}.{spec.mlp}.{spec.out_proj}"


def _model_type(spec: str, manifest: dict) -> str:
    """The architecture the run recorded for ``spec``, else the one its config names."""
    entry = next((e for e in manifest.get("models") or [] if e.get("spec") == spec), {})
    if entry.get("model_type"):
        return str(entry["model_type"])
    from .models.load import parse_model_spec

    try:
        from transformers import AutoConfig

        ms = parse_model_spec(spec)
        return str(AutoConfig.from_pretrained(ms.location, revision=ms.revision).model_type)
    except Exception as e:  # noqa: BLE001 - any failure to read a config is the same for the user
        raise UnineuronsError(f"model {spec}: the run does not record its architecture and its "
                              f"config does not load ({type(e).__name__}); pass a run made by "
                              "`unineurons correlate`") from None


def name_table(neurons: pd.DataFrame, manifest: dict) -> pd.DataFrame:
    """``neurons`` (columns ``model``, ``layer``, ``neuron``) with the names in front:
    ``model``, ``address``, ``layer``, ``neuron``, ``tl_hook``, ``tl_index``, ``hf_module``,
    ``model_type``; the other columns follow unchanged."""
    missing = [c for c in ("model", "layer", "neuron") if c not in neurons.columns]
    if missing:
        raise UnineuronsError(f"the neuron table lacks column(s) {', '.join(missing)}")
    df = neurons.reset_index(drop=True).copy()
    types = {m: _model_type(m, manifest) for m in pd.unique(df["model"])}
    layer = df["layer"].astype(int)
    index = df["neuron"].astype(int)
    df["model_type"] = df["model"].map(types)
    df["address"] = "L" + layer.astype(str) + ".N" + index.astype(str)
    df["tl_hook"] = [tl_hook_name(x) for x in layer]
    df["tl_index"] = index
    df["hf_module"] = [hf_module_path(t, x) for t, x in zip(df["model_type"], layer, strict=True)]
    front = ["model", "address", "layer", "neuron", "tl_hook", "tl_index", "hf_module",
             "model_type"]
    return df[front + [c for c in df.columns if c not in front]]


def _plain(v: Any) -> Any:
    """A JSON value: numpy scalars as Python ones, NaN / NA as null."""
    if v is None or v is pd.NA:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def export_neurons(table: pd.DataFrame, fmt: Literal["csv", "json"], out: str | os.PathLike | None,
                   meta: dict[str, Any]) -> str:
    """Write ``table`` (a :func:`name_table`) as CSV or JSON to ``out`` (atomically), or return
    the text when ``out`` is None. JSON: ``{**meta, "n": rows, "neurons": [row objects]}``."""
    cols = list(table.columns[:8]) + [c for c in EXPORT_COLUMNS if c in table.columns]
    t = table[cols]
    if fmt == "csv":
        text = t.to_csv(index=False)
    elif fmt == "json":
        rows = [{k: _plain(v) for k, v in r.items()} for r in t.to_dict(orient="records")]
        text = json.dumps({**meta, "n": len(rows), "neurons": rows}, indent=1,
                          allow_nan=False) + "\n"
    else:
        raise UnineuronsError(f"format {fmt!r} is not one of: csv, json")
    if out is not None:
        from .io import atomic_path

        with atomic_path(Path(out)) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return text
