"""Figures of the correlation and analyze stages (Gurnee et al. figures 2-6, 14).

Each ``*_data`` function turns tables into the numbers a figure shows (tested against pandas
on the tables); the ``@figure`` functions draw them and write captions that state them.
"""

from __future__ import annotations

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
    layer_list,
    new_figure,
    token_label,
)

__all__ = ["layer_summary", "role_counts", "family_counts", "vocab_neuron_choice",
           "PROPERTY_ORDER", "ROLE_ORDER", "FAMILY_ORDER", "SHARE_T"]

#: The "share above" threshold the layer figure shows (Gurnee et al. use 0.7 for small models).
SHARE_T = 0.7
PROPERTY_ORDER = ["act_mean", "act_var", "act_skew", "act_kurt", "act_freq", "pre_mean",
                  "pre_skew", "pre_kurt", "w_in_norm", "w_out_norm", "b_in", "in_out_cos",
                  "l2_penalty", "vocab_var", "vocab_skew", "vocab_kurt"]
ROLE_ORDER = ["prediction", "suppression", "partition", "entropy", "attention"]
FAMILY_ORDER = ["unigram", "previous", "alphabet", "class", "position"]


def layer_summary(neurons: pd.DataFrame, share_t: float = SHARE_T) -> pd.DataFrame:
    """Per (model, layer): ``neurons``, means of ``max_corr, baseline_corr, excess_corr`` (and
    ``ceiling_corr`` when present; NaN values skipped), ``universal`` count and
    ``universal_share``, and the shares of neurons whose best partner / best baseline
    correlation exceeds ``share_t`` (``share_max``, ``share_baseline``); with the calibrated
    criterion's column, ``universal_calibrated`` and ``universal_calibrated_share`` too."""
    df = neurons.copy()
    cols = [c for c in ("max_corr", "baseline_corr", "excess_corr", "ceiling_corr") if c in df]
    univ = df["is_universal"].fillna(False).astype(bool) if "is_universal" in df else None
    df["_u"] = univ if univ is not None else False
    g = df.groupby(["model", "layer"], sort=True)
    out = g[cols].mean()
    out["neurons"] = g.size()
    out["universal"] = g["_u"].sum().astype(int)
    out["universal_share"] = out["universal"] / out["neurons"]
    if "is_universal_calibrated" in df:
        df["_c"] = df["is_universal_calibrated"].fillna(False).astype(bool)
        out["universal_calibrated"] = df.groupby(["model", "layer"], sort=True)["_c"].sum().astype(int)
        out["universal_calibrated_share"] = out["universal_calibrated"] / out["neurons"]
    for name, src in (("share_max", "best_partner_corr"), ("share_baseline", "best_baseline_corr")):
        if src in df:
            out[name] = g[src].apply(lambda s: float((s > share_t).mean()))
    return out.reset_index()


@figure("correlation_by_layer", "Correlation with other seeds, by layer", "Universality",
        needs=["neurons"])
