"""Figures of training dynamics (Nandan et al. fig. 1-2, 4): the universal share per layer over
checkpoints, the persistence of universal sets, the final universal set followed back in time,
and ablations at every checkpoint. Tables of ``unineurons dynamics`` (docs/tables.md)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..analyses.effects import group_interval
from .figures import PALETTE, SET_COLORS, Drawn, Skip, Tables, figure, new_figure

__all__ = ["reference_member", "persistence_matrix"]


def reference_member(t: Tables, df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the dynamics reference member (``manifest.dynamics.reference``, else the
    first member of the table); tables without ``member`` are returned whole."""
    if "member" not in df.columns:
        return df
    ref = (t.dynamics_manifest.get("dynamics") or {}).get("reference")
    if ref not in set(df["member"]):
        ref = df["member"].iloc[0]
    return df[df["member"] == ref]


def _member(t: Tables, df: pd.DataFrame) -> str:
    return f" of {df['member'].iloc[0]}" if "member" in df.columns and len(df) else ""


def _rule(t: Tables) -> str:
    """The U_t rule of the dynamics run, in words (``threshold`` when not recorded)."""
    u = (t.dynamics_manifest.get("dynamics") or {}).get("universal") or {}
    rule = u.get("rule", "threshold")
    if rule == "top":
        return f"top {100 * float(u.get('share', 0)):g}% by excess"
    if rule == "calibrated":
        return f"calibrated (q < {u.get('fdr', 0.01):g})"
    return f"paper: excess > {u.get('threshold', t.threshold):g}"


#: The criteria drawn beside the U_t rule: (column, name, line style, caption text).
_CRITERIA = (
    ("universal_calibrated_share", "calibrated", "--s",
     "the calibrated criterion (BH q < FDR against each neuron's rotation null)"),
    ("universal_paper_share", "paper", ":^", "the paper's criterion (excess correlation > the "
     "correlate threshold)"),
)


@figure("dynamics_emergence", "Universal neurons over training", "Training dynamics",
        needs=["emergence"])
def _emergence(t: Tables, opts: dict) -> Drawn:
    e = reference_member(t, t["emergence"])
    if e.empty:
        raise Skip("emergence.parquet has no rows")
    layers = sorted(e["layer"].unique())
    rule = _rule(t)
    # U_t under the other criteria too, where the steps have them and they are not the rule
    extra = [c for c in _CRITERIA if c[0] in e.columns and not rule.startswith(c[1])
             and e[c[0]].notna().any()]
    fig, (ax,) = new_figure(1, width=5.5)
    parts: list[str] = []
    more: dict[str, list[str]] = {c[0]: [] for c in extra}
    for i, lay in enumerate(layers):
        g = e[e["layer"] == lay].sort_values("step")
        col = PALETTE[i % len(PALETTE)]
        ax.plot(g["step"], 100 * g["universal_share"], "-o", ms=3, color=col,
                label=f"L{lay} ({rule})" if extra else f"L{lay}")
        parts.append(f"L{lay}: " + ", ".join(f"{s:g}→{100 * v:.1f}%" for s, v in
                                             zip(g["step"], g["universal_share"], strict=True)))
        for column, name, style, _ in extra:
            c = g.dropna(subset=[column])
            ax.plot(c["step"], 100 * c[column], style, ms=3, color=col, label=f"L{lay} ({name})")
            more[column].append(f"L{lay}: " + ", ".join(
                f"{s:g}→{100 * v:.1f}%" for s, v in zip(c["step"], c[column], strict=True)))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("universal neurons (% of layer)")
    ax.set_title(f"universal share by layer{_member(t, e)}")
    ax.legend(ncol=2)
    cap = (f"Share of each layer's neurons{_member(t, e)} that are universal at each training "
           f"checkpoint (step → share), U_t by {rule}: " + "; ".join(parts) + ".")
    for column, name, _style, text in extra:
        cap += (f" {'Dashed' if name == 'calibrated' else 'Dotted'}: {text}: "
                + "; ".join(more[column]) + ".")
    if any(c[1] == "calibrated" for c in extra) or rule.startswith("calibrated"):
        cap += (" The criteria differ because a fixed threshold does not scale with model size "
                "and token count, while the calibrated test asks only whether a neuron beats "
                "its own null.")
    return Drawn(fig, cap)


def persistence_matrix(p: pd.DataFrame, layer: int) -> pd.DataFrame:
    """P_persist(t → t') of one layer (-1: all layers pooled) as a steps × later-steps frame
    (rows t, columns t'; NaN where t' < t or U_t is empty)."""
    g = p[p["layer"] == layer]
    steps = sorted(set(g["step"]) | set(g["later_step"]))
    return g.pivot_table(index="step", columns="later_step", values="p_persist",
                         dropna=False).reindex(index=steps, columns=steps)


@figure("dynamics_persistence", "Persistence of universal neurons", "Training dynamics",
        needs=["persistence"])
