"""Universality by partner kind: what comes from the initialisation, what from the data order.

Two models of a seed grid (``zoo train --init-seeds I --data-seeds D``) share their
initialisation, their data order, both or neither. For each model and each kind of partner
— ``same-init`` (same initial weights, another data order), ``same-data`` (same data order,
other initial weights), ``both-different`` — the excess correlation of each neuron is taken
over the partners of that kind only (Gurnee et al. eq. 3 restricted to them), and per layer
the mean excess and the share of neurons above the universality threshold are reported. With the calibrated null
(``--null-rotations``) the calibrated criterion is applied the same way (:func:`kind_calibrated`):
the test of :mod:`~unineurons.correlate.calibrate` with both the statistic and its rotation
null averaged over this kind's partners only, BH within the model and kind.
Pairs with the same init *and* data seeds are ``identical`` (a determinism check).

A model's seeds come from its folder (:func:`model_seeds`): ``member.json`` of a zoo grid
member (``init_seed``, ``data_seed``), else a zoo checkpoint's ``zoo_checkpoint.json`` (its
``init_seed`` / ``data_seed``, or ``seed`` for both). Hub families (PolyPythias' data-seed and
weight-seed variants) have no such file: pass their seeds explicitly to
:func:`write_partner_kinds`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UnineuronsError
from ..rundir import RunDir

__all__ = ["KINDS", "partner_kind", "model_seeds", "partner_kinds_table", "write_partner_kinds",
           "neuron_kind_columns", "kind_calibrated", "kind_calibrated_neurons",
           "write_dynamics_partner_kinds"]

KINDS = ("same-init", "same-data", "both-different", "identical")

Seeds = tuple[int | str, int | str]


def partner_kind(a: Seeds, b: Seeds) -> str:
    """The kind of partner ``b`` is for ``a``, both given as ``(init_seed, data_seed)``."""
    same_init, same_data = a[0] == b[0], a[1] == b[1]
    if same_init and same_data:
        return "identical"
    if same_init:
        return "same-init"
    if same_data:
        return "same-data"
    return "both-different"


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def model_seeds(location: str | Path) -> Seeds | None:
    """``(init_seed, data_seed)`` recorded in a model folder or its parent (a zoo member's
    ``member.json``, a checkpoint's ``zoo_checkpoint.json``); None when nothing is recorded
    (a hub model, or a folder made elsewhere)."""
    p = Path(location)
    if not p.is_dir():
        return None
    for folder in (p, p.parent):
        d = _read(folder / "member.json")
        if d and "init_seed" in d and "data_seed" in d:
            return int(d["init_seed"]), int(d["data_seed"])
    d = _read(p / "zoo_checkpoint.json")
    if d:
        if "init_seed" in d and "data_seed" in d:
            return int(d["init_seed"]), int(d["data_seed"])
        if isinstance(d.get("seed"), int):
            return d["seed"], d["seed"]
    return None


def partner_kinds_table(matches: pd.DataFrame, seeds: dict[str, Seeds], threshold: float
                        ) -> pd.DataFrame:
    """``partner_kinds.parquet`` from ``matches.parquet`` and each model's seeds.

    ``matches``: one row per (model, partner, layer, neuron) with ``max_corr`` and
    ``baseline_corr``; ``seeds``: ``{model: (init_seed, data_seed)}`` for every model in it.
    Returns one row per (model, layer, partner_kind) with ``n_partners``, ``neurons``,
    ``mean_max_corr``, ``mean_baseline_corr``, ``mean_excess_corr``, ``universal`` and
    ``universal_share`` (excess over that kind's partners > ``threshold``). Raises
    :class:`UnineuronsError` when a model has no seeds.
    """
    missing = sorted(m for m in set(matches["model"]) | set(matches["partner"]) if m not in seeds)
    if missing:
        raise UnineuronsError(f"partner kinds: no init/data seeds for model {missing[0]}; give "
                              "every model's seeds (zoo grid members record them)")
    m = matches[["model", "partner", "layer", "neuron", "max_corr", "baseline_corr"]].copy()
    m["partner_kind"] = [partner_kind(seeds[a], seeds[b])
                         for a, b in zip(m["model"], m["partner"], strict=True)]
    m["excess_corr"] = m["max_corr"] - m["baseline_corr"]
    per = m.groupby(["model", "partner_kind", "layer", "neuron"]).agg(
        max_corr=("max_corr", "mean"), baseline_corr=("baseline_corr", "mean"),
        excess_corr=("excess_corr", "mean"), n_partners=("partner", "nunique")).reset_index()
    per["universal"] = per["excess_corr"] > threshold
    out = per.groupby(["model", "layer", "partner_kind"]).agg(
        n_partners=("n_partners", "max"), neurons=("neuron", "size"),
        mean_max_corr=("max_corr", "mean"), mean_baseline_corr=("baseline_corr", "mean"),
        mean_excess_corr=("excess_corr", "mean"), universal=("universal", "sum"),
        universal_share=("universal", "mean")).reset_index()
    out["universal"] = out["universal"].astype(np.int64)
    out["threshold"] = threshold
    order = {k: i for i, k in enumerate(KINDS)}
    out = out.sort_values(["model", "layer", "partner_kind"],
                          key=lambda s: s.map(order) if s.name == "partner_kind" else s)
    return out.reset_index(drop=True)


def neuron_kind_columns(matches: pd.DataFrame, seeds: dict[str, Seeds]) -> pd.DataFrame:
    """Per neuron (``model, layer, neuron``) the excess correlation over each partner kind's
    partners only: columns ``excess_corr_same_init``, ``excess_corr_same_data``,
    ``excess_corr_both_different`` (NaN where the model has no partner of that kind)."""
    m = matches[["model", "partner", "layer", "neuron", "max_corr", "baseline_corr"]].copy()
    m["partner_kind"] = [partner_kind(seeds[a], seeds[b])
                         for a, b in zip(m["model"], m["partner"], strict=True)]
    m["excess"] = m["max_corr"] - m["baseline_corr"]
    wide = m.pivot_table(index=["model", "layer", "neuron"], columns="partner_kind",
                         values="excess", aggfunc="mean")
    out = pd.DataFrame(index=wide.index)
    for k in KINDS[:3]:
        col = wide[k] if k in wide.columns else np.nan
        out[f"excess_corr_{k.replace('-', '_')}"] = col
    return out.reset_index()


def kind_calibrated_neurons(rd: RunDir, matches: pd.DataFrame, seeds: dict[str, Seeds],
                            fdr: float) -> pd.DataFrame | None:
    """The calibrated test per neuron and partner kind: one row per (model, partner_kind,
    layer, neuron) with ``p_value``, ``q_value`` and ``is_universal_calibrated``.

    For model a and kind k with partners P_k, the statistic is ``T_i = mean_{m in P_k} max_j
    ρ(x_i, y^m_j)`` and its null the same mean of each partner's rotated maxima draw by draw
    (``null_max_corr [R, N]`` of each pair file ``pairs/{a}__{m}.safetensors``), i.e. exactly
    :func:`~unineurons.correlate.calibrate.calibrated_columns` restricted to P_k; q-values are
    Benjamini-Hochberg over the model's neurons within the kind; universal if ``q < fdr``.
    The pair files hold the null maxima in float32 (the run's own p-values use float64), so
    p-values agree with a run on P_k alone to float32 precision. None when a pair file or its
    null is missing (a run without ``--null-rotations``).
    """
    from ..io import load_tensors
    from ..rundir import pair_file_name
    from .calibrate import calibrated_columns

    parts = []
    for a, ma in matches.groupby("model", sort=False):
        first = ma[ma["partner"] == ma["partner"].iloc[0]].sort_values(["layer", "neuron"])
        layer = first["layer"].to_numpy()  # [N], flat order: layer * d_mlp + neuron
        kinds: dict[str, list[str]] = {}
        for b in dict.fromkeys(ma["partner"]):
            kinds.setdefault(partner_kind(seeds[a], seeds[b]), []).append(b)
        for kind, partners in kinds.items():
            maxes, nulls = [], []
            for b in partners:
                f = rd.pairs_dir / pair_file_name(a, b)
                if not f.is_file():
                    return None
                t, _ = load_tensors(f, "pair file")
                if "null_max_corr" not in t:
                    return None
                maxes.append(t["max_corr"].double().numpy())  # [N]
                nulls.append(t["null_max_corr"].double().numpy())  # [R, N]
            c = calibrated_columns(np.mean(maxes, 0), nulls, layer, fdr)
            parts.append(pd.DataFrame({
                "model": a, "partner_kind": kind, "layer": layer,
                "neuron": first["neuron"].to_numpy(), "p_value": c["p_value"],
                "q_value": c["q_value"], "is_universal_calibrated": c["is_universal_calibrated"]}))
    return pd.concat(parts, ignore_index=True) if parts else None


def kind_calibrated(rd: RunDir, matches: pd.DataFrame, seeds: dict[str, Seeds], fdr: float
                    ) -> pd.DataFrame | None:
    """Per (model, layer, partner_kind): ``universal_calibrated`` and
    ``universal_calibrated_share`` of :func:`kind_calibrated_neurons` (None where it is)."""
    per = kind_calibrated_neurons(rd, matches, seeds, fdr)
    if per is None:
        return None
    g = per.groupby(["model", "layer", "partner_kind"], sort=False)["is_universal_calibrated"]
    out = g.agg(universal_calibrated="sum", universal_calibrated_share="mean").reset_index()
    out["universal_calibrated"] = out["universal_calibrated"].astype(np.int64)
    return out


def write_partner_kinds(run: str | Path | RunDir, seeds: dict[str, Seeds] | None = None,
                        threshold: float | None = None) -> pd.DataFrame:
    """Write ``partner_kinds.parquet`` of a finished correlate run and return it.

    ``seeds``: ``{model spec: (init_seed, data_seed)}``; models left out are looked up with
    :func:`model_seeds` (their recorded folder). ``threshold``: the run's by default. With
    the calibrated null in the pair files, the columns of :func:`kind_calibrated` too (at the
    run's ``fdr``).
    """
    rd = run if isinstance(run, RunDir) else RunDir.open(run)
    man = rd.manifest()
    given = dict(seeds or {})
    for mod in man.get("models", []):
        if mod["spec"] not in given and mod.get("location"):
            s = model_seeds(mod["location"])
            if s is not None:
                given[mod["spec"]] = s
    if threshold is None:
        threshold = float(man.get("correlate", {}).get("config", {}).get("threshold", 0.5))
    matches = rd.read_table("matches")
    df = partner_kinds_table(matches, given, threshold)
    fdr = float(man.get("correlate", {}).get("config", {}).get("fdr", 0.01))
    cal = kind_calibrated(rd, matches, given, fdr)
    if cal is not None:  # the calibrated criterion beside the paper's (with a null)
        df = df.merge(cal, on=["model", "layer", "partner_kind"], how="left", validate="one_to_one")
        df["fdr"] = fdr
    rd.write_table("partner_kinds", df)
    rd.update_neurons(neuron_kind_columns(matches, given))
    return df


def write_dynamics_partner_kinds(run: RunDir, step_runs: dict[int, Path]) -> pd.DataFrame | None:
    """``partner_kinds.parquet`` of a dynamics run: each step's run directory's table (written
    by its correlate stage when the models' seeds are recorded) with a ``step`` column, in
    ascending steps. None (and no table; an old one removed) when no step has one."""
    parts = []
    for t in sorted(step_runs):
        p = Path(step_runs[t]) / "partner_kinds.parquet"
        if p.is_file():
            df = pd.read_parquet(p)
            parts.append(df.assign(step=t)[["step"] + list(df.columns)])
    if not parts:
        if run.has_table("partner_kinds"):
            run.table_path("partner_kinds").unlink()
        return None
    out = pd.concat(parts, ignore_index=True)
    run.write_table("partner_kinds", out)
    return out
