"""Figures of both papers, drawn from a run directory's parquet tables only.

Every figure is a registered :class:`FigureSpec`: the tables it needs, a function that turns
the tables into a :class:`Drawn` (a matplotlib figure and a caption that states the numbers it
shows) or raises :class:`Skip` with the reason. :func:`make_figures` draws every figure whose
tables exist into ``RUN/figures/{id}.png`` / ``.svg`` (no display needed: plain matplotlib
``Figure`` objects, no pyplot) and lists the others with their reasons, so the report can say
what is missing instead of drawing it empty::

    drawn, skipped = make_figures(RunDir.open("RUN"))

The figure functions live in :mod:`.plots_corr` (correlations, properties, vocabulary,
families), :mod:`.plots_effects` (family examples, interventions, ablations) and
:mod:`.plots_dynamics` (training dynamics).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..io import atomic_path
from ..progress import track
from ..rundir import RunDir
from .tables import Skip, Tables, short_names

__all__ = ["FigureSpec", "Drawn", "Skip", "FigureResult", "SkippedFigure", "Tables", "FIGURES",
           "figure", "make_figures", "short_names", "layer_list", "token_label", "STYLE",
           "PALETTE", "SET_COLORS", "SECTIONS", "new_figure", "layer_axis"]

#: Okabe-Ito: distinguishable with every common colour-vision deficiency.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
SET_COLORS = {"universal": "#D55E00", "non-universal": "#0072B2", "random": "#7F7F7F"}
SET_COLORS["universal-calibrated"] = "#CC79A7"  # the calibrated criterion's set
STYLE = {
    "figure.dpi": 100, "savefig.bbox": "tight", "font.size": 9, "axes.titlesize": 10,
    "axes.labelsize": 9, "legend.fontsize": 8, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "svg.fonttype": "path",
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


@dataclass
class Drawn:
    """A drawn figure: ``fig`` and a caption that states the numbers shown."""

    fig: Any
    caption: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FigureSpec:
    id: str  #: file stem in RUN/figures and anchor in the report
    title: str
    section: str  #: report section it belongs to
    needs: tuple[str, ...]  #: tables that must exist (without .parquet)
    fn: Callable[[Tables, dict], Drawn]


@dataclass(frozen=True)
class FigureResult:
    """A figure written to disk. ``files`` are paths relative to the run directory."""

    id: str
    title: str
    section: str
    caption: str
    files: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedFigure:
    id: str
    title: str
    section: str
    reason: str


#: The registry; the report shows the figures section by section, in this order.
FIGURES: list[FigureSpec] = []
SECTIONS = ["Universality", "Neuron properties", "Vocabulary", "Families", "Interventions",
            "Ablations", "Training dynamics"]


def figure(id: str, title: str, section: str, needs: Sequence[str]):  # noqa: A002
    """Register the decorated ``fn(tables, options) -> Drawn`` as figure ``id``."""

    def deco(fn: Callable[[Tables, dict], Drawn]) -> Callable[[Tables, dict], Drawn]:
        if any(s.id == id for s in FIGURES):
            raise ValueError(f"figure {id!r} is registered twice")
        if section not in SECTIONS:
            raise ValueError(f"figure {id!r}: unknown section {section!r}")
        FIGURES.append(FigureSpec(id, title, section, tuple(needs), fn))
        return fn

    return deco


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def layer_list(values: pd.Series, digits: int = 3, pct: bool = False, max_layers: int = 12) -> str:
    """``L0 0.412, L1 0.388`` for a Series indexed by layer; with more than ``max_layers``
    layers the range and mean instead (``0.31 (L0) to 0.52 (L11), mean 0.44``)."""
    v = values.dropna()
    if v.empty:
        return "n/a"

    def f(x: float) -> str:
        return f"{100 * x:.{max(digits - 2, 0)}f}%" if pct else _fmt(float(x), digits)

    if len(v) <= max_layers:
        return ", ".join(f"L{int(k)} {f(x)}" for k, x in v.items())
    lo, hi = v.idxmin(), v.idxmax()
    return f"{f(v[lo])} (L{int(lo)}) to {f(v[hi])} (L{int(hi)}), mean {f(v.mean())}"


def token_label(s: Any, width: int = 18) -> str:
    """A token string as plot text: quoted, escapes visible, ``$`` kept literal (matplotlib
    would read ``$...$`` as math), cut to ``width`` characters."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "?"
    text = repr(str(s))
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("$", r"\$")


