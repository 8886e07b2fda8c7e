"""The neuron browser's data: the run's tables turned into one compact JSON document.

The report embeds it in ``<script type="application/json">`` (see :func:`script_json`: every
``<``, ``>`` and ``&`` is a JSON ``\\u`` escape, so no corpus text can close the tag) and
``static/browser.js`` renders it: the table a page at a time, neuron pages on demand.

Layout (column-oriented, so thousands of neurons stay small)::

    models     [{spec, short, n_layers, d_mlp, rows, universal, context_neurons}]
    neurons    {n, model: [model index], columns: [{name, kind, ...}], visible: [names]}
               kind "num" (values, null = NaN), "int", "bool" (1/0/null), "cat" (levels, codes, -1)
    matches    {model, partner, layer, neuron, argmax_layer, argmax_neuron, max_corr, baseline_corr}
    contexts   {"m:L:N": {"scale": max |activation|, "items": [[value, position, window_start, row,
                [string index per token], [activation / scale * 100 per token] or null]]}}
    vocab      {"m:L:N": {"out_top"|"out_bottom"|"in_top"|"in_bottom": [[string index, cosine]]}}
    strings    [token strings]  (windows and vocab lists refer to them by index)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from ..progress import progress
from .tables import Tables, short_names

__all__ = ["browser_data", "script_json", "context_neurons", "chosen_mask", "round_sig",
           "StringTable", "DEFAULT_VISIBLE"]

#: Columns the table shows before the reader picks others.
DEFAULT_VISIBLE = ["model", "address", "excess_corr", "max_corr", "baseline_corr", "is_universal",
                   "role", "family", "family_feature", "act_freq", "act_kurt", "vocab_kurt",
                   "vocab_skew"]
_SKIP = {"model", "address"}  # rebuilt in the browser from the model index, layer and neuron


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: ``<``, ``>``, ``&`` and the JS
    line separators become ``\\u`` escapes (``JSON.parse`` reads them back unchanged), so no
    string in ``obj`` can end the script element or start a comment."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def round_sig(x: np.ndarray, digits: int = 4) -> list[float | None]:
    """``x`` rounded to ``digits`` significant digits as a JSON list; NaN and inf become None."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x) & (x != 0)
    mag = np.zeros_like(x)
    mag[ok] = np.floor(np.log10(np.abs(x[ok])))
    e = digits - 1 - mag  # decimal places to keep; negative: round to tens, hundreds, ...
    # divide or multiply by an exact power of ten so 1235 * 1e5 prints as 123500000.0
    up, down = 10.0 ** np.clip(e, 0, None), 10.0 ** np.clip(-e, 0, None)
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.where(ok, np.round(x * up / down) * down / up, x).astype(object)
    r[~np.isfinite(x)] = None
    return r.tolist()