def _correlation(t: Tables, opts: dict) -> Drawn:
    refs = t.corr_models
    if not refs:
        raise Skip("neurons.parquet has no correlation columns (run `unineurons correlate`)")
    n = t["neurons"]
    s = layer_summary(n[n["model"].isin(refs)])
    s["model"] = pd.Categorical(s["model"], refs, ordered=True)
    s = s.sort_values(["model", "layer"])
    fig, (a, b) = new_figure(2, width=4.6)
    styles = [("max_corr", "-", "max ρ over partner neurons"),
              ("baseline_corr", "--", "rotation baseline"), ("ceiling_corr", ":", "ceiling")]
    for i, (_, g) in enumerate(s.groupby("model", sort=False, observed=True)):
        for col, ls, label in styles:
            if col in g and g[col].notna().any():
                a.plot(g["layer"], g[col], ls, marker="o", ms=3, color=PALETTE[i % len(PALETTE)],
                       label=label if i == 0 else None)
    a.set_ylabel("mean over the layer's neurons")
    a.set_title("mean max correlation, baseline, ceiling")
    layer_axis(a, s["layer"].unique())
    a.legend()
    ref = n[n["model"] == refs[0]]
    layers = sorted(ref["layer"].unique())
    data = [ref.loc[ref["layer"] == lay, "excess_corr"].dropna().to_numpy() for lay in layers]
    b.boxplot(data, positions=layers, widths=0.6, whis=(5, 95), showfliers=False,
              medianprops={"color": PALETTE[3]})
    b.axhline(t.threshold, color="k", ls="--", lw=0.8, label=f"universal: excess > {t.threshold}")
    b.axhline(0, color="k", lw=0.5)
    b.set_ylabel("excess correlation ϱ")
    b.set_title(f"excess correlation per neuron: {t.short(refs[0])}")
    layer_axis(b, layers)
    b.legend(loc="best")
    r = s[s["model"] == refs[0]].set_index("layer")
    n_univ = int(r["universal"].sum())
    cap = (f"Left: mean over each layer's neurons of {t.short(refs[0])} of the maximum "
           f"correlation with any neuron of a partner seed (mean over {len(t.models) - 1 or 1} "
           f"partner(s)): {layer_list(r['max_corr'])}; the same for the random-rotation "
           f"baseline: {layer_list(r['baseline_corr'])}; mean excess (max − baseline): "
           f"{layer_list(r['excess_corr'])}")
    if "ceiling_corr" in r and r["ceiling_corr"].notna().any():
        cap += f"; ceiling (own rotated layers): {layer_list(r['ceiling_corr'])}"
    cap += (f". Right: distribution of the excess correlation per layer (box: quartiles, "
            f"whiskers: 5th-95th percentile); {n_univ} of {int(r['neurons'].sum())} neurons "
            f"exceed the threshold {t.threshold}.")
    if len(refs) > 1:
        cap += f" Lines of other colours: the other reference models ({len(refs) - 1})."
    return Drawn(fig, cap)


@figure("universal_share", "Universal neurons by layer", "Universality", needs=["neurons"])
def _universal_share(t: Tables, opts: dict) -> Drawn:
    ref = t.reference
    n = t.neurons_of(ref, ["max_corr", "is_universal"])
    s = layer_summary(n).set_index("layer")
    fig, axes = new_figure(2 if "share_max" in s else 1, width=4.6)
    a = axes[0]
    cal = "universal_calibrated" in s
    bars = [("universal", f"paper: excess > {t.threshold}", SET_COLORS["universal"])]
    if cal:
        bars.append(("universal_calibrated", "calibrated: q < FDR", PALETTE[2]))
    w = 0.8 / len(bars)
    for i, (col, label, color) in enumerate(bars):
        x = np.asarray(s.index, dtype=float) + (i - (len(bars) - 1) / 2) * w
        a.bar(x, 100 * s[col] / s["neurons"], color=color, width=w, label=label)
        for xi, (u, tot) in zip(x, zip(s[col], s["neurons"], strict=True), strict=True):
            a.annotate(f"{u}/{tot}", (xi, 100 * u / tot), ha="center", va="bottom", fontsize=7)
    a.set_ylabel("% of the layer's neurons")
    a.set_title(f"universal neurons: {t.short(ref)}")
    layer_axis(a, s.index)
    a.legend()
    cap = (f"Left: share of the neurons of {t.short(ref)} with excess correlation above "
           f"{t.threshold} (the paper's criterion), per layer: "
           f"{layer_list(s['universal_share'], pct=True)} "
           f"({int(s['universal'].sum())} of {int(s['neurons'].sum())} in all)")
    if cal:
        cap += (f"; calibrated (Benjamini-Hochberg q below the FDR against each neuron's null "
                f"of seeded rotations): {layer_list(s['universal_calibrated_share'], pct=True)} "
                f"({int(s['universal_calibrated'].sum())} in all). They differ because the "
                "paper's fixed threshold was set on GPT-2 small after 100M tokens, while the "
                "calibrated criterion asks only whether a neuron's match beats what rotated "
                "partners reach on the same tokens, so it means the same at every model size "
                "and token count")
    cap += "."
    if "share_max" in s:
        b = axes[1]
        b.plot(s.index, 100 * s["share_max"], "-o", ms=3, color=PALETTE[0],
               label=f"best partner ρ > {SHARE_T}")
        b.plot(s.index, 100 * s["share_baseline"], "--o", ms=3, color=PALETTE[1],
               label=f"best baseline ρ > {SHARE_T}")
        b.set_ylabel("% of the layer's neurons")
        b.set_title(f"share with ρ > {SHARE_T}, data vs rotation baseline")
        layer_axis(b, s.index)
        b.legend()
        cap += (f" Right: share whose best correlation over the partner seeds exceeds {SHARE_T}: "
                f"{layer_list(s['share_max'], pct=True)}; the same for the rotation baseline: "
                f"{layer_list(s['share_baseline'], pct=True)}.")
    return Drawn(fig, cap)


