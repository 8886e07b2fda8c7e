"""``unineurons report RUN``: figures and the neuron browser in one static HTML report.

Writes ``RUN/figures/{id}.png|svg`` (:mod:`.figures`) and ``RUN/report/index.html`` with its
``report/static/`` scripts and styles. The page opens from ``file://`` with no server and no
network: everything it loads is a local file, and a Content-Security-Policy forbids anything
else. Every string that comes from the run (token strings, contexts, model specs, captions)
reaches the page through an autoescaping Jinja template or, in the browser, ``textContent``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import __version__
from ..config import MAX_BATCH, MAX_INT, MAX_TOP_K, Device
from ..errors import UnineuronsError
from ..io import atomic_path
from ..rundir import RunDir
from .browser import browser_data, context_neurons, script_json
from .tables import Tables

__all__ = ["ReportConfig", "ReportResult", "build_report"]


class ReportConfig(BaseModel):
    """What the report draws and embeds."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    figures: bool = Field(True, description="Draw the figures into RUN/figures.")
    browser: bool = Field(True, description="Embed the neuron browser (table and neuron pages).")
    formats: tuple[Literal["png", "svg"], ...] = Field(
        ("png", "svg"), min_length=1, description="Figure file formats.")
    dpi: int = Field(150, ge=50, le=600, description="Resolution of the PNG figures.")
    models: bool = Field(True, description="Load the run's models (when they load unchanged) for "
                         "what the tables lack: the whole-vocabulary cosine histogram and the "
                         "activation of every token of the top-context windows. Off: tables only.")
    max_context_neurons: int = Field(2000, ge=0, le=MAX_INT, description="Per model, neurons whose top "
                                     "contexts and vocabulary are embedded (universal neurons and "
                                     "their matches first); bounds the report's size.")
    vocab_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Promoted / suppressed tokens shown per neuron.")
    vocab_neuron: str | None = Field(None, description="Neuron of the vocabulary histogram: "
                                     "L3.N12 (reference model) or MODEL_INDEX:L3.N12; default: "
                                     "the most universal neuron with vocabulary rows.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass when recomputing "
                            "window activations.")
    device: Device = Field("cpu", description="cpu or cuda[:i] for the model passes.")
    dynamics: str | None = Field(None, description="A run directory of `unineurons dynamics` "
                                 "whose figures the report draws too (its tables are read from "
                                 "there; the pipeline sets it to out/dynamics).")


    @field_validator("vocab_neuron")
    @classmethod
    def _neuron(cls, v: str | None) -> str | None:
        from ..models.adapters import parse_neuron

        if v is not None:
            idx, _, addr = v.rpartition(":")
            if idx and not idx.isdigit():
                raise ValueError(f"vocab_neuron {v!r}: give L3.N12 or MODEL_INDEX:L3.N12")
            try:
                parse_neuron(addr)
            except UnineuronsError as e:
                raise ValueError(str(e)) from None
        return v


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    index: Path  #: RUN/report/index.html
    figures: list  #: FigureResult of each figure drawn
    skipped: list  #: SkippedFigure of each figure left out, with the reason
    notes: list[str] = field(default_factory=list)
    n_neurons: int = 0  #: rows of the browser's table
    n_context_neurons: int = 0  #: neurons with embedded top contexts
    elapsed_s: float = 0.0