class StringTable:
    """Interned strings: each distinct token string is stored once, referred to by index."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, s: Any) -> int:
        s = "" if s is None else str(s)
        i = self._index.get(s)
        if i is None:
            i = self._index[s] = len(self.strings)
            self.strings.append(s)
        return i


def _column(name: str, s: pd.Series) -> dict:
    if pd.api.types.is_bool_dtype(s) or (s.dtype == object and s.dropna().map(
            lambda v: isinstance(v, (bool, np.bool_))).all() and s.notna().any()):
        vals = [None if pd.isna(v) else int(bool(v)) for v in s]
        return {"name": name, "kind": "bool", "values": vals}
    if pd.api.types.is_integer_dtype(s) and not s.isna().any():
        return {"name": name, "kind": "int", "values": [int(v) for v in s]}
    if pd.api.types.is_numeric_dtype(s):
        return {"name": name, "kind": "num", "values": round_sig(s.to_numpy(dtype=float,
                                                                             na_value=np.nan))}
    cat = pd.Categorical(s.astype(object).where(s.notna(), None))
    return {"name": name, "kind": "cat", "levels": [str(v) for v in cat.categories],
            "codes": cat.codes.astype(int).tolist()}


def _neuron_table(neurons: pd.DataFrame, models: list[str]) -> dict:
    index = {m: i for i, m in enumerate(models)}
    n = neurons.sort_values(["model", "layer", "neuron"], key=lambda c: c.map(index)
                            if c.name == "model" else c, kind="stable")
    cols = [_column(c, n[c]) for c in n.columns if c not in _SKIP]
    have = {c["name"] for c in cols} | _SKIP
    return {"n": len(n), "model": n["model"].map(index).astype(int).tolist(), "columns": cols,
            "visible": [c for c in DEFAULT_VISIBLE if c in have]}


def _matches(matches: pd.DataFrame | None, models: list[str]) -> dict:
    keys = ["layer", "neuron", "argmax_layer", "argmax_neuron"]
    if matches is None or matches.empty:
        return {k: [] for k in ["model", "partner", *keys, "max_corr", "baseline_corr"]}
    index = {m: i for i, m in enumerate(models)}
    m = matches[matches["model"].isin(index) & matches["partner"].isin(index)]
    out = {"model": m["model"].map(index).tolist(), "partner": m["partner"].map(index).tolist()}
    for k in keys:
        out[k] = m[k].astype(int).tolist()
    for k in ("max_corr", "baseline_corr"):
        out[k] = round_sig(m[k].to_numpy(float), 3)
    return out


def chosen_mask(df: pd.DataFrame, chosen: dict[str, set[tuple[int, int]]]) -> np.ndarray:
    """Bool per row of ``df`` (columns model, layer, neuron): the neuron is in ``chosen``."""
    out = np.zeros(len(df), dtype=bool)
    code = df["layer"].to_numpy(np.int64) * 2**32 + df["neuron"].to_numpy(np.int64)  # [n]
    models = df["model"].to_numpy()
    for model, want in chosen.items():
        if want:
            keys = np.array([a * 2**32 + b for a, b in want], dtype=np.int64)
            out |= (models == model) & np.isin(code, keys)
    return out


def context_neurons(t: Tables, budget: int) -> dict[str, set[tuple[int, int]]]:
    """Per model, the neurons whose top contexts and vocabulary the report embeds: at most
    ``budget`` per model, chosen in this order: reference neurons by excess correlation (each
    followed by its best match in every partner), then every other neuron by the largest
    activation, so the universal neurons and their matches are always shown first."""
    keys = ["model", "layer", "neuron"]
    parts = []
    n = t.get("neurons")
    if n is not None and "excess_corr" in n:
        ref = n.loc[n["excess_corr"].notna(), keys + ["excess_corr"]]
        ref = ref.sort_values("excess_corr", ascending=False, kind="stable").reset_index(drop=True)
        ref["rank"] = np.arange(len(ref), dtype=np.float64)
        parts.append(ref.assign(sub=0)[keys + ["rank", "sub"]])
        mt = t.get("matches")
        if mt is not None and len(mt):
            m = mt[mt["argmax_layer"] >= 0].merge(ref[keys + ["rank"]], on=keys)
            m = m.assign(model=m["partner"], layer=m["argmax_layer"], neuron=m["argmax_neuron"],
                         sub=1)  # right after the reference neuron it matches
            parts.append(m[keys + ["rank", "sub"]])
    tc = t.get("top_contexts")
    if tc is not None and len(tc):
        top = tc.loc[tc["rank"] == 0, keys + ["value"]].sort_values("value", ascending=False,
                                                                   kind="stable")
        parts.append(top.assign(rank=np.inf, sub=np.arange(len(top)))[keys + ["rank", "sub"]])
    chosen: dict[str, set[tuple[int, int]]] = {m: set() for m in t.models}
    if not parts or budget <= 0:
        return chosen
    order = pd.concat(parts, ignore_index=True).sort_values(["rank", "sub"], kind="stable")
    order = order.drop_duplicates(keys)
    order = order[order.groupby("model", sort=False).cumcount() < budget]
    for model, g in order.groupby("model", sort=False):
        chosen[model] = set(zip(g["layer"].astype(int), g["neuron"].astype(int), strict=True))
    return chosen


def _contexts(tc: pd.DataFrame | None, chosen: dict[str, set[tuple[int, int]]],
              models: list[str], strings: StringTable,
              acts: dict[str, list[np.ndarray | None]] | None) -> dict:
    out: dict[str, dict] = {}
    if tc is None or tc.empty:
        return out
    index = {m: i for i, m in enumerate(models)}
    with progress("neuron pages: top contexts", int(chosen_mask(tc, chosen).sum()),
                  unit="windows") as bar:
        for model, g in tc.groupby("model", sort=False):
            model_acts = (acts or {}).get(model)
            keep = np.nonzero(chosen_mask(g, chosen))[0]  # positions within the model's rows
            sub = g.iloc[keep]
            for pos_in_g, r in zip(keep, sub.itertuples(index=False), strict=True):
                key = f"{index[model]}:{int(r.layer)}:{int(r.neuron)}"
                entry = out.setdefault(key, {"scale": 0.0, "items": [], "_raw": []})
                a = None if model_acts is None else model_acts[pos_in_g]
                entry["items"].append([float(r.value), int(r.position), int(r.window_start),
                                       int(r.row), [strings(s) for s in r.window_tokens], None])
                entry["_raw"].append(a)
                peak = np.abs(a).max() if a is not None and len(a) else abs(float(r.value))
                entry["scale"] = max(entry["scale"], float(peak))
                bar.advance(1)
    for entry in out.values():
        scale = entry["scale"] or 1.0
        for item, a in zip(entry["items"], entry.pop("_raw"), strict=True):
            item[0] = round_sig([item[0]])[0]
            if a is not None:
                item[5] = np.rint(100 * np.asarray(a) / scale).astype(int).tolist()
        entry["items"].sort(key=lambda it: -(it[0] or 0))
        entry["scale"] = round_sig([scale])[0]
    return out


def _vocab(v: pd.DataFrame | None, chosen: dict[str, set[tuple[int, int]]], models: list[str],
           strings: StringTable, k: int) -> dict:
    out: dict[str, dict] = {}
    if v is None or v.empty:
        return out
    index = {m: i for i, m in enumerate(models)}
    v = v[(v["rank"] <= k) & chosen_mask(v, chosen)]
    v = v.sort_values(["model", "layer", "neuron", "side", "direction", "rank"])
    n_pages = len(v[["model", "layer", "neuron"]].drop_duplicates())
    with progress("neuron pages: vocabulary", n_pages, unit="neurons") as bar:
        for (model, layer, neuron, side, direction), g in v.groupby(
                ["model", "layer", "neuron", "side", "direction"], sort=False):
            key = f"{index[model]}:{int(layer)}:{int(neuron)}"
            if key not in out:
                bar.advance(1)  # a new neuron's page: count it as it starts
            out.setdefault(key, {})[f"{side}_{direction}"] = [
                [strings(s), c] for s, c in zip(g["token"],
                                                round_sig(g["cosine"].to_numpy(float), 3),
                                                strict=True)]
    return out


def _model_rows(t: Tables, models: list[str], chosen: dict, n: pd.DataFrame | None) -> list[dict]:
    entries = {e["spec"]: e for e in t.manifest.get("models") or []}
    names = short_names(models)
    out = []
    for m in models:
        e = entries.get(m, {})
        rows = n[n["model"] == m] if n is not None else pd.DataFrame()
        univ = int(rows["is_universal"].fillna(False).astype(bool).sum()) \
            if "is_universal" in rows else None
        out.append({"spec": m, "short": names[m], "n_layers": e.get("n_layers"),
                    "d_mlp": e.get("d_mlp"), "rows": len(rows), "universal": univ,
                    "context_neurons": len(chosen.get(m, ()))})
    return out


def browser_data(t: Tables, max_context_neurons: int = 2000, vocab_k: int = 10,
                 acts: dict[str, list[np.ndarray | None]] | None = None) -> dict:
    """The browser's JSON document (module docstring) for the run behind ``t``.

    ``acts`` (optional, per model, aligned with that model's rows of top_contexts.parquet in
    table order) holds each window's per-token activations; without it the browser shades the
    activating token only.
    """
    models = t.models
    n = t.get("neurons")
    chosen = context_neurons(t, max_context_neurons)
    strings = StringTable()
    data = {
        "models": _model_rows(t, models, chosen, n),
        "threshold": t.threshold,
        "neurons": _neuron_table(n, models) if n is not None else
        {"n": 0, "model": [], "columns": [], "visible": []},
        "matches": _matches(t.get("matches"), models),
        "contexts": _contexts(t.get("top_contexts"), chosen, models, strings, acts),
        "vocab": _vocab(t.get("vocab"), chosen, models, strings, vocab_k),
    }
    data["strings"] = strings.strings
    return data
