"""The tables of the training-dynamics analysis, as pure functions of per-step tables.

Every function here takes plain DataFrames (one row per neuron and step, or per layer and step)
and returns a DataFrame; nothing loads models or touches disk, so each is tested directly
against a hand-made sequence of universal sets. :mod:`unineurons.analyses.dynamics` runs the
correlate stage at every checkpoint step and feeds its tables through these.

A neuron is identified across steps by ``(member, layer, neuron)``: the same layer and index of
the same seed-family member (``member``: ``seed{S}`` for a zoo, the name for a hub family) at
every step. ``U_t`` is the set of a member's neurons marked universal at step ``t``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import UnineuronsError

__all__ = ["parse_universal", "universal_mask", "persistence_table", "first_universal_table",
           "emergence_table", "ALL_LAYERS"]

#: ``layer`` value of the rows that pool every layer of a model (as in ablations.parquet).
ALL_LAYERS = -1


def parse_universal(rule: str) -> tuple[str, float | None]:
    """``threshold`` -> ("threshold", None); ``top:S`` (0 < S <= 1) -> ("top", S);
    ``calibrated`` -> ("calibrated", None)."""
    if rule in ("threshold", "calibrated"):
        return rule, None
    if rule.startswith("top:"):
        try:
            share = float(rule[len("top:"):])
        except ValueError:
            share = float("nan")
        if 0 < share <= 1:
            return "top", share
    raise UnineuronsError(
        f"universal rule {rule!r} is not understood; use threshold (excess correlation > "
        "--threshold, Gurnee et al.) or top:S with 0 < S <= 1 (e.g. top:0.05: the 5% of each "
        "model's neurons with the highest excess correlation) or calibrated (BH q < FDR against "
        "the neuron's rotation null: correlate's is_universal_calibrated)"
    )


def universal_mask(excess: np.ndarray, layer: np.ndarray, neuron: np.ndarray, rule: str,
                   threshold: float, calibrated: np.ndarray | None = None) -> np.ndarray:
    """Which neurons of ONE model at ONE step are in U_t, as a bool array like ``excess``.

    ``threshold``: ``excess > threshold`` (strict, as the correlate stage marks them).
    ``top:S``: the ``ceil(S * n)`` neurons (n = all of the model's neurons) with the highest
    excess, ties broken by lower layer then lower index (the order the ablate stage ranks
    in); neurons with NaN excess (zero variance) are never universal, so fewer may be chosen.
    ``calibrated``: the correlate stage's ``is_universal_calibrated``, given as ``calibrated``.
    """
    kind, share = parse_universal(rule)
    if kind == "calibrated":
        if calibrated is None:
            raise UnineuronsError("--universal calibrated needs is_universal_calibrated in each "
                                  "step's neurons.parquet; correlate with --null-rotations > 0")
        return pd.Series(calibrated).fillna(False).to_numpy(dtype=bool)
    excess = np.asarray(excess, dtype=np.float64)  # [n]
    finite = np.isfinite(excess)
    if kind == "threshold":
        return finite & (excess > threshold)
    assert share is not None
    # round first: 0.1 * 30 is 3.0000000000000004 in floats and must stay 3
    k = math.ceil(round(share * excess.size, 9))
    idx = np.nonzero(finite)[0]
    order = np.lexsort((np.asarray(neuron)[idx], np.asarray(layer)[idx], -excess[idx]))
    out = np.zeros(excess.size, dtype=bool)
    out[idx[order[:k]]] = True
    return out


def _members(table: pd.DataFrame) -> pd.DataFrame:
    if "member" in table.columns:
        return table
    return table.assign(member="reference")


def _matrix(g: pd.DataFrame, steps: list[int]) -> tuple[np.ndarray, pd.MultiIndex]:
    """``[S, n]`` bool: is neuron j (columns: sorted (layer, neuron)) universal at step i.

    A neuron missing at a step counts as not universal there.
    """
    wide = g.pivot_table(index="step", columns=["layer", "neuron"], values="is_universal",
                         aggfunc="max", fill_value=False)
    wide = wide.reindex(index=steps, fill_value=False).fillna(False)
    return wide.to_numpy(dtype=bool), wide.columns  # [S, n]


def _check(table: pd.DataFrame, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}")


def persistence_table(table: pd.DataFrame) -> pd.DataFrame:
    """P_persist and Jaccard between the universal sets of every step and every later step.

    ``table``: one row per (member, step, layer, neuron) with ``is_universal`` (``member``
    optional: one model when absent). One output row per member, layer (``-1``: all layers
    pooled) and step pair ``t <= t'`` (``t' = t`` included: P = 1 whenever U_t is non-empty):

    - ``p_persist = |U_t ∩ U_t'| / |U_t|``: NaN (not 0) when U_t is empty, since there is
      nothing that could persist;
    - ``jaccard = |U_t ∩ U_t'| / |U_t ∪ U_t'|``: NaN when both are empty.
    """
    _check(table, ("step", "layer", "neuron", "is_universal"), "persistence_table")
    table = _members(table)
    steps = sorted(int(s) for s in table["step"].unique())
    rows = []
    for member, g in table.groupby("member", sort=False):
        u, cols = _matrix(g, steps)  # [S, n]
        layers = cols.get_level_values("layer").to_numpy()  # [n]
        for layer in [ALL_LAYERS, *sorted(int(x) for x in np.unique(layers))]:
            ul = (u if layer == ALL_LAYERS else u[:, layers == layer]).astype(np.int64)
            inter = ul @ ul.T  # [S, S] |U_t ∩ U_t'|
            size = np.diag(inter)  # [S] |U_t|
            union = size[:, None] + size[None, :] - inter  # [S, S]
            for i, t in enumerate(steps):
                for j in range(i, len(steps)):
                    rows.append({
                        "member": member, "layer": layer, "step": t, "later_step": steps[j],
                        "n_universal": int(size[i]), "n_universal_later": int(size[j]),
                        "n_persist": int(inter[i, j]), "n_union": int(union[i, j]),
                        "p_persist": inter[i, j] / size[i] if size[i] else float("nan"),
                        "jaccard": inter[i, j] / union[i, j] if union[i, j] else float("nan"),
                    })
    return pd.DataFrame(rows, columns=[
        "member", "layer", "step", "later_step", "n_universal", "n_universal_later",
        "n_persist", "n_union", "p_persist", "jaccard"])


def first_universal_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per (member, layer, neuron): when it became universal and whether it stayed.

    - ``universal_steps``: at how many of the steps it is universal;
    - ``first_step``: the first step it is universal at (<NA> if never);
    - ``stable_from``: the first step from which it is universal at every later step up to
      and including the last one (<NA> if it is not universal at the last step);
    - ``universal_final``: universal at the last step.
    """
    _check(table, ("step", "layer", "neuron", "is_universal"), "first_universal_table")
    table = _members(table)
    steps = sorted(int(s) for s in table["step"].unique())
    step_arr = np.asarray(steps, dtype=np.int64)  # [S]
    frames = []
    for member, g in table.groupby("member", sort=False):
        u, cols = _matrix(g, steps)  # [S, n]
        # suffix[i, j]: universal at every step from i on
        suffix = np.flip(np.logical_and.accumulate(np.flip(u, 0), axis=0), 0)  # [S, n]
        any_u, any_s = u.any(0), suffix.any(0)  # [n]
        first = np.where(any_u, step_arr[u.argmax(0)], -1)
        stable = np.where(any_s, step_arr[suffix.argmax(0)], -1)
        frames.append(pd.DataFrame({
            "member": member,
            "layer": cols.get_level_values("layer").astype(np.int64),
            "neuron": cols.get_level_values("neuron").astype(np.int64),
            "universal_steps": u.sum(0).astype(np.int64),
            "first_step": pd.arrays.IntegerArray(first, ~any_u),  # masked: <NA>
            "stable_from": pd.arrays.IntegerArray(stable, ~any_s),
            "universal_final": u[-1],
        }))
    return pd.concat(frames, ignore_index=True)


