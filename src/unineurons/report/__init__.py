"""The report: figures of both papers and an offline neuron browser, from a run's tables.

``build_report("RUN")`` draws ``RUN/figures/*.png|svg`` and writes ``RUN/report/index.html``
(static; opens from ``file://``). See :mod:`.build`, :mod:`.figures`, :mod:`.browser`.
"""

from typing import Any

from .._stage import make_callable
from .build import ReportConfig, ReportResult, build_report

make_callable(__name__)  # unineurons.report(RUN, ...) runs unineurons.api.report

__all__ = ["ReportConfig", "ReportResult", "build_report", "make_figures", "FigureResult",
           "SkippedFigure", "FIGURES"]


def __getattr__(name: str) -> Any:
    # the figure API pulls in matplotlib: loaded only when asked for
    if name in ("make_figures", "FigureResult", "SkippedFigure", "FIGURES"):
        from . import figures

        return getattr(figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
