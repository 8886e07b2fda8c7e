"""Progress bars for every long phase, each with its rate (``1,234 neurons/s``).

Library code wraps a loop in :func:`progress` and advances the bar it yields; the CLI decides
with :func:`set_quiet` whether bars are drawn. Bars nest: a bar opened while another is live
(a per-block phase inside a pass, a correlate run inside each dynamics step) joins the one
live display as a second line instead of starting a second display (rich allows one at a
time). When a nested bar ends, its final line (with its overall rate) is printed above the
live ones if it ran at least ``KEEP_NESTED_S`` seconds and finished without an exception, and
the line is removed: the scrollback keeps one line per phase that took time.

:func:`record_bars` lists every bar opened, drawn or quiet, so that a test can check that a
command's phases still have their bars. Usage::

    with progress("vocabulary moments", total=n_neurons, unit="neurons") as bar:
        for block in blocks:
            ...
            bar.advance(len(block))
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["progress", "track", "set_quiet", "Bar", "BarRecord", "record_bars", "format_rate"]

T = TypeVar("T")

_QUIET = False
_LOCK = threading.RLock()
_LIVE: Progress | None = None  #: the one live display while any bar is open
_OPEN = 0  #: bars open in ``_LIVE``
_RECORDERS: list[list[BarRecord]] = []


def set_quiet(quiet: bool) -> None:
    """Draw no bars (``True``) or draw them (``False``, the default). Bars are still recorded
    by :func:`record_bars` when quiet."""
    global _QUIET
    _QUIET = quiet


@dataclass(frozen=True)
class BarRecord:
    """One bar :func:`progress` opened: its description, total (None: open-ended) and unit."""

    description: str
    total: float | None
    unit: str


@contextmanager
def record_bars() -> Iterator[list[BarRecord]]:
    """Yield a list that collects a :class:`BarRecord` for every bar opened inside the block,
    in the order they open, quiet or not (a test hook: which phases of a command had a bar)."""
    rec: list[BarRecord] = []
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)


def format_rate(speed: float | None, unit: str) -> str:
    """``"1,234 tokens/s"``; 3 significant digits below 100 (``"0.412 layers/s"``), ``"?"``
    for an unknown speed."""
    if speed is None:
        return f"? {unit}/s"
    if speed >= 100:
        return f"{speed:,.0f} {unit}/s"
    return f"{speed:.3g} {unit}/s"


class _Rate(ProgressColumn):
    """The rate of a task in its own unit (the task field ``unit``)."""

    def render(self, task: Task) -> Text:
        return Text(format_rate(_speed(task), task.fields.get("unit", "items")),
                    style="progress.data.speed")


def _speed(task: Task) -> float | None:
    """A finished bar: its average rate over the whole phase. A running one: rich's recent
    rate, else the average so far (rich needs two advances for its own, and a phase that
    advances once per long step would read ``?`` until then)."""
    if task.finished_time:
        return task.completed / task.finished_time
    if task.speed is not None:
        return task.speed
    elapsed = task.elapsed
    return task.completed / elapsed if elapsed and task.completed else None


class Bar:
    """What :func:`progress` yields: ``advance(n)`` and ``set_total(n)`` (no-ops when quiet)."""

    def __init__(self, prog: Progress | None, task: TaskID | None):
        self._prog, self._task = prog, task

    def advance(self, n: float = 1) -> None:
        if self._prog is not None and self._task is not None:
            self._prog.advance(self._task, n)

    def set_total(self, total: float) -> None:
        if self._prog is not None and self._task is not None:
            self._prog.update(self._task, total=total)


def _console() -> Console:
    # as the CLI's console: not a terminal (a log, CI) gets 150 columns, not rich's 80
    return Console(width=None if sys.stdout.isatty() else 150)


def _open(description: str, total: float | None, unit: str) -> tuple[Progress, TaskID]:
    global _LIVE, _OPEN
    with _LOCK:
        if _LIVE is None:
            _LIVE = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
                             TimeRemainingColumn(), console=_console(), transient=False)
            _LIVE.start()
        _OPEN += 1
        return _LIVE, _LIVE.add_task(description, total=total, unit=unit)


#: A nested bar that ran at least this long keeps its final line in the scrollback.
KEEP_NESTED_S = 5.0


def _close(prog: Progress, task: TaskID, ok: bool = True) -> None:
    global _LIVE, _OPEN
    with _LOCK:
        _OPEN -= 1
        if _OPEN == 0:  # the last open bar: the display stops and keeps its final render
            prog.stop()
            _LIVE = None
            return
        # another bar is still live: print this one's final line above it (if it finished
        # and took long enough to matter: a per-block phase under --split-half or a dynamics
        # step would otherwise flood the scrollback) and drop the line
        done = [t for t in prog.tasks if t.id == task]
        if ok and done and (done[0].elapsed or 0.0) >= KEEP_NESTED_S:
            prog.console.print(prog.make_tasks_table(done))
        prog.remove_task(task)


@contextmanager
def progress(description: str, total: float | None, unit: str = "tokens") -> Iterator[Bar]:
    """A bar named ``description`` counting ``total`` ``unit`` (None: open-ended), with its
    rate in ``unit``/s; silent when quiet. Nested calls share one live display (module
    docstring)."""
    for rec in _RECORDERS:
        rec.append(BarRecord(description, total, unit))
    if _QUIET:
        yield Bar(None, None)
        return
    prog, task = _open(description, total, unit)
    ok = False
    try:
        yield Bar(prog, task)
        ok = True
    finally:
        _close(prog, task, ok)


def track(items: Sequence[T], description: str, unit: str) -> Iterator[T]:
    """Yield ``items`` under a bar of ``len(items)`` ``unit``, advancing by one after the
    consumer is done with each item (the work done between yields is what the bar times)."""
    with progress(description, len(items), unit) as bar:
        for item in items:
            yield item
            bar.advance(1)
