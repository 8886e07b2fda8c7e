"""The ``unineurons`` command line: a thin typer layer over the importable API.

Each command group lives in its own module with a ``register(app)`` function. Errors a user
can cause are :class:`~unineurons.errors.UnineuronsError`: printed as one line, exit code 1.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from ..errors import UnineuronsError

__all__ = ["app", "main", "console"]

# Tables stay readable when output goes to a file or CI log (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

app = typer.Typer(
    name="unineurons",
    help="Find and study universal neurons: MLP neurons that fire on the same inputs in "
    "language models trained from different seeds (Gurnee et al. 2024; Nandan et al. 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    import importlib

    for mod in ("data", "zoo", "correlate", "analyze", "ablate", "dynamics", "report", "pipeline"):
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{mod}":
                continue  # that command group is not part of this build
            raise
        m.register(app)


_register_all()
from .families import register as _register_seed_families  # noqa: E402

_register_seed_families(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning user errors into one line."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except UnineuronsError as e:
        from rich.markup import escape

        # escape: messages quote user text and extras like 'unineurons[ray]'
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("[bold red]aborted[/]")
        sys.exit(130)
    except Exception as e:
        # usage errors (missing option, bad value) arrive here in non-standalone mode; typer
        # ships its own click, so match the click exception shape rather than its class
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
