"""``unineurons export RUN``: the universal neurons with their TransformerLens and Hugging Face
names, as CSV or JSON (:meth:`unineurons.run.Run.export`)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

__all__ = ["register"]


def export(
    run: Path = typer.Argument(..., help="Run directory with universality (correlate)."),
    format: str = typer.Option("csv", "--format", "-f", help="csv or json."),
    criterion: str = typer.Option("paper", "--criterion", help="paper (excess correlation > "
                                  "threshold) or calibrated (against the run's null)."),
    model: str = typer.Option(None, "--model", "-m", help="Only this model of the run (spec or "
                              "index); default every model with universality."),
    all_neurons: bool = typer.Option(False, "--all", help="Every neuron, not only the "
                                     "universal ones."),
    out: Path = typer.Option(None, "--out", "-o", help="File to write; standard output when "
                             "unset."),
) -> None:
    """Universal neurons with columns tl_hook (TransformerLens: blocks.{L}.mlp.hook_post),
    tl_index, hf_module (the MLP output projection whose input is the neuron) and universality."""
    from ..run import Run
    from . import console
    from .show import resolve_model

    r = Run(run)
    text = r.export(out, format=format, criterion=criterion,  # type: ignore[arg-type]
                    model=resolve_model(r, model), all_neurons=all_neurons)
    n = text.count("\n") - 1 if format == "csv" else text.count('"address"')
    if out is None:
        sys.stdout.write(text)
    else:
        console.print(f"{n} neurons written to {out}", highlight=False)
    if n == 0 and not all_neurons and criterion == "paper":
        cal = r.neurons.get("is_universal_calibrated")
        if cal is not None and cal.fillna(False).astype(bool).any():
            from . import err_console

            err_console.print(f"note: no neuron passes the paper's threshold; "
                              f"{int(cal.fillna(False).astype(bool).sum())} pass the calibrated "
                              "criterion (--criterion calibrated)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""
    app.command("export")(export)
