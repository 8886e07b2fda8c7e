"""The ``unineurons`` command line: a thin typer layer over the importable API.

Each command group lives in its own module with a ``register(app)`` function. Errors a user
can cause are :class:`~unineurons.errors.UnineuronsError`: printed as one line, exit code 1.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from ..errors import UnineuronsError, one_line, user_code_frames

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

    for mod in ("data", "zoo", "correlate", "analyze", "ablate", "dynamics", "report", "pipeline",
                "show", "export"):
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


def _checked(fn):
    """``fn`` with its numeric options checked first (:func:`unineurons.config.check_options`):
    NaN, infinities and out-of-range values, and a device this machine lacks (except for
    ``plan``, which plans for another machine), are refused before the command does anything."""
    import functools

    @functools.wraps(fn)  # typer reads the options from the wrapped signature
    def wrapper(*args, **kwargs):
        from ..config import check_options

        check_options(kwargs, device_here=fn.__name__ != "plan")
        return fn(*args, **kwargs)

    return wrapper


def _check_all(t: typer.Typer) -> None:
    for info in t.registered_commands:
        if info.callback is not None and not getattr(info.callback, "__wrapped__", None):
            info.callback = _checked(info.callback)
    for group in t.registered_groups:
        if group.typer_instance is not None:
            _check_all(group.typer_instance)


_check_all(app)


def _global_options(debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an unexpected error (a bug report's "
        "content); also UNINEURONS_DEBUG=1. Works anywhere on the command line.")) -> None:
    """Find and study universal neurons across seeds."""


app.callback()(_global_options)


def _say(message: str) -> None:
    from rich.markup import escape

    # escape: messages quote user text and extras like 'unineurons[ray]'
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False,
                      soft_wrap=True)


def _os_error(e: OSError) -> str:
    """One line for an operating-system error: what, why, what to do."""
    import errno

    where = e.filename if e.filename is not None else "a file"
    why = e.strerror or type(e).__name__
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        fix = "free some space (or raise the quota), or write to another --out"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to (--out), or fix its permissions"
    elif e.errno == errno.ENOENT:
        fix = "check the path"
    else:
        fix = "check the path and the disk"
    return f"cannot use {where}: {why}; {fix}"


def _unexpected(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception that is not a UnineuronsError."""
    from ..errors import USER_CODE

    if isinstance(e, SyntaxError) and e.filename in USER_CODE:
        return (f"your code does not compile: {e.msg} (at {e.filename}:{e.lineno}); fix the "
                "feature module", 1)
    frames = user_code_frames(e)
    if frames:  # raised in the user's own --feature-module: their error, their frames
        return (f"your code raised {type(e).__name__}: {e} (at {' <- '.join(reversed(frames))}); "
                "fix the feature module", 1)
    if isinstance(e, OSError):
        return _os_error(e), 1
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ("out of memory; lower --batch-size (or --memory-budget, --n-tokens), or use a "
                "machine with more memory", 1)
    if isinstance(e, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8", 1)
    return (f"unexpected {type(e).__name__}: {e} -- this is a bug in unineurons; rerun with "
            "--debug for the traceback and report it", 70)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning every error into one line.

    User errors (:class:`~unineurons.errors.UnineuronsError`), operating-system errors (full
    disk, read-only folder), memory exhaustion and exceptions in the user's own feature code
    print one line and exit 1; anything else is a bug: one line, exit 70, and ``--debug``
    shows its traceback. A failed command removes the output folders it created (an
    interrupted one keeps them: its checkpoints resume), and releases its folder locks.
    """
    import os

    from .. import io, lock

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("UNINEURONS_DEBUG", "") not in ("", "0")
    if "--debug" in args[1:]:  # anywhere after the command too; the callback reads it first
        args = [a for a in args if a != "--debug"]
        args.insert(0, "--debug")
    lock.hold_on_open = True
    made = len(io.created_outputs())
    from ..checks import offline_if_unreachable

    offline_if_unreachable()  # a hub lookup offline fails at once, not after retries
    code = 0
    try:
        rc = app(args=args, standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except UnineuronsError as e:
        _say(str(e))
        code = 1
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[bold red]interrupted[/] (rerun with --resume where a stage offers it)")
        code = 130
    except Exception as e:
        # usage errors (missing option, bad value) arrive here in non-standalone mode; typer
        # ships its own click, so match the click exception shape rather than its class
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            code = e.exit_code
        else:
            if debug:
                import traceback

                traceback.print_exception(e)
            msg, code = _unexpected(e)
            _say(msg)
    finally:
        if code not in (0, 130):
            io.remove_created_outputs(since=made)
        lock.release_all()
        lock.hold_on_open = False
    sys.exit(code)
