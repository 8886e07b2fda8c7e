"""``unineurons report RUN``: figures and the neuron browser of a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import build

__all__ = ["register", "show_report"]


def show_report(res, console) -> None:
    """Print what a report wrote: figures, figures left out (and why), notes, the page."""
    from rich.table import Table

    t = Table(title="figures", title_justify="left")
    for c in ("figure", "files"):
        t.add_column(c)
    for f in res.figures:
        t.add_row(f.id, ", ".join(f.files))
    console.print(t)
    for s in res.skipped:
        console.print(f"[yellow]not drawn[/] {s.id}: {s.reason}", highlight=False)
    for n in res.notes:
        console.print(f"[yellow]note[/]: {n}", highlight=False)
    console.print(f"browser: {res.n_neurons} neurons, top contexts of {res.n_context_neurons}")
    console.print(f"report: [bold]{res.index}[/]  (open {res.index.resolve().as_uri()})",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run: Path = typer.Argument(..., help="Run directory (of correlate, analyze, ablate, ...)."),
        figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw RUN/figures."),
        browser: bool = typer.Option(True, "--browser/--no-browser", help=(
            "Embed the neuron browser (table of neurons, neuron pages)."
        )),
        models: bool = typer.Option(True, "--models/--no-models", help=(
            "Load the run's models for what the tables lack (whole-vocabulary histogram, "
            "activation of every context token); --no-models: tables only."
        )),
        formats: str = typer.Option("png,svg", "--formats", help="Figure formats: png, svg or both."),
        dpi: int = typer.Option(150, help="PNG resolution."),
        max_context_neurons: int = typer.Option(2000, help=(
            "Per model, neurons whose top contexts and vocabulary are embedded (universal "
            "neurons and their matches first)."
        )),
        vocab_k: int = typer.Option(10, help="Promoted / suppressed tokens shown per neuron."),
        vocab_neuron: str = typer.Option(None, help=(
            "Neuron of the vocabulary histogram: L3.N12 (reference) or MODEL_INDEX:L3.N12."
        )),
        batch_size: int = typer.Option(8, help="Contexts per forward pass (window activations)."),
        device: str = typer.Option("cpu", help="cpu or cuda[:i]."),
        dynamics: Path = typer.Option(None, help=(
            "Run directory of `unineurons dynamics` whose figures are drawn too."
        )),
    ) -> None:
        """Figures of both papers (RUN/figures/*.png, *.svg) and a static HTML report with a
        neuron browser (RUN/report/index.html), all from the run's tables."""
        from ..report import ReportConfig, build_report
        from . import console
        from .ablate import _items

        cfg = build(ReportConfig, figures=figures, browser=browser, models=models,
                      formats=tuple(_items(formats, "--formats")), dpi=dpi,
                      max_context_neurons=max_context_neurons, vocab_k=vocab_k,
                      vocab_neuron=vocab_neuron, batch_size=batch_size, device=device,
                      dynamics=None if dynamics is None else str(dynamics))
        show_report(build_report(run, cfg), console)
