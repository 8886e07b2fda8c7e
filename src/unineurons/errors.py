"""The one exception type users see.

Every error a user can cause (bad path, bad option, corrupt file, unknown architecture) is
raised as :class:`UnineuronsError` with a message that says what went wrong, why, and what to
do. The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["UnineuronsError"]


class UnineuronsError(ValueError):
    """A user-facing error: one line naming the object, the problem and the fix."""
