"""The correlate pass's analyses beyond the papers, hooked into the engine in two calls.

- :func:`unit_extras`: per finished co-moment block, layer similarity
  (:mod:`~unineurons.correlate.similarity`) and one-to-one matching
  (:mod:`~unineurons.correlate.matching`); saved with the pass's results.
- :func:`write_extras`: after the run's tables exist, ``layer_similarity.parquet``, the
  matching columns of ``matches.parquet`` and ``layers.parquet``, and
  ``partner_kinds.parquet`` when every model's init and data seeds are known
  (:mod:`~unineurons.correlate.partner_kinds`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..accumulators.comoments import CoMoments, LayerCov
from ..rundir import RunDir
from .matching import matching_work_bytes, unit_matching
from .plan import ModelShape, Plan, Unit
from .similarity import FIELDS, similarity_work_bytes, unit_similarity

__all__ = ["unit_extras", "write_extras", "extras_work_bytes", "layer_similarity_table"]


def extras_work_bytes(u: Unit, shapes: list[ModelShape]) -> int:
    """Working bytes of :func:`unit_extras` for block ``u`` (0 for a ceiling block)."""
    if u.kind != "pair":
        return 0
    da, db = shapes[u.a].d_mlp, shapes[u.b].d_mlp
    return max(similarity_work_bytes(u.l0, u.l1, da, db), matching_work_bytes(da, db))


def unit_extras(u: Unit, co: CoMoments, layercov: list[LayerCov], rots: list[list[torch.Tensor]],
                shapes: list[ModelShape]) -> dict[str, torch.Tensor]:
    """Layer similarity (``{key}.sim``) and, for models of equal depth, one-to-one matching
    (``{key}.match.*``) of one finished pair block; nothing for a ceiling block."""
    if u.kind != "pair":
        return {}
    key, n = u.key(), co.n
    cov_a, cov_b = layercov[u.a].c, layercov[u.b].c
    out = {f"{key}.sim": unit_similarity(co.c, float(n), u.l0, u.l1, cov_a, cov_b,
                                         rots[u.a], rots[u.b])}
    if shapes[u.a].n_layers == shapes[u.b].n_layers:
        for k, v in unit_matching(co.c, n, u.l0, u.l1, cov_a, cov_b, rots[u.a], rots[u.b]).items():
            out[f"{key}.match.{k}"] = v
    return out


def _pair_units(plan: Plan) -> list[Unit]:
    return sorted((u for p in plan.passes for u in p if u.kind == "pair"),
                  key=lambda u: (u.a, u.b, u.l0))


def layer_similarity_table(names: list[str], plan: Plan, res: dict[str, torch.Tensor]
                           ) -> pd.DataFrame:
    """``layer_similarity.parquet``: one row per (model, layer, partner, partner_layer), both
    directions of every correlated pair; see docs/tables.md."""
    rows = []
    for u in _pair_units(plan):
        sim = res.get(f"{u.key()}.sim")
        if sim is None:
            continue
        s = sim.numpy()
        for i, la in enumerate(range(u.l0, u.l1)):
            for lb in range(s.shape[1]):
                v = dict(zip(FIELDS, s[i, lb].tolist(), strict=True))
                for model, layer, partner, player, tag in ((u.a, la, u.b, lb, "ab"),
                                                           (u.b, lb, u.a, la, "ba")):
                    rows.append({"model": names[model], "layer": layer, "partner": names[partner],
                                 "partner_layer": player, "cka": v["cka"],
                                 "cka_debiased": v["cka_debiased"],
                                 "ridge_r2": v[f"ridge_r2_{tag}"],
                                 "ridge_r2_in_sample": v[f"ridge_r2_in_{tag}"],
                                 "ridge_lambda": v[f"ridge_lambda_{tag}"],
                                 "neuron_r2": v[f"neuron_r2_{tag}"],
                                 "rotated_r2": v[f"rotated_r2_{tag}"]})
    df = pd.DataFrame(rows)
    if len(df):
        df["neuron_share"] = df["neuron_r2"] / df["ridge_r2"]
        df = df.sort_values(["model", "partner", "layer", "partner_layer"]).reset_index(drop=True)
    return df


def _matching_frame(names: list[str], shapes: list[ModelShape], plan: Plan,
                    res: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per (model, partner, layer, neuron): assigned_neuron, assigned_corr, mutual_best,
    mutual_best_baseline, for every direction a matching was computed in."""
    parts: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for u in _pair_units(plan):
        pre = f"{u.key()}.match."
        if pre + "row_assigned" not in res:
            continue
        for side, (m, p) in (("row", (u.a, u.b)), ("col", (u.b, u.a))):
            parts.setdefault((m, p), []).append(
                (u.l0, {k: res[f"{pre}{side}_{k}"].numpy() for k in
                        ("assigned", "assigned_corr", "mutual", "mutual_base")}))
    frames = []
    for (m, p), lst in parts.items():
        lst.sort(key=lambda t: t[0])
        cat = {k: np.concatenate([d[k] for _, d in lst]) for k in lst[0][1]}
        sm = shapes[m]
        frames.append(pd.DataFrame({
            "model": names[m], "partner": names[p],
            "layer": np.repeat(np.arange(sm.n_layers), sm.d_mlp),
            "neuron": np.tile(np.arange(sm.d_mlp), sm.n_layers),
            "assigned_neuron": cat["assigned"], "assigned_corr": cat["assigned_corr"],
            "mutual_best": cat["mutual"].astype(bool),
            "mutual_best_baseline": cat["mutual_base"].astype(bool)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_extras(run: RunDir, names: list[str], shapes: list[ModelShape], plan: Plan,
                 res: dict[str, torch.Tensor], threshold: float,
                 locations: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``layer_similarity.parquet``, add the matching columns to ``matches.parquet`` and
    their per-layer shares to ``layers.parquet``, and write ``partner_kinds.parquet`` (and the
    per-kind excess columns of ``neurons.parquet``) when the seeds of every model are recorded
    (``locations``: the models' folders). Returns the updated neurons and layers tables."""
    sim = layer_similarity_table(names, plan, res)
    if len(sim):
        run.write_table("layer_similarity", sim)
    match = _matching_frame(names, shapes, plan, res)
    keys = ["model", "partner", "layer", "neuron"]
    if len(match) and run.has_table("matches"):
        m = run.read_table("matches")
        m = m.drop(columns=[c for c in match.columns if c in m.columns and c not in keys])
        m = m.merge(match, on=keys, how="left")
        for c in ("mutual_best", "mutual_best_baseline"):
            m[c] = m[c].astype("boolean")
        run.write_table("matches", m)
        if run.has_table("layers"):
            per = match.groupby(["model", "layer"]).agg(
                mutual_best_share=("mutual_best", "mean"),
                baseline_mutual_best_share=("mutual_best_baseline", "mean"),
                mean_assigned_corr=("assigned_corr", "mean")).reset_index()
            layers = run.read_table("layers")
            layers = layers.drop(columns=[c for c in per.columns if c in layers.columns
                                          and c not in ("model", "layer")])
            run.write_table("layers", layers.merge(per, on=["model", "layer"], how="left"))
    if locations is not None and run.has_table("matches"):
        from .partner_kinds import model_seeds, write_partner_kinds

        seeds = {n: model_seeds(loc) for n, loc in zip(names, locations, strict=True)}
        if all(s is not None for s in seeds.values()):
            write_partner_kinds(run, seeds, threshold)  # type: ignore[arg-type]
    return run.read_table("neurons"), run.read_table("layers")