_STATIC = ("report.css", "browser.js")


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    folder = resources.files("unineurons.report") / "templates"
    # autoescape everything: captions and model specs hold user and corpus text
    return Environment(loader=FileSystemLoader(str(folder)), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _summary(t: Tables) -> list[tuple[str, str]]:
    """Key facts of the run for the report's header."""
    m = t.manifest
    out = [("models", ", ".join(t.short(s) for s in t.models) or "none")]
    tok = m.get("tokens") or {}
    if tok.get("n_tokens"):
        out.append(("tokens", f"{int(tok['n_tokens']):,} ({tok.get('n_contexts', '?')} "
                              f"contexts of {tok.get('ctx', '?')}) from {tok.get('path', '?')}"))
    n = t.get("neurons")
    if n is not None and "is_universal" in n:
        for ref in t.corr_models:
            r = n[n["model"] == ref]
            k = int(r["is_universal"].fillna(False).astype(bool).sum())
            out.append((f"universal neurons of {t.short(ref)}",
                        f"{k} of {len(r)} ({100 * k / max(len(r), 1):.2f}%), excess correlation "
                        f"> {t.threshold}"))
    out += _calibrated_summary(t, n)
    a = t.get("ablations")
    if a is not None and len(a):
        from ..analyses.ablate import headline

        out.append(("ablations", headline(a)))
    return out


def _calibrated_summary(t: Tables, n: pd.DataFrame | None) -> list[tuple[str, str]]:
    """The calibrated criteria beside the paper's (issue 13): calibrated universal counts, role
    counts under both rules, and one sentence on why the criteria differ. Empty when the run
    has neither calibrated column."""
    if n is None:
        return []
    out = []
    cfg = (t.manifest.get("correlate") or {}).get("config") or {}
    if "is_universal_calibrated" in n:
        for ref in t.corr_models:
            r = n[n["model"] == ref]
            k = int(r["is_universal_calibrated"].fillna(False).astype(bool).sum())
            out.append((f"calibrated universal neurons of {t.short(ref)}",
                        f"{k} of {len(r)} ({100 * k / max(len(r), 1):.2f}%), BH q < "
                        f"{cfg.get('fdr', 0.01):g} against each neuron's null of "
                        f"{cfg.get('null_rotations', '?')} seeded rotations"))
    if {"role_paper", "role_calibrated"} <= set(n.columns) and t.corr_models:
        r = n[n["model"] == t.reference]
        for col, rule in (("role_paper", "paper thresholds"),
                          ("role_calibrated", "calibrated (beyond random directions)")):
            c = r[col][r[col].notna() & (r[col] != "none")].value_counts()
            out.append((f"roles of {t.short(t.reference)}, {rule}",
                        ", ".join(f"{k} {int(v)}" for k, v in c.items()) or "none"))
    if out:
        from ..cli.correlate import CRITERIA_NOTE

        out.append(("why the criteria differ", CRITERIA_NOTE[0].upper() + CRITERIA_NOTE[1:] + "."))
    return out


def build_report(run_path: str | Path, cfg: ReportConfig = ReportConfig()) -> ReportResult:
    """Draw the figures and write ``RUN/report/index.html`` for the run at ``run_path``."""
    t0 = time.perf_counter()
    from .figures import make_figures  # matplotlib: only when drawing

    run = RunDir.open(run_path)
    dyn = RunDir.open(cfg.dynamics) if cfg.dynamics else None
    t = Tables(run, dyn)
    if not any(t.has(x) for x in ("neurons", "ablations", "emergence")):
        raise UnineuronsError(f"run {run.path} has no tables to report yet; run `unineurons "
                              "correlate` (or analyze / ablate / dynamics) into it first")
    notes: list[str] = []
    figs: list = []
    skipped: list = []
    if cfg.figures:
        figs, skipped = make_figures(run, cfg.formats, cfg.dpi, options={
            "models": cfg.models, "device": cfg.device, "vocab_neuron": cfg.vocab_neuron},
            dynamics=dyn)
        notes += [f"{f.title}: {n}" for f in figs for n in f.notes]
    data: dict = {}
    if cfg.browser:
        acts = None
        tc = t.get("top_contexts")
        if cfg.models and tc is not None and len(tc) and cfg.max_context_neurons:
            from .windows import run_window_activations

            acts, more = run_window_activations(t.manifest, tc, context_neurons(
                t, cfg.max_context_neurons), cfg.device, cfg.batch_size)
            notes += more
        elif tc is not None and len(tc):
            notes.append("tokens shaded by the top activation only: loading models is off")
        data = browser_data(t, cfg.max_context_neurons, cfg.vocab_k, acts)
    out = run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in _STATIC:
        src = resources.files("unineurons.report") / "static" / name
        _write_text(out / "static" / name, src.read_text(encoding="utf-8"))
    # show the SVG (sharp at any zoom) where there is one
    views = [{**vars(f), "img": next((p for p in f.files if p.endswith(".svg")), f.files[0])}
             for f in figs]
    sections = [(s, [v for v in views if v["section"] == s])
                for s in dict.fromkeys(f.section for f in figs)]
    html = _env().get_template("index.html").render(
        title=run.path.resolve().name, run_path=str(run.path.resolve()), version=__version__,
        created=time.strftime("%Y-%m-%d %H:%M"), summary=_summary(t),
        sections=[(s, fs) for s, fs in sections if fs], skipped=skipped, notes=notes,
        browser=cfg.browser, data_json=script_json(data) if cfg.browser else "{}")
    index = out / "index.html"
    _write_text(index, html)
    res = ReportResult(index=index, figures=figs, skipped=skipped, notes=notes,
                       n_neurons=int((data.get("neurons") or {}).get("n", 0)),
                       n_context_neurons=len(data.get("contexts") or {}),
                       elapsed_s=round(time.perf_counter() - t0, 3))
    run.update_manifest(report={
        "config": cfg.model_dump(mode="json"), "index": str(index.relative_to(run.path)),
        "figures": [f.id for f in figs], "skipped": {s.id: s.reason for s in skipped},
        "notes": notes, "elapsed_s": res.elapsed_s})
    return res
