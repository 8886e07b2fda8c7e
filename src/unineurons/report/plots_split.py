"""The split-half figure: is the token count enough? (``split_half.parquet`` of
``unineurons correlate --split-half``; docs/tables.md).

Per layer of the reference model, the Jaccard index of the universal sets found on two disjoint
halves of the contexts under both criteria (the paper's threshold and the calibrated test), and
the correlation between halves of the neurons' excess correlation (and max correlation)."""

from __future__ import annotations

import math

import numpy as np

from .figures import PALETTE, SET_COLORS, Drawn, Skip, Tables, figure, layer_axis, new_figure

__all__: list[str] = []


def _vals(layers: np.ndarray, v: np.ndarray) -> str:
    return ", ".join(f"L{int(la)} " + ("n/a" if math.isnan(x) else f"{x:.2f}")
                     for la, x in zip(layers, v, strict=True))


@figure("split_half", "Split-half stability of the universal set", "Universality",
        needs=["split_half"])
def _split_half(t: Tables, opts: dict) -> Drawn:
    sh = t["split_half"]
    model = t.reference if t.reference in set(sh["model"]) else str(sh["model"].iloc[0])
    g = sh[sh["model"] == model].sort_values("layer")
    if g.empty:
        raise Skip(f"split_half.parquet has no rows for {t.short(model)}")
    x = g["layer"].to_numpy(int)
    cal = "jaccard_calibrated" in g.columns and g["jaccard_calibrated"].notna().any()
    fig, axes = new_figure(2, width=4.4)
    ax, bx = axes
    crit = [("jaccard", "universal_h0", "universal_h1", "paper (excess > "
             f"{t.threshold:g})", SET_COLORS["universal"])]
    if "jaccard_calibrated" in g.columns:
        crit.append(("jaccard_calibrated", "universal_calibrated_h0", "universal_calibrated_h1",
                     "calibrated (BH q < FDR)", SET_COLORS["universal-calibrated"]))
    w = 0.8 / len(crit)
    parts = []
    for i, (col, h0, h1, label, color) in enumerate(crit):
        v = g[col].to_numpy(float)
        # NaN (both halves empty) drawn as no bar; the caption says n/a
        ax.bar(x + (i - (len(crit) - 1) / 2) * w, np.nan_to_num(v), width=w, color=color,
               label=label)
        parts.append(f"{label}: Jaccard {_vals(x, v)} (sizes half 0 / half 1: " + ", ".join(
            f"L{int(la)} {int(a)}/{int(b)}" for la, a, b in
            zip(x, g[h0], g[h1], strict=True)) + ")")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Jaccard |U₀ ∩ U₁| / |U₀ ∪ U₁|")
    ax.set_title(f"universal sets of two halves: {t.short(model)}")
    layer_axis(ax, x)
    ax.legend()
    bx.plot(x, g["excess_corr_r"], "-o", ms=3, color=PALETTE[0], label="excess correlation")
    bx.plot(x, g["max_corr_r"], "-s", ms=3, color=PALETTE[1], label="max correlation")
    bx.set_ylim(top=1.02)
    bx.set_ylabel("Pearson r between halves")
    bx.set_title("neurons' values, half 0 vs half 1")
    layer_axis(bx, x)
    bx.legend()
    tokens = ", ".join(f"{int(a):,} / {int(b):,}" for a, b in
                       zip(g["kept_tokens_h0"].iloc[:1], g["kept_tokens_h1"].iloc[:1], strict=True))
    cap = (f"The universal set of {t.short(model)} found on each of two disjoint halves of the "
           f"contexts ({tokens} kept tokens): per layer " + "; ".join(parts)
           + f". Correlation over the layer's neurons between the halves: excess correlation "
           f"{_vals(x, g['excess_corr_r'].to_numpy(float))}; max correlation "
           f"{_vals(x, g['max_corr_r'].to_numpy(float))}. Jaccard and r near 1: the token count "
           "pins the universal set down; n/a: both halves' sets empty."
           + ("" if cal else " The run has no calibrated criterion (--null-rotations 0)."))
    return Drawn(fig, cap)
