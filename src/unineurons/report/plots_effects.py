"""Figures of effects: family examples (Gurnee et al. fig. 4), entropy and single-neuron
interventions (fig. 7) and group ablations (Nandan et al. fig. 3-5)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .figures import (
    PALETTE,
    SET_COLORS,
    Drawn,
    Skip,
    Tables,
    figure,
    layer_axis,
    new_figure,
    token_label,
)

__all__ = ["family_examples", "intervention_curves", "ablation_summary", "EXAMPLE_FAMILIES"]

EXAMPLE_FAMILIES = ["unigram", "previous", "alphabet", "position"]


def family_examples(t: Tables) -> list[dict]:
    """Per family of :data:`EXAMPLE_FAMILIES`, the reference neuron of that family with the
    highest ``family_score`` (universal ones first) that has top contexts, with its top
    activations: dicts ``family, layer, neuron, feature, score, universal, top`` where ``top``
    holds ``rank, value, position, token`` and ``holds`` (the feature is true on the activating
    token; for ``position`` the token's position)."""
    ref = t.reference
    n = t.neurons_of(ref, ["family", "family_feature"])
    tc = t["top_contexts"]
    tc = tc[tc["model"] == ref]
    fams = t.get("families")
    out = []
    for fam in EXAMPLE_FAMILIES:
        cand = n[n["family"] == fam].copy()
        if cand.empty:
            continue
        cand["univ_"] = cand["is_universal"].fillna(False).astype(bool) if "is_universal" in cand \
            else False
        cand = cand.sort_values(["univ_", "family_score"], ascending=False)
        for r in cand.itertuples():
            top = tc[(tc["layer"] == r.layer) & (tc["neuron"] == r.neuron)].sort_values("rank")
            if top.empty:
                continue
            out.append({"family": fam, "layer": int(r.layer), "neuron": int(r.neuron),
                        "feature": r.family_feature, "score": float(r.family_score),
                        "universal": bool(r.univ_), "top": _holds(fam, r, top, fams, ref)})
            break
    return out


def _holds(fam: str, r, top: pd.DataFrame, fams: pd.DataFrame | None, ref: str) -> pd.DataFrame:
    """The top contexts of neuron ``r`` with the activating token and whether ``fam``'s
    feature holds there."""
    rows = []
    feature = str(r.family_feature)
    tid = -1
    if fams is not None and fam in ("unigram", "previous"):
        f = fams[(fams["model"] == ref) & (fams["layer"] == r.layer) & (fams["neuron"] == r.neuron)
                 & (fams["feature"] == feature)]
        tid = int(f["token_id"].iloc[0]) if len(f) else -1
    for c in top.itertuples():
        i = int(c.position - c.window_start)  # the activating token's index in its window
        ids, toks = list(c.window_ids), list(c.window_tokens)
        holds: float | bool
        if fam == "unigram":
            holds = ids[i] == tid
        elif fam == "previous":
            holds = i > 0 and ids[i - 1] == tid
        elif fam == "alphabet":
            holds = str(toks[i]).lstrip().lower().startswith(feature.split("=", 1)[-1])
        else:  # position: the feature is the position itself
            holds = float(c.position)
        rows.append({"rank": int(c.rank), "value": float(c.value), "position": int(c.position),
                     "token": toks[i], "holds": holds})
    return pd.DataFrame(rows)


@figure("family_examples", "Example neurons of each family", "Families",
        needs=["neurons", "top_contexts"])
def _family_examples(t: Tables, opts: dict) -> Drawn:
    ex = family_examples(t)
    if not ex:
        raise Skip(f"no neuron of {t.reference} in the unigram, previous, alphabet or position "
                   "families has top contexts")
    fig, axes = new_figure(len(ex), width=4.0, height=3.0, ncols=min(len(ex), 2))
    parts = []
    for ax, e in zip(axes, ex, strict=True):
        top = e["top"]
        name = f"L{e['layer']}.N{e['neuron']}" + (" (universal)" if e["universal"] else "")
        if e["family"] == "position":
            peak = int(str(e["feature"]).split("=")[-1])
            ax.scatter(top["position"], top["value"], color=PALETTE[0], s=14)
            ax.axvline(peak, color=PALETTE[3], ls="--", lw=0.8, label=f"peak firing position {peak}")
            ax.set_xlabel("position of the top-activating token")
            ax.legend()
            parts.append(f"position: {name}, NMI {e['score']:.2f}, top {len(top)} activations "
                         f"at positions {', '.join(str(p) for p in top['position'])}")
        else:
            holds = top["holds"].astype(bool)
            ax.bar(top["rank"], top["value"], color=np.where(holds, PALETTE[3], PALETTE[5]))
            ax.set_xticks(top["rank"], [token_label(s, 10) for s in top["token"]], rotation=60,
                          fontsize=7)
            ax.set_xlabel(f"top activating tokens (orange: {e['feature']})")
            parts.append(f"{e['family']}: {name}, feature {e['feature']}, variance reduction "
                         f"{e['score']:.2f}, {int(holds.sum())} of {len(top)} top activations on "
                         "tokens with the feature")
        ax.set_ylabel("activation")
        ax.set_title(f"{e['family']}: {name}")
    cap = (f"For each family, the neuron of {t.short(t.reference)} with the highest family score "
           "(universal neurons first) and its top activations from top_contexts.parquet. "
           + "; ".join(parts) + ".")
    return Drawn(fig, cap)


def intervention_curves(df: pd.DataFrame, x: str, metrics: list[str]) -> pd.DataFrame:
    """Per (group, x): the metrics' mean, min and max. ``group`` is a target neuron's address,
    or ``random`` for the random baseline neurons pooled. Columns: group, x, and
    ``{m}``, ``{m}_min``, ``{m}_max`` per metric, plus ``{m}_lo``, ``{m}_hi`` (the 95 % paired
    bootstrap interval; a target is one neuron, so its own) where ``df`` has them."""
    df = df.copy()
    if "address" not in df:
        df["address"] = "L" + df["layer"].astype(str) + ".N" + df["neuron"].astype(str)
    df["group"] = np.where(df["kind"] == "random", "random", df["address"])
    g = df.groupby(["group", x], sort=True)
    out = g[metrics].mean()
    for m in metrics:
        out[f"{m}_min"] = g[m].min()
        out[f"{m}_max"] = g[m].max()
        if f"{m}_lo" in df.columns:
            out[f"{m}_lo"] = g[f"{m}_lo"].mean()
            out[f"{m}_hi"] = g[f"{m}_hi"].mean()
    return out.reset_index()


def _curves(t: Tables, table: str, x: str, metrics: list[tuple[str, str]], xlabel: str,
            what: str) -> Drawn:
    df = t[table]
    if df.empty:
        raise Skip(f"{table}.parquet has no rows (no neuron was intervened on)")
    model = t.reference if t.reference in set(df["model"]) else str(df["model"].iloc[0])
    df = df[df["model"] == model].copy()
    if x == "multiple":
        df["multiple"] = df["value"] / df["scale"].where(df["scale"] != 0)
    c = intervention_curves(df, x, [m for m, _ in metrics])
    fig, axes = new_figure(len(metrics), width=3.9)
    groups = [g for g in pd.unique(c["group"]) if g != "random"]
    parts = []
    for ax, (m, label) in zip(axes, metrics, strict=True):
        for i, grp in enumerate(groups[:8]):
            s = c[c["group"] == grp]
            col = PALETTE[(i + 3) % len(PALETTE)]
            ax.plot(s[x], s[m], "-o", ms=3, color=col, label=grp)
            if f"{m}_lo" in s.columns and s[f"{m}_lo"].notna().any():  # 95% interval
                ax.fill_between(s[x], s[f"{m}_lo"], s[f"{m}_hi"], color=col, alpha=0.15, lw=0)
        r = c[c["group"] == "random"]
        if len(r):
            ax.plot(r[x], r[m], "--", color=SET_COLORS["random"], label="random (mean, range)")
            ax.fill_between(r[x], r[f"{m}_min"], r[f"{m}_max"], color=SET_COLORS["random"],
                            alpha=0.2, lw=0)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        for grp in groups[:8] + (["random"] if len(r) else []):
            s = c[c["group"] == grp].set_index(x)[m]
            parts.append(f"{grp} {m}: " + ", ".join(f"{k:g}→{v:+.3g}" for k, v in s.items()))
    axes[0].legend(fontsize=7)
    band = (" Shaded around a target: its 95% interval (paired bootstrap over contexts)."
            if any(f"{m}_lo" in c.columns for m, _ in metrics) else "")
    cap = (f"{t.short(model)}: {what}, mean over the evaluated predictions, as a function of "
           f"the activation value the neuron is fixed at ({xlabel})." + band + " "
           + "; ".join(parts) + ".")
    return Drawn(fig, cap)


@figure("entropy_interventions", "Entropy neurons: fixing the activation", "Interventions",
        needs=["entropy"])
def _entropy(t: Tables, opts: dict) -> Drawn:
    return _curves(t, "entropy", "multiple",
                   [("delta_entropy", "Δ entropy (nats)"), ("delta_loss", "Δ loss (nats)"),
                    ("delta_final_norm_scale", "Δ final-norm scale")],
                   "value / neuron's largest |activation|",
                   "change of next-token entropy, loss and final-norm scale when an entropy "
                   "candidate (named) or a random late-layer neuron is fixed")


@figure("interventions", "Single-neuron interventions", "Interventions", needs=["interventions"])
def _interventions(t: Tables, opts: dict) -> Drawn:
    return _curves(t, "interventions", "value",
                   [("delta_entropy", "Δ entropy (nats)"), ("delta_loss", "Δ loss (nats)"),
                    ("delta_final_norm_scale", "Δ final-norm scale")],
                   "activation value",
                   "change of next-token entropy, loss and final-norm scale when a target neuron "
                   "(named) or a random last-layer neuron is fixed")


def _set_names(s: pd.DataFrame) -> list[str]:
    """The sets of ``s`` in plotting order: universal ones, then non-universal, random."""
    names = list(pd.unique(s["set"]))
    return ([n for n in names if n not in ("non-universal", "random")]
            + [n for n in ("non-universal", "random") if n in names])


def _calibrated_note(s: pd.DataFrame) -> str:
    """What the ``universal-calibrated`` set is, when the table has it (else "")."""
    if "universal-calibrated" not in set(s["set"]):
        return ""
    return ("universal-calibrated: the calibrated universal set (BH q < FDR against each "
            "neuron's rotation null, ranked by p-value) at its own sizes, beside universal (the "
            "paper's excess > threshold); the two differ because the paper's fixed threshold "
            "does not scale with model size or token count, while the calibrated test asks only "
            "whether a neuron beats its own null. ")


def ablation_summary(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`unineurons.analyses.ablate.summarize` of the rows with neurons ablated."""
    from ..analyses.ablate import summarize

    return summarize(df[df["n_ablated"] > 0])


@figure("ablation_curves", "Group ablations: loss vs neurons ablated", "Ablations",
        needs=["ablations"])
def _ablation_curves(t: Tables, opts: dict) -> Drawn:
    from ..analyses.ablate import headline

    raw = t["ablations"]
    model = t.reference if t.reference in set(raw["model"]) else str(raw["model"].iloc[0])
    s = ablation_summary(raw[raw["model"] == model])
    s = s[s["layer"] == -1]
    if s.empty:
        raise Skip(f"ablations.parquet has no whole-model rows for {model}")
    methods = list(pd.unique(s["method"]))
    fig, axes = new_figure(len(methods), width=4.6)
    parts = []
    ci = bool(s["delta_loss_lo"].notna().any())  # tables of older versions have no intervals
    for ax, meth in zip(axes, methods, strict=True):
        for name in _set_names(s):
            g = s[(s["method"] == meth) & (s["set"] == name)].sort_values("n_ablated")
            if g.empty:
                continue
            col = SET_COLORS.get(name, PALETTE[len(parts) % len(PALETTE)])
            if ci:  # 95% interval over contexts (and draws)
                yerr = np.vstack([g["delta_loss"] - g["delta_loss_lo"],
                                  g["delta_loss_hi"] - g["delta_loss"]]).clip(min=0)
                label = name + (" (mean, 95% interval)" if name == "random" else "")
            else:
                yerr, label = g["delta_loss_std"], name + (" (mean ± sd)" if name == "random" else "")
            ax.errorbar(g["n_ablated"], g["delta_loss"], yerr=yerr, fmt="-o", ms=3, capsize=2,
                        color=col, label=label)
            parts.append(f"{meth} {name}: " + ", ".join(
                f"{x:g}→{y:+.3g}" + (f"±{e:.2g}" if d > 1 else "")
                + (f" [{lo:+.3g}, {hi:+.3g}]" if ci else "")
                for x, y, lo, hi, e, d in zip(g["n_ablated"], g["delta_loss"], g["delta_loss_lo"],
                                              g["delta_loss_hi"], g["delta_loss_std"], g["draws"],
                                              strict=True)))
        ax.set_xscale("log", base=2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("neurons ablated (whole model)")
        ax.set_ylabel("Δ loss (nats)")
        ax.set_title(f"{meth} ablation: {t.short(model)}")
        ax.legend()
    how = ("error bars and [brackets]: 95% interval from a paired bootstrap over contexts, "
           "random sets also resampling their draws; ±: standard deviation over random draws"
           if ci else
           "random: mean ± standard deviation over draws; this table has no intervals (made "
           "before they were added: rerun `unineurons ablate`)")
    cap = ("Increase of the next-token loss when the top-n universal neurons (by excess "
           "correlation), the least universal neurons, or layer-matched random neurons are "
           f"ablated together (n → Δ loss; {how}). " + _calibrated_note(s)
           + "; ".join(parts) + ". " + headline(raw[raw["model"] == model]))
    return Drawn(fig, cap)


@figure("ablation_efficiency", "Ablation efficiency", "Ablations", needs=["ablations"])
def _ablation_efficiency(t: Tables, opts: dict) -> Drawn:
    raw = t["ablations"]
    model = t.reference if t.reference in set(raw["model"]) else str(raw["model"].iloc[0])
    s = ablation_summary(raw[raw["model"] == model])
    meth = str(s["method"].iloc[0]) if len(s) else "zero"
    s = s[s["method"] == meth]
    per_layer = s[s["layer"] >= 0]
    fig, axes = new_figure(2 if len(per_layer) else 1, width=4.6)
    parts = []
    ax = axes[0]
    whole = s[s["layer"] == -1]
    ci = bool(s["delta_loss_lo"].notna().any())
    for name in _set_names(whole):
        g = whole[whole["set"] == name].sort_values("n_ablated")
        if len(g):
            col = SET_COLORS.get(name, PALETTE[4])
            ax.plot(g["n_ablated"], g["efficiency"], "-o", ms=3, color=col, label=name)
            if ci:  # the delta_loss interval divided by the (mean) set size
                ax.fill_between(g["n_ablated"], g["delta_loss_lo"] / g["n_ablated"],
                                g["delta_loss_hi"] / g["n_ablated"], color=col, alpha=0.15, lw=0)
            parts.append(f"whole model {name}: " + ", ".join(
                f"{x:g}→{y:.3g}" for x, y in zip(g["n_ablated"], g["efficiency"], strict=True)))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("neurons ablated")
    ax.set_ylabel("Δ loss per ablated neuron (nats)")
    ax.set_title(f"efficiency ({meth}): {t.short(model)}")
    ax.legend()
    notes = []
    if len(per_layer):
        b = axes[1]
        # per layer, the largest size asked for there (the whole universal set for "all")
        big = per_layer.loc[per_layer.groupby(["layer", "set"])["n_ablated"].idxmax()]
        layers = sorted(big["layer"].unique())
        sets = _set_names(big)
        w = 0.8 / len(sets)
        for i, name in enumerate(sets):
            g = big[big["set"] == name].set_index("layer").reindex(layers)
            yerr = (np.vstack([g["efficiency"] - g["delta_loss_lo"] / g["n_ablated"],
                               g["delta_loss_hi"] / g["n_ablated"] - g["efficiency"]]).clip(min=0)
                    if ci else None)
            b.bar(np.array(layers) + (i - (len(sets) - 1) / 2) * w, g["efficiency"], width=w,
                  color=SET_COLORS.get(name, PALETTE[4]), label=name, yerr=yerr, capsize=2)
            parts.append(f"per layer {name}: " + ", ".join(
                f"L{lay} {e:.3g} (n={n:g})" for lay, e, n in
                zip(layers, g["efficiency"], g["n_ablated"], strict=True) if not math.isnan(n)))
        b.set_ylabel("Δ loss per ablated neuron (nats)")
        b.set_title("per layer, largest set of each layer")
        layer_axis(b, layers)
        b.legend()
    else:
        notes.append("no per-layer ablations in the run (`unineurons ablate --per-layer`)")
    cap = ("Ablation efficiency: loss increase divided by the number of neurons ablated (mean "
           "over random draws" + ("; shading and error bars: the 95% interval of the loss "
                                  "increase over contexts and draws, divided likewise" if ci else "")
           + "). " + _calibrated_note(s) + "; ".join(parts) + ".")
    return Drawn(fig, cap, notes)
