"""Tables of the analyze stage: top contexts, universal-vs-other properties, summary counts.

Columns of every table are documented in docs/tables.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..accumulators.topk import context_windows
from ..features import Vocabulary
from ..io import atomic_path
from ..rundir import RunDir

__all__ = ["top_contexts_table", "write_arrow_rows", "properties_table", "summary_counts",
           "NOT_PROPERTIES"]

#: Numeric neurons.parquet columns that are not neuron properties: keys and the universality
#: measures themselves (comparing universal neurons on them is circular).
NOT_PROPERTIES = {"layer", "neuron", "is_universal", "excess_norm", "n_partners", "p_value", "q_value",
                  "family_duplicates", "attn_max_head_layer", "attn_max_head"}


def top_contexts_table(model: str, d_mlp: int, top: dict[str, torch.Tensor], contexts: np.ndarray,
                       vocab: Vocabulary, before: int = 24, after: int = 8) -> pa.Table:
    """One row per (neuron, rank) of a :class:`~unineurons.accumulators.TopK` result.

    Built column-wise in Arrow (list columns from flat values and offsets): a model with 10^5
    neurons and k = 10 gives 10^6 windows, too many for per-row Python objects.
    """
    values = top["values"].cpu().numpy()  # [k, d]
    rows = top["rows"].cpu().numpy()
    pos = top["positions"].cpu().numpy()
    k, d = values.shape
    rank, flat = np.nonzero(rows >= 0)  # filled slots only; rank-major
    order = np.lexsort((rank, flat))  # neuron-major, then rank
    rank, flat = rank[order], flat[order]
    r, p = rows[rank, flat], pos[rank, flat]
    windows, starts = context_windows(contexts, r, p, before, after)
    lengths = np.array([len(w) for w in windows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ids = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
    # each window's strings concatenate to its text (a character split over tokens included)
    strings = pa.array(vocab.sequence_strings(ids, offsets.to_numpy()), pa.string())
    return pa.table({
        "model": pa.array([model] * len(flat), pa.string()),
        "layer": pa.array(flat // d_mlp, pa.int64()),
        "neuron": pa.array(flat % d_mlp, pa.int64()),
        "rank": pa.array(rank, pa.int64()),
        "value": pa.array(values[rank, flat], pa.float64()),
        "row": pa.array(r, pa.int64()),
        "position": pa.array(p, pa.int64()),
        "window_start": pa.array(starts, pa.int64()),
        "window_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int64())),
        "window_tokens": pa.ListArray.from_arrays(offsets, strings),
    })


def write_arrow_rows(run: RunDir, name: str, tables: Sequence[pa.Table]) -> None:
    """Write table ``name`` atomically: the models in ``tables`` replace their old rows."""
    new = pa.concat_tables(tables)
    path = run.table_path(name)
    if path.is_file():
        old = pq.read_table(path)
        if old.schema.equals(new.schema):
            models = pa.array(sorted(set(new.column("model").to_pylist())))
            keep = pc.invert(pc.is_in(old.column("model"), value_set=models))
            new = pa.concat_tables([old.filter(keep), new])
    with atomic_path(path) as tmp:
        pq.write_table(new, tmp)


def properties_table(neurons: pd.DataFrame) -> pd.DataFrame | None:
    """Universal vs other neurons, statistic by statistic, per model and layer.

    Each numeric neuron column is z-scored within (model, layer) over the neurons where it is
    defined, then averaged over the universal and over the other neurons. Columns: ``model,
    layer, statistic, universal_mean_z, other_mean_z, n_universal, n_other``. None when the
    table has no ``is_universal`` column.
    """
    if "is_universal" not in neurons.columns or neurons["is_universal"].isna().all():
        return None
    # only models the correlate stage ranked (in reference mode, the reference)
    neurons = neurons[neurons["is_universal"].notna()]
    stats = [c for c in neurons.columns if c not in NOT_PROPERTIES and "corr" not in c
             and pd.api.types.is_numeric_dtype(neurons[c]) and not pd.api.types.is_bool_dtype(
                 neurons[c])]
    out = []
    for (model, layer), g in neurons.groupby(["model", "layer"], sort=True):
        univ = g["is_universal"].fillna(False).astype(bool).to_numpy()
        for s in stats:
            x = g[s].to_numpy(dtype=np.float64, na_value=np.nan)
            ok = np.isfinite(x)
            sd = x[ok].std() if ok.any() else 0.0
            if not ok.any() or sd == 0:
                continue  # constant or undefined in this layer: no z-score
            z = (x - x[ok].mean()) / sd
            zu, zo = z[ok & univ], z[ok & ~univ]
            out.append({"model": model, "layer": int(layer), "statistic": s,
                        "universal_mean_z": float(zu.mean()) if len(zu) else np.nan,
                        "other_mean_z": float(zo.mean()) if len(zo) else np.nan,
                        "n_universal": int(len(zu)), "n_other": int(len(zo))})
    return pd.DataFrame(out, columns=["model", "layer", "statistic", "universal_mean_z",
                                      "other_mean_z", "n_universal", "n_other"])


def summary_counts(neurons: pd.DataFrame, column: str) -> pd.DataFrame:
    """Neurons per value of ``column`` (e.g. family, role), universal and other when known.

    Columns: ``column``, ``universal`` (the paper criterion), ``calibrated`` (neurons with
    ``is_universal_calibrated``, when the run has it), ``other`` (not paper-universal), ``total``.

    Neurons where ``column`` is missing (not analysed) are left out.
    """
    df = neurons[neurons[column].notna()]
    if "is_universal" in df.columns and df["is_universal"].notna().any():
        univ = df["is_universal"].fillna(False).astype(bool)
        out = pd.DataFrame({"universal": df[univ].groupby(column).size(),
                            "other": df[~univ].groupby(column).size()}).fillna(0).astype(int)
        out["total"] = out["universal"] + out["other"]
        if "is_universal_calibrated" in df.columns and df["is_universal_calibrated"].notna().any():
            # the calibrated criterion beside the paper's (issue 13: both wherever the set is used)
            cal = df["is_universal_calibrated"].fillna(False).astype(bool)
            counts = df[cal].groupby(column).size().reindex(out.index).fillna(0).astype(int)
            out.insert(1, "calibrated", counts)
    else:
        out = pd.DataFrame({"total": df.groupby(column).size()})
    out = out.sort_values("total", ascending=False, kind="stable")
    return out.rename_axis(column).reset_index()
