"""Progress bars for every long loop, with a rate (tokens/s or steps/s).

Library code calls :func:`progress` and gets a bar on a terminal, nothing when quiet; the CLI
decides which with :func:`set_quiet`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["progress", "set_quiet", "Bar"]

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


class Bar:
    """What :func:`progress` yields: ``advance(n)`` and ``set_total(n)``."""

    def __init__(self, prog: Progress | None, task: int | None):
        self._prog, self._task = prog, task

    def advance(self, n: float = 1) -> None:
        if self._prog is not None:
            self._prog.advance(self._task, n)

    def set_total(self, total: float) -> None:
        if self._prog is not None:
            self._prog.update(self._task, total=total)


@contextmanager
def progress(description: str, total: float | None, unit: str = "tokens") -> Iterator[Bar]:
    """A progress bar showing ``unit``/s; silent when quiet."""
    if _QUIET:
        yield Bar(None, None)
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            _Rate(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield Bar(prog, task)
