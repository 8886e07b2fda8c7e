"""``unineurons show RUN L3.N12``: one neuron's card in the terminal.

The card is :meth:`unineurons.neuron.Neuron.card_data`, the same as the notebook's HTML card:
universality and matches in every seed (ρ and its rotation baseline), statistics, role and
family, the most promoted and suppressed tokens, and the top contexts with the activating token
highlighted. Corpus text goes into :class:`rich.text.Text` objects only, never through rich
markup, so a token like ``[bold]`` or ``[/]`` prints as itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

__all__ = ["register", "neuron_card", "resolve_model"]


def _t(s: Any, style: str = "") -> Any:
    from rich.text import Text

    return Text(str(s), style=style)


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def resolve_model(run: Any, model: str | None) -> str | int | None:
    """``--model``: a spec of the run, else a number as the index in the run's models."""
    from ..errors import UnineuronsError

    if model is None:
        return None
    try:
        return run.model(model)
    except UnineuronsError:
        if model.isdigit():
            return int(model)
        raise


def neuron_card(d: dict[str, Any]) -> Any:
    """A rich renderable of a card (:meth:`~unineurons.neuron.Neuron.card_data`)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    head = Text()
    head.append(d["address"], style="bold")
    head.append(" of ")
    head.append(d["model"], style="cyan")
    for k, v in d["universal"].items():
        if v:
            head.append("  universal" + (" (calibrated)" if k != "is_universal" else ""),
                        style="bold green")
    if d["universal"] and not any(d["universal"].values()):
        head.append("  not universal", style="yellow")
    parts.append(head)
    line = Text("role ")
    line.append(d["role"] or "-", style="bold")
    if d.get("roles"):
        line.append(" (" + ", ".join(f"{k}: {v}" for k, v in d["roles"].items()) + ")")
    line.append("   family ")
    line.append(d["family"] or "-", style="bold")
    if d["family_feature"]:
        line.append(f" ({d['family_feature']})")
    parts.append(line)

    tables: list[Any] = []
    if d["universality"] or d["stats"]:
        st = Table(title="statistics", title_justify="left", show_header=False, box=None)
        st.add_column("statistic")
        st.add_column("value", justify="right")
        for label, v in d["universality"] + d["stats"]:
            st.add_row(_t(label), _t(format(v, ".4g")))
        tables.append(st)
    if d["matches"]:
        mt = Table(title="best match in each seed", title_justify="left")
        mutual = "mutual_best" in d["matches"][0]  # one-to-one matching, when the run has it
        for c in ("partner", "match", "ρ", "baseline ρ", "excess") + (("mutual",) if mutual else ()):
            mt.add_column(c, justify="left" if c in ("partner", "match") else "right")
        for m in d["matches"]:
            cells = [_t(m["partner"]), _t(m["partner_address"]), _t(_f(m["max_corr"])),
                     _t(_f(m["baseline_corr"])), _t(_f(m["excess"]))]
            if mutual:
                import pandas as pd

                v = m["mutual_best"]
                cells.append(_t("-" if pd.isna(v) else ("yes" if bool(v) else "no")))
            mt.add_row(*cells)
        tables.append(mt)
    if d["promoted"] or d["suppressed"]:
        vt = Table(title="vocabulary: cos(w_out, W_U)", title_justify="left")
        for c in ("promoted", "cos", "suppressed", "cos "):
            vt.add_column(c, justify="right" if c.startswith("cos") else "left")
        for i in range(max(len(d["promoted"]), len(d["suppressed"]))):
            p = d["promoted"][i] if i < len(d["promoted"]) else ("", None)
            s = d["suppressed"][i] if i < len(d["suppressed"]) else ("", None)
            vt.add_row(_t(repr(p[0]) if p[1] is not None else ""), _t(_f(p[1], "+.3f")),
                       _t(repr(s[0]) if s[1] is not None else ""), _t(_f(s[1], "+.3f")))
        tables.append(vt)
    if tables:
        # statistics on the left, matches and vocabulary on the right
        grid = Table.grid(padding=(0, 3))
        grid.add_column()
        grid.add_column()
        grid.add_row(tables[0], Group(*tables[1:]) if len(tables) > 1 else Text(""))
        parts.append(grid)
    if d["contexts"]:
        parts.append(Text("top contexts (activation: text, the activating token highlighted)",
                          style="bold"))
        for c in d["contexts"]:
            t = Text()
            t.append(f"{c['value']:>8.3g}  ", style="dim")
            t.append(c["before"])
            t.append(c["token"], style="bold black on yellow")
            t.append(c["after"])
            parts.append(t)
    if d["missing"]:
        parts.append(Text("not in this run: " + ", ".join(d["missing"]), style="dim"))
    return Panel(Group(*parts), title=Text(f"neuron {d['address']}"), title_align="left")


def show(
    run: Path = typer.Argument(..., help="Run directory."),
    neuron: str = typer.Argument(..., help="Neuron address L{layer}.N{index}, e.g. L3.N12."),
    model: str = typer.Option(None, "--model", "-m", help="Model of the run (its spec, or its "
                              "index in the run's models); default the reference."),
    contexts: int = typer.Option(5, "--contexts", min=0, help="Top contexts shown."),
    tokens: int = typer.Option(10, "--tokens", min=0, help="Promoted / suppressed tokens shown."),
) -> None:
    """One neuron's card: universality and best match in every seed (ρ and baseline),
    statistics, role and family, promoted / suppressed tokens, top contexts."""
    from ..run import Run
    from . import console

    r = Run(run)
    n = r.neuron(neuron, model=resolve_model(r, model))
    console.print(neuron_card(n.card_data(contexts, tokens)))


def register(app: typer.Typer) -> None:
    """Add the ``show`` command to ``app``."""
    app.command("show")(show)
