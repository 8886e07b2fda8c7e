"""The one exception type users see.

Every error a user can cause (bad path, bad option, corrupt file, unknown architecture) is
raised as :class:`UnineuronsError` with a message that says what went wrong, why, and what to
do. The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["UnineuronsError", "USER_CODE", "user_code_frames", "one_line"]


class UnineuronsError(ValueError):
    """A user-facing error: one line naming the object, the problem and the fix."""


#: Python files of the user's own code run by unineurons (``--feature-module``): an exception
#: raised inside them is the user's error, shown with their frames only.
USER_CODE: set[str] = set()


def user_code_frames(e: BaseException) -> list[str]:
    """``file:line in function`` of the traceback frames of ``e`` that lie in :data:`USER_CODE`
    (innermost last); empty when the exception did not pass through user code."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in frames if f.filename in USER_CODE]


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (line breaks become '; '), at most ``limit`` characters."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    s = "; ".join(parts)
    return s if len(s) <= limit else s[: limit - 1] + "…"