def _persistence(t: Tables, opts: dict) -> Drawn:
    p = reference_member(t, t["persistence"])
    if p.empty:
        raise Skip("persistence.parquet has no rows")
    layers = sorted(p["layer"].unique())  # -1 (all layers pooled) first
    fig, axes = new_figure(len(layers), width=3.3, height=3.0, ncols=min(len(layers), 4))
    parts = []
    im = None
    for ax, lay in zip(axes, layers, strict=True):
        m = persistence_matrix(p, lay)
        im = ax.imshow(m.to_numpy(float), vmin=0, vmax=1, cmap="viridis", origin="upper")
        ax.set_xticks(range(len(m.columns)), [f"{s:g}" for s in m.columns], rotation=60, fontsize=7)
        ax.set_yticks(range(len(m.index)), [f"{s:g}" for s in m.index], fontsize=7)
        ax.set_xlabel("later step t′")
        ax.set_ylabel("step t")
        ax.set_title("all layers" if lay == -1 else f"layer {lay}")
        ax.grid(False)
        if len(m) <= 10:  # few steps: write the numbers into the cells
            for (i, j), v in np.ndenumerate(m.to_numpy(float)):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
        last = m.columns[-1]
        name = "all" if lay == -1 else f"L{lay}"
        parts.append(f"{name} P(t → {last:g}): " + ", ".join(
            f"{s:g} {v:.2f}" if not math.isnan(v) else f"{s:g} n/a" for s, v in m[last].items()))
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="P_persist = |U_t ∩ U_t′| / |U_t|")
    cap = (f"Share of the neurons{_member(t, p)} universal at step t that are still universal at "
           "a later step t′ (n/a: no universal neuron at t). " + "; ".join(parts) + ".")
    return Drawn(fig, cap)


@figure("dynamics_trajectories", "Excess correlation over training", "Training dynamics",
        needs=["trajectories"])
def _trajectories(t: Tables, opts: dict) -> Drawn:
    tr = reference_member(t, t["trajectories"])
    if tr.empty or "universal_final" not in tr:
        raise Skip("trajectories.parquet has no rows with universal_final")
    fig, (ax,) = new_figure(1, width=5.5)
    parts = []
    for final, name, col in ((True, "universal at the last step", SET_COLORS["universal"]),
                             (False, "other neurons", SET_COLORS["random"])):
        g = tr[tr["universal_final"].fillna(False).astype(bool) == final]
        if g.empty:
            continue
        q = g.groupby("step")["excess_corr"].quantile([0.25, 0.5, 0.75]).unstack()
        n = g.groupby(["layer", "neuron"]).ngroups
        ax.plot(q.index, q[0.5], "-o", ms=3, color=col, label=f"{name} (n={n})")
        ax.fill_between(q.index, q[0.25], q[0.75], color=col, alpha=0.2, lw=0)
        parts.append(f"{name} ({n} neurons): median " + ", ".join(
            f"{s:g}→{v:.3f}" for s, v in q[0.5].items()))
    ax.set_xlabel("training step")
    ax.set_ylabel("excess correlation (median, quartiles)")
    ax.set_title(f"the final universal set{_member(t, tr)}, followed back in time")
    ax.legend()
    cap = ("Excess correlation at each checkpoint of the neurons that are universal at the last "
           "step and of the other neurons (step → median; band: quartiles). "
           + "; ".join(parts) + ".")
    return Drawn(fig, cap)


@figure("dynamics_ablations", "Ablation effect over training", "Training dynamics",
        needs=["dynamics_ablations"])
def _dynamics_ablations(t: Tables, opts: dict) -> Drawn:
    d = reference_member(t, t["dynamics_ablations"])
    d = d[(d["layer"] == -1) & (d["n_ablated"] > 0)]
    if d.empty:
        raise Skip("dynamics_ablations.parquet has no whole-model rows")
    meth = str(d["method"].iloc[0])
    d = d[d["method"] == meth]
    fig, (ax,) = new_figure(1, width=5.5)
    parts = []
    for name in ("universal", "universal-calibrated", "non-universal", "random"):
        rows = []
        for step, g in d.groupby("step"):
            # the largest size this step's universal set reached (the calibrated set: its own)
            own = "universal-calibrated" if name == "universal-calibrated" else "universal"
            size = g.loc[g["set"] == own, "n_requested"].max()
            s = g[(g["set"] == name) & (g["n_requested"] == size)]
            if len(s):
                rows.append((step, s["delta_loss"].mean(), s["n_ablated"].mean(),
                             *group_interval(s)))  # 95%: contexts (and draws) resampled
        if rows:
            st, dl, _, lo, hi = (np.array(v, dtype=float) for v in zip(*rows, strict=True))
            yerr = np.vstack([dl - lo, hi - dl]).clip(min=0) if np.isfinite(lo).any() else None
            ax.errorbar(st, dl, yerr=yerr, fmt="-o", ms=3, capsize=2, color=SET_COLORS[name],
                        label=name)
            parts.append(f"{name}: " + ", ".join(
                f"step {s:g} n={n:g} {v:+.3g}" + (f" [{a:+.3g}, {b:+.3g}]" if np.isfinite(a) else "")
                for s, v, n, a, b in rows))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("Δ loss (nats)")
    ax.set_title(f"{meth} ablation of the largest universal set per step{_member(t, d)}")
    ax.legend()
    cap = ("Loss increase when each checkpoint's largest universal set, and sets of the same "
           "size of non-universal and random neurons, are ablated (error bars and [brackets]: "
           "95% interval, paired bootstrap over contexts, random draws resampled too). "
           + ("universal-calibrated: each checkpoint's largest calibrated universal set (BH q < "
              "FDR against the rotation null), beside the paper's. "
              if "universal-calibrated" in set(d["set"]) else "")
           + "; ".join(parts) + ".")
    return Drawn(fig, cap)