def emergence_table(layers: pd.DataFrame, marked: pd.DataFrame) -> pd.DataFrame:
    """The universal share per layer as training goes on (Nandan et al. Fig. 1).

    ``layers``: the correlate stage's ``layers.parquet`` rows of every step, with ``step``
    and ``member`` columns added. ``marked``: one row per (step, member, layer, neuron) with
    ``is_universal`` by the analysis' rule. Output: the ``layers`` rows with ``universal``
    and ``universal_share`` recounted from ``marked`` (equal to the correlate stage's own
    under the threshold rule at the same threshold) and, when ``layers`` has the correlate
    stage's ``universal``, that count kept as ``universal_paper`` / ``universal_paper_share``
    (the paper's criterion beside any rule), sorted by member (in the order they
    first appear in ``layers``), step and layer.
    """
    _check(layers, ("step", "member", "layer", "neurons"), "emergence_table")
    _check(marked, ("step", "member", "layer", "is_universal"), "emergence_table")
    counts = (marked.groupby(["step", "member", "layer"], sort=False)["is_universal"]
              .sum().astype(np.int64).rename("universal").reset_index())
    out = layers.drop(columns=[c for c in ("universal", "universal_share") if c in layers])
    if "universal" in layers and "neurons" in layers:  # the correlate stage's paper count
        out["universal_paper"] = layers["universal"].astype(np.int64)
        out["universal_paper_share"] = out["universal_paper"] / out["neurons"]
    out = out.merge(counts, on=["step", "member", "layer"], how="left", validate="one_to_one")
    out["universal"] = out["universal"].fillna(0).astype(np.int64)
    out["universal_share"] = out["universal"] / out["neurons"]
    front = ["step", "member", "model", "layer", "neurons", "universal", "universal_share"]
    front = [c for c in front if c in out.columns]
    out = out[front + [c for c in out.columns if c not in front]]
    order = {m: i for i, m in enumerate(dict.fromkeys(layers["member"]))}  # reference first
    return out.sort_values(["member", "step", "layer"], key=lambda c: c.map(order)
                           if c.name == "member" else c, kind="stable").reset_index(drop=True)
