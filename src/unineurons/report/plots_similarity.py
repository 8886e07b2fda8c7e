"""Figures beyond the papers: layer similarity (linear CKA heat-maps, ridge R² against the best
single neurons), one-to-one matching (mutual best matches against the rotation baseline) and
universality by partner kind (same init / same data order / both different). Tables of the
correlate stage: ``layer_similarity``, ``layers`` and ``partner_kinds`` (docs/tables.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .figures import PALETTE, Drawn, Skip, Tables, _fmt, figure, layer_axis, new_figure

__all__ = ["cka_matrix", "KIND_COLORS"]

KIND_COLORS = {"same-init": "#0072B2", "same-data": "#E69F00", "both-different": "#009E73",
               "identical": "#7F7F7F"}
MAX_PAIRS = 9  #: heat-maps drawn at most (the reference against its first partners)


def cka_matrix(sim: pd.DataFrame, model: str, partner: str, column: str = "cka") -> pd.DataFrame:
    """``column`` of ``layer_similarity`` for one model pair as a layers × partner layers
    frame (rows: the model's layers, columns: the partner's)."""
    g = sim[(sim["model"] == model) & (sim["partner"] == partner)]
    return g.pivot(index="layer", columns="partner_layer", values=column).sort_index()


@figure("layer_cka", "Layer similarity (linear CKA)", "Universality", needs=["layer_similarity"])
def _layer_cka(t: Tables, opts: dict) -> Drawn:
    sim = t["layer_similarity"]
    ref = t.reference
    partners = list(dict.fromkeys(sim.loc[sim["model"] == ref, "partner"]))[:MAX_PAIRS]
    if not partners:
        raise Skip(f"layer_similarity.parquet has no rows for the reference {t.short(ref)}")
    fig, axes = new_figure(len(partners), width=3.0, height=2.8, ncols=min(len(partners), 3))
    parts, im = [], None
    for ax, p in zip(axes, partners, strict=True):
        m = cka_matrix(sim, ref, p)
        d = cka_matrix(sim, ref, p, "cka_debiased")
        im = ax.imshow(m.to_numpy(float), vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_xticks(range(m.shape[1]), [str(c) for c in m.columns])
        ax.set_yticks(range(m.shape[0]), [str(r) for r in m.index])
        if m.shape[0] * m.shape[1] <= 64:  # small maps: the values in the cells
            for (r, c), v in np.ndenumerate(m.to_numpy(float)):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        ax.set_xlabel(f"layer of {t.short(p)}")
        ax.set_ylabel(f"layer of {t.short(ref)}")
        ax.grid(False)
        diag = [(int(r), float(m.loc[r, r]), float(d.loc[r, r])) for r in m.index if r in m.columns]
        parts.append(f"{t.short(p)}: " + ", ".join(f"L{r} {_fmt(v)} (debiased {_fmt(w)})"
                                                   for r, v, w in diag))
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="linear CKA")
    cap = (f"Linear CKA between every layer of {t.short(ref)} and every layer of each partner, "
           "from the correlate pass's covariances (no extra pass). Same-layer CKA (Gaussian-"
           "debiased in brackets): " + "; ".join(parts) + ".")
    return Drawn(fig, cap)


@figure("neuron_basis", "How much of the shared representation lives in the neuron basis",
        "Universality", needs=["layer_similarity"])
def _neuron_basis(t: Tables, opts: dict) -> Drawn:
    sim = t["layer_similarity"]
    ref = t.reference
    g = sim[(sim["model"] == ref) & (sim["layer"] == sim["partner_layer"])]
    if g.empty:
        raise Skip(f"layer_similarity.parquet has no same-layer rows for {t.short(ref)}")
    # the reference's layer predicted from each partner's same layer: the "ba" rows of the partner
    back = sim[(sim["partner"] == ref) & (sim["layer"] == sim["partner_layer"])]
    per = g.groupby("layer")[["ridge_r2", "neuron_r2", "rotated_r2"]].mean()
    fig, (ax,) = new_figure(1, width=5.0)
    x = np.array(per.index, dtype=int)
    for col, label, color in (("ridge_r2", "ridge map of the whole layer (GCV)", PALETTE[0]),
                              ("neuron_r2", "best single neuron", PALETTE[3]),
                              ("rotated_r2", "best single rotated direction", "#7F7F7F")):
        ax.plot(x, per[col], "-o", ms=3, label=label, color=color)
    layer_axis(ax, x)
    ax.set_ylabel("R² of partner neurons (mean)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"partner layer predicted from {t.short(ref)}")
    share = per["neuron_r2"] / per["ridge_r2"]
    cap = (f"Each partner's neurons predicted from the same layer of {t.short(ref)} "
           f"(mean over {g['partner'].nunique()} partner(s) and their neurons): R² of a ridge "
           "map of the whole layer (penalty by generalised cross-validation) "
           f"{_layer_values(per['ridge_r2'])}; of the best single neuron "
           f"{_layer_values(per['neuron_r2'])}; of the best single direction of a random "
           f"rotation {_layer_values(per['rotated_r2'])}. Share reached by single neurons: "
           f"{_layer_values(share)}.")
    notes = []
    if len(back):
        b = back.groupby("layer")[["ridge_r2", "neuron_r2"]].mean()
        notes.append(f"The reverse direction ({t.short(ref)} predicted from its partners): ridge "
                     f"{_layer_values(b['ridge_r2'])}, single neuron {_layer_values(b['neuron_r2'])}.")
    return Drawn(fig, cap, notes)


def _layer_values(s: pd.Series) -> str:
    return ", ".join(f"L{int(k)} {_fmt(float(v))}" for k, v in s.items())


@figure("mutual_best", "One-to-one matching: mutual best matches", "Universality",
        needs=["layers"])
def _mutual_best(t: Tables, opts: dict) -> Drawn:
    lay = t["layers"]
    if "mutual_best_share" not in lay.columns:
        raise Skip("layers.parquet has no mutual_best_share (models of different depth, or a run "
                   "made before one-to-one matching)")
    g = lay[lay["model"] == t.reference].sort_values("layer")
    if g["mutual_best_share"].isna().all():
        raise Skip(f"no mutual best matches were computed for {t.short(t.reference)}")
    fig, (ax,) = new_figure(1, width=5.0)
    x = g["layer"].to_numpy(int)
    ax.plot(x, 100 * g["mutual_best_share"], "-o", ms=3, color=PALETTE[3], label="neurons")
    ax.plot(x, 100 * g["baseline_mutual_best_share"], "-o", ms=3, color="#7F7F7F",
            label="rotated partner layer (baseline)")
    layer_axis(ax, x)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("mutual best matches (% of layer)")
    ax.legend()
    ax.set_title(f"mutual best matches of {t.short(t.reference)}")
    cap = (f"Share of each layer's neurons of {t.short(t.reference)} whose best match in the "
           "partner's same layer has it as its own best match (Li et al. 2016), mean over "
           f"partners: {_layer_values(g.set_index('layer')['mutual_best_share'])}; with the "
           "partner layer randomly rotated: "
           f"{_layer_values(g.set_index('layer')['baseline_mutual_best_share'])}. Mean "
           "correlation of the one-to-one (Hungarian) assignment: "
           f"{_layer_values(g.set_index('layer')['mean_assigned_corr'])}.")
    return Drawn(fig, cap)


@figure("partner_kinds", "Initialisation vs data order", "Universality", needs=["partner_kinds"])
def _partner_kinds(t: Tables, opts: dict) -> Drawn:
    pk = t["partner_kinds"]
    g = pk[(pk["model"] == t.reference) & (pk["partner_kind"] != "identical")]
    if g.empty:
        raise Skip(f"partner_kinds.parquet has no rows for {t.short(t.reference)}")
    kinds = [k for k in KIND_COLORS if k in set(g["partner_kind"])]
    layers = sorted(g["layer"].unique())
    cal = "universal_calibrated_share" in g.columns  # the calibrated criterion per kind
    fig, axes = new_figure(3 if cal else 2, width=4.2)
    width = 0.8 / len(kinds)
    parts = []
    for i, k in enumerate(kinds):
        s = g[g["partner_kind"] == k].set_index("layer").reindex(layers)
        xs = np.arange(len(layers)) + (i - (len(kinds) - 1) / 2) * width
        axes[0].bar(xs, s["mean_excess_corr"], width, color=KIND_COLORS[k], label=k)
        axes[1].bar(xs, 100 * s["universal_share"], width, color=KIND_COLORS[k], label=k)
        parts.append(f"{k} ({int(s['n_partners'].max())} partner(s)): mean excess "
                     f"{_layer_values(s['mean_excess_corr'])}, universal "
                     + ", ".join(f"L{int(la)} {100 * v:.1f}%" for la, v in s["universal_share"].items()))
        if cal:
            axes[2].bar(xs, 100 * s["universal_calibrated_share"], width, color=KIND_COLORS[k],
                        label=k)
            parts[-1] += ", calibrated " + ", ".join(
                f"L{int(la)} {100 * v:.1f}%" for la, v in s["universal_calibrated_share"].items())
    for ax in axes:
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("layer")
    axes[0].set_ylabel("mean excess correlation")
    axes[1].set_ylabel(f"universal (excess > {t.threshold:g}), % of layer")
    if cal:
        axes[2].set_ylabel(f"calibrated universal (q < {g['fdr'].iloc[0]:g}), % of layer")
    axes[0].legend()
    cap = (f"Universality of {t.short(t.reference)}'s neurons measured against partners of each "
           "kind only: same initial weights with another data order (same-init), the same data "
           "order from other initial weights (same-data), or both different. "
           + "; ".join(parts) + ".")
    return Drawn(fig, cap)