@figure("properties", "Properties of universal vs other neurons", "Neuron properties",
        needs=["properties"])
def _properties(t: Tables, opts: dict) -> Drawn:
    p = t["properties"]
    ref = t.reference
    p = p[(p["model"] == ref) & p["universal_mean_z"].notna()]
    if p.empty:
        raise Skip(f"properties.parquet has no universal neurons for {ref} (none above the "
                   "threshold)")
    stats = [s for s in PROPERTY_ORDER if s in set(p["statistic"])]
    stats += sorted(set(p["statistic"]) - set(stats))
    stats = stats[:16]
    fig, axes = new_figure(len(stats), width=2.6, height=2.1, ncols=4)
    parts = []
    for ax, st in zip(axes, stats, strict=True):
        g = p[p["statistic"] == st].sort_values("layer")
        ax.plot(g["layer"], g["universal_mean_z"], "-o", ms=3, color=SET_COLORS["universal"],
                label="universal")
        ax.plot(g["layer"], g["other_mean_z"], "-o", ms=3, color=SET_COLORS["non-universal"],
                label="other")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(st)
        layer_axis(ax, g["layer"])
        parts.append(f"{st} {g['universal_mean_z'].mean():+.2f} vs {g['other_mean_z'].mean():+.2f}")
    axes[0].legend()
    axes[0].set_ylabel("mean z within layer")
    cap = (f"Each statistic of {t.short(ref)} z-scored within its layer, then averaged over the "
           "universal and over the other neurons of the layer (Gurnee et al. fig. 3/14). Mean "
           f"over layers, universal vs other: {'; '.join(parts)}.")
    return Drawn(fig, cap)


@figure("vocab_moments", "Vocabulary composition by layer", "Vocabulary", needs=["neurons"])
def _vocab_moments(t: Tables, opts: dict) -> Drawn:
    ref = t.reference
    n = t.neurons_of(ref, ["vocab_kurt", "vocab_skew"])
    univ = n["is_universal"].fillna(False).astype(bool) if "is_universal" in n else \
        pd.Series(False, index=n.index)
    layers = sorted(n["layer"].unique())
    fig, axes = new_figure(2, width=4.6)
    rng = np.random.default_rng(0)
    parts = []
    for ax, col, log in ((axes[0], "vocab_kurt", True), (axes[1], "vocab_skew", False)):
        data = [n.loc[(n["layer"] == lay) & ~univ, col].dropna().to_numpy() for lay in layers]
        ax.boxplot([d if len(d) else [np.nan] for d in data], positions=layers, widths=0.6,
                   whis=(5, 95), showfliers=False, medianprops={"color": PALETTE[0]})
        u = n[univ & n[col].notna()]
        if len(u):
            ax.scatter(u["layer"] + rng.uniform(-0.2, 0.2, len(u)), u[col], s=8,
                       color=SET_COLORS["universal"], alpha=0.8, label="universal", zorder=3)
            ax.legend()
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{col} of W_out·W_U cosines: {t.short(ref)}")
        layer_axis(ax, layers)
        med_o = n[~univ].groupby("layer")[col].median()
        parts.append(f"median {col} of the other neurons {layer_list(med_o)}")
        if univ.any():
            parts.append(f"of the universal neurons {layer_list(n[univ].groupby('layer')[col].median())}")
    axes[0].axhline(10, color="k", ls="--", lw=0.8)
    cap = ("Kurtosis (log scale; dashed: 10, the prediction/suppression cut) and skew, over the "
           "vocabulary, of the cosines between each neuron's output weight and the unembedding "
           "(boxes: non-universal neurons, quartiles and 5th-95th percentiles; points: universal "
           f"neurons). {'; '.join(parts)}.")
    return Drawn(fig, cap)


def role_counts(neurons: pd.DataFrame) -> pd.DataFrame:
    """Neurons per (group, layer, role) for the roles in :data:`ROLE_ORDER`; ``group`` is
    ``universal`` / ``other`` (``all`` without universality). Columns: group, layer, role, n."""
    return _counts(neurons, "role", ROLE_ORDER)


def family_counts(neurons: pd.DataFrame) -> pd.DataFrame:
    """Neurons per (group, layer, family) for the families in :data:`FAMILY_ORDER`."""
    return _counts(neurons, "family", FAMILY_ORDER)


