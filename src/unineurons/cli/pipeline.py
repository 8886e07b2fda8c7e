"""``unineurons run CONFIG.toml`` and ``unineurons demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

__all__ = ["register"]


def _show(what: str, obj: Any) -> None:
    from . import console
    from .correlate import print_summary

    if what == "zoo":
        t = Table(title="seed zoo", title_justify="left")
        for col in ("seed", "checkpoints", "final train loss", "final held-out loss"):
            t.add_column(col, justify="right")
        for seed, s in obj.get("per_seed", {}).items():
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            t.add_row(str(seed), ",".join(str(x) for x in s.get("checkpoints", [])),
                      fmt(s.get("train_loss")), fmt(s.get("heldout_loss")))
        console.print(t)
    elif what == "correlate":
        print_summary(obj.layers, console)
        if obj.run.has_table("split_half"):
            from .correlate import print_split_half

            print_split_half(obj.run.read_table("split_half"), console)
    elif what == "analyze":
        from .analyze import show_analysis

        show_analysis(obj)
    elif what == "ablate":
        from .ablate import show_ablations

        show_ablations(obj)
    elif what == "dynamics":
        from .dynamics import show_dynamics

        show_dynamics(obj)
    elif what == "report":
        from .report import show_report

        show_report(obj, console)


def _run(cfg, started: float) -> None:
    from ..pipeline import run_pipeline
    from . import console

    where = run_pipeline(cfg, say=console.print, show=_show)
    console.print(f"\n[bold green]done[/] in {time.time() - started:.0f} s. Everything is in "
                  f"[bold]{cfg.out}[/]:")
    for what, path in where.items():
        console.print(f"  {what:10s} {path}")


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(config: Path = typer.Argument(None, help="Pipeline config (TOML); see configs/demo.toml."),
            builtin: str = typer.Option(None, "--builtin", help="Run a built-in config instead: "
                                        "demo, micro or seeds-grid (init vs data-order grid, "
                                        "longer than the demo)."),
            out: Path = typer.Option(None, help="Output folder (a built-in's default otherwise).")
            ) -> None:
        """Run the pipeline a TOML config describes; finished stages are reused."""
        from ..errors import UnineuronsError
        from ..pipeline import builtin_config, load_config

        if (config is None) == (builtin is None):
            raise UnineuronsError("give a CONFIG file or --builtin NAME (one of them)")
        over = {"out": str(out)} if out else {}
        if builtin is not None:
            _run(load_config(text=builtin_config(builtin), overrides=over), time.time())
        else:
            _run(load_config(config, overrides=over), time.time())

    @app.command("demo")
    def demo(
        out: Path = typer.Option(None, help="Output folder (default: ./unineurons_demo)."),
        config: str = typer.Option(
            "demo", help="Built-in config: demo (about 9 min on 2 idle cores) or micro (seconds)."),
    ) -> None:
        """The whole pipeline offline on the standard library: tokenizer, token stores, a 5-seed
        zoo of tiny GPT-2s, universal neurons, their properties and ablations, and the report
        (figures and neuron browser) whose path it prints last."""
        from ..pipeline import builtin_config, load_config

        over = {"out": str(out)} if out else {}
        _run(load_config(text=builtin_config(config), overrides=over), time.time())