def _save(fig: Any, stem: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    out = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing glyphs of exotic tokens: drawn as boxes
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
        out.append(path)
    return out


def make_figures(run: RunDir, formats: Sequence[str] = ("png", "svg"), dpi: int = 150,
                 options: dict | None = None, only: Sequence[str] | None = None,
                 dynamics: RunDir | None = None
                 ) -> tuple[list[FigureResult], list[SkippedFigure]]:
    """Draw every registered figure (or the ``only`` ids) into ``RUN/figures``.

    A figure whose tables are missing, or that :class:`Skip` s, is returned in the second list
    with its reason and leaves no file. Old files of figures no longer drawn are removed so
    the folder never shows a figure of an earlier state of the run. ``options`` are passed to
    the figure functions (e.g. ``vocab_neuron``, ``models``, ``device``); ``dynamics`` is a
    separate run directory of ``unineurons dynamics`` whose tables are drawn too.
    """
    # importing the plot modules registers their figures
    from . import plots_corr, plots_dynamics, plots_effects, plots_similarity, plots_split  # noqa: F401

    tables = Tables(run, dynamics)
    out_dir = run.figures_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: list[FigureResult] = []
    skipped: list[SkippedFigure] = []
    specs = [f for f in sorted(FIGURES, key=lambda f: SECTIONS.index(f.section))
             if only is None or f.id in only]
    for spec in track(specs, "figures", unit="figures"):
        missing = [t for t in spec.needs if not tables.has(t)]
        try:
            if missing:
                raise Skip(f"needs {', '.join(m + '.parquet' for m in missing)}, which the run "
                           f"does not have{_how(missing)}")
            with matplotlib.rc_context(STYLE):
                d = spec.fn(tables, dict(options or {}))
                files = _save(d.fig, out_dir / spec.id, formats, dpi)
        except Skip as e:
            for old in out_dir.glob(f"{spec.id}.*"):
                old.unlink()
            skipped.append(SkippedFigure(spec.id, spec.title, spec.section, str(e)))
            continue
        drawn.append(FigureResult(spec.id, spec.title, spec.section, d.caption,
                                  tuple(str(p.relative_to(run.path)) for p in files),
                                  tuple(d.notes)))
    return drawn, skipped


#: The stage that writes each table, for "run X first" hints.
_MAKERS = {
    "neurons": "correlate", "matches": "correlate", "layers": "correlate",
    "top_contexts": "analyze", "vocab": "analyze", "families": "analyze",
    "properties": "analyze", "entropy": "analyze", "attention": "analyze",
    "ablations": "ablate", "interventions": "intervene", "emergence": "dynamics",
    "persistence": "dynamics", "trajectories": "dynamics",
    "dynamics_ablations": "dynamics --ablate",
    "layer_similarity": "correlate", "partner_kinds": "correlate",
    "split_half": "correlate --split-half",
}


def _how(missing: Sequence[str]) -> str:
    stages = list(dict.fromkeys(_MAKERS[m] for m in missing if m in _MAKERS))
    return f" (run `unineurons {'` and `unineurons '.join(stages)}`)" if stages else ""


def new_figure(n_panels: int, width: float = 4.2, height: float = 3.2, ncols: int | None = None
               ) -> tuple[Any, np.ndarray]:
    """A figure of ``n_panels`` axes in a grid (row-major), unused axes removed."""
    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    # a bare Figure, not pyplot: no global backend or figure registry to leak into; savefig
    # renders with Agg (png) or the SVG backend, never a window
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = axes.ravel()
    for ax in flat[n_panels:]:
        ax.remove()
    return fig, flat[:n_panels]


def layer_axis(ax: Any, layers: Sequence[int]) -> None:
    """Integer layer ticks (at most ~12 labels)."""
    layers = sorted(int(x) for x in layers)
    if not layers:
        return
    step = max(1, math.ceil(len(layers) / 12))
    ax.set_xticks(layers[::step])
    ax.set_xlabel("layer")