def _counts(neurons: pd.DataFrame, col: str, order: list[str]) -> pd.DataFrame:
    df = neurons[neurons[col].isin(order)]
    if "is_universal" in neurons and neurons["is_universal"].notna().any():
        group = np.where(df["is_universal"].fillna(False).astype(bool), "universal", "other")
    else:
        group = np.full(len(df), "all")
    out = df.assign(group=group).groupby(["group", "layer", col]).size().rename("n")
    return out.reset_index()


def _stacked(t: Tables, col: str, order: list[str], counts: pd.DataFrame, n: pd.DataFrame,
             what: str) -> Drawn:
    groups = [g for g in ("universal", "other", "all") if g in set(counts["group"])]
    layers = sorted(n["layer"].unique())
    fig, axes = new_figure(len(groups), width=4.4)
    parts = []
    for ax, grp in zip(axes, groups, strict=True):
        c = counts[counts["group"] == grp].pivot_table(index="layer", columns=col, values="n",
                                                       fill_value=0).reindex(layers, fill_value=0)
        bottom = np.zeros(len(layers))
        for i, k in enumerate(order):
            if k in c:
                ax.bar(layers, c[k], bottom=bottom, color=PALETTE[i % len(PALETTE)], label=k,
                       width=0.7)
                bottom += c[k].to_numpy()
                parts.append(f"{grp} {k}: {', '.join(f'L{lay} {int(v)}' for lay, v in c[k].items())}")
        ax.set_title(f"{grp} neurons of {t.short(t.reference)}")
        ax.set_ylabel("neurons")
        layer_axis(ax, layers)
        ax.legend()
    cap = f"Neurons per {what} and layer (neurons of no {what} left out). " + "; ".join(parts) + "."
    return Drawn(fig, cap)


@figure("roles_by_layer", "Functional roles by layer", "Vocabulary", needs=["neurons"])
def _roles(t: Tables, opts: dict) -> Drawn:
    n = t.neurons_of(t.reference, ["role"])
    counts = role_counts(n)
    if counts.empty:
        raise Skip(f"no neuron of {t.reference} has a role other than none")
    drawn = _stacked(t, "role", ROLE_ORDER, counts, n, "role")
    from ..analyses.roles import rules_sentence  # paper vs calibrated rule (docs/tables.md)

    return Drawn(drawn.fig, (drawn.caption + " " + rules_sentence(n)).strip(), drawn.notes)


@figure("families_by_layer", "Neuron families by layer", "Families", needs=["neurons"])
def _families(t: Tables, opts: dict) -> Drawn:
    n = t.neurons_of(t.reference, ["family"])
    counts = family_counts(n)
    if counts.empty:
        raise Skip(f"no analysed neuron of {t.reference} belongs to a family")
    return _stacked(t, "family", FAMILY_ORDER, counts, n, "family")


def vocab_neuron_choice(t: Tables, choice: str | None) -> tuple[str, int, int]:
    """(model, layer, neuron) of the vocabulary-histogram figure: ``choice`` (``L3.N12`` of the
    reference, or ``MODEL_INDEX:L3.N12``), else the reference neuron with vocabulary rows of
    highest excess correlation (highest ``vocab_kurt`` without correlations)."""
    from ..models.adapters import parse_neuron

    v = t["vocab"]
    if choice:
        idx, _, addr = choice.rpartition(":")
        model = t.models[int(idx)] if idx else t.reference
        layer, neuron = parse_neuron(addr)
        return model, layer, neuron
    ref = t.reference
    have = v.loc[(v["model"] == ref) & (v["side"] == "out"), ["layer", "neuron"]].drop_duplicates()
    if have.empty:
        raise Skip(f"vocab.parquet has no rows for {ref}")
    n = t["neurons"]
    cand = have.merge(n[n["model"] == ref], on=["layer", "neuron"], how="left")
    for key in ("excess_corr", "vocab_kurt"):
        if key in cand and cand[key].notna().any():
            row = cand.loc[cand[key].idxmax()]
            return ref, int(row["layer"]), int(row["neuron"])
    return ref, int(have.iloc[0]["layer"]), int(have.iloc[0]["neuron"])


@figure("vocab_neuron", "Vocabulary cosines of one neuron", "Vocabulary", needs=["vocab"])
def _vocab_neuron(t: Tables, opts: dict) -> Drawn:
    model, layer, neuron = vocab_neuron_choice(t, opts.get("vocab_neuron"))
    v = t["vocab"]
    v = v[(v["model"] == model) & (v["layer"] == layer) & (v["neuron"] == neuron)
          & (v["side"] == "out")]
    if v.empty:
        raise Skip(f"vocab.parquet has no rows for L{layer}.N{neuron} of {model}")
    top = v[v["direction"] == "top"].sort_values("rank")
    bot = v[v["direction"] == "bottom"].sort_values("rank")
    cos, notes = _full_cosines(t, model, layer, neuron, opts)
    fig, (ax,) = new_figure(1, width=8.5, height=3.4)
    if cos is not None:
        ax.hist(cos, bins=80, color=PALETTE[0], alpha=0.85)
        ax.set_yscale("log")
        ax.set_ylabel("tokens")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # head room for the token lists
        # the extreme tokens: marked on the axis, listed in the corners (labels at the
        # cosines themselves would overlap: the extremes lie close together)
        for rows, color, x, ha, head in ((bot.head(6), PALETTE[2], 0.01, "left", "suppressed"),
                                         (top.head(6), PALETTE[3], 0.99, "right", "promoted")):
            for r in rows.itertuples():
                ax.axvline(r.cosine, ymax=0.08, color=color, lw=1.2)
            text = "\n".join([head] + [f"{token_label(r.token)} {r.cosine:+.3f}"
                                        for r in rows.itertuples()])
            ax.text(x, 0.97, text, transform=ax.transAxes, ha=ha, va="top", fontsize=7,
                    color=color, family="monospace")
    else:
        both = pd.concat([bot.head(10).iloc[::-1], top.head(10)])
        ax.barh(range(len(both)), both["cosine"],
                color=[PALETTE[3] if c > 0 else PALETTE[2] for c in both["cosine"]])
        ax.set_yticks(range(len(both)), [token_label(s) for s in both["token"]], fontsize=7)
        ax.set_ylabel("most extreme tokens (vocab.parquet)")
    ax.set_xlabel("cos(w_out, unembedding column)")
    addr = f"L{layer}.N{neuron}"
    ax.set_title(f"{addr} of {t.short(model)}")
    stats = t["neurons"]
    row = stats[(stats["model"] == model) & (stats["layer"] == layer) & (stats["neuron"] == neuron)]
    desc = ", ".join(f"{k} {row.iloc[0][k]:.3g}" for k in ("vocab_mean", "vocab_var", "vocab_skew",
                                                           "vocab_kurt", "excess_corr")
                     if k in row and len(row) and pd.notna(row.iloc[0][k]))
    fmt = lambda d: ", ".join(f"{token_label(r.token)} {r.cosine:+.3f}" for r in d.head(3).itertuples())  # noqa: E731
    cap = (f"{'Histogram over the vocabulary' if cos is not None else 'The most extreme tokens'} "
           f"of the cosine between the output weight of {addr} ({t.short(model)}) and each "
           f"token's unembedding (folded, centred). {desc + '. ' if desc else ''}"
           f"Most promoted: {fmt(top)}; most suppressed: {fmt(bot)}.")
    return Drawn(fig, cap, notes)


def _full_cosines(t: Tables, model: str, layer: int, neuron: int, opts: dict
                  ) -> tuple[np.ndarray | None, list[str]]:
    """The neuron's cosine with every token, from the model when it loads (else None + note)."""
    if not opts.get("models", True):
        return None, ["histogram over the whole vocabulary not drawn: loading models is off"]
    from ..analyses.interventions import load_run_model
    from ..analyses.vocab import vocab_cosines
    from ..errors import UnineuronsError

    entry = next((e for e in t.manifest.get("models") or [] if e["spec"] == model), {"spec": model})
    try:
        m = load_run_model(entry, opts.get("device", "cpu"))
    except (UnineuronsError, OSError) as e:
        return None, [f"histogram over the whole vocabulary not drawn: model {model} does not "
                      f"load ({e})"]
    n_vocab = ((t.manifest.get("analyze") or {}).get("n_vocab") or {}).get(model)
    if n_vocab:  # the real tokens analyze used (padded vocabularies)
        m.adapter.set_n_vocab(int(n_vocab))
    cos = vocab_cosines(m, layer)[neuron].cpu().numpy()  # [n_vocab]
    return cos, []
