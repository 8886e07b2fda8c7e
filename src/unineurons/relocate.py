"""Where a run's models and a token store's tokenizer are now, when their folders moved.

A run records each model's folder (absolute) and its weights' sha256; a token store records its
tokenizer's folder and vocabulary fingerprint. When such a folder is moved, the commands that
read it (``analyze``, ``ablate``, ``intervene`` on a run; ``zoo train`` on a store) refuse with
one line that names the override to pass: ``--model-path SPEC=FOLDER`` or ``--tokenizer DIR``.
The override only says where the files are: the weights' sha256 (models) or the vocabulary
fingerprint (tokenizers) must still match what was recorded, so a result never silently
changes meaning. From Python::

    with unineurons.relocate.relocated(models={"old/seed0": "/new/seed0"}):
        unineurons.api.ablate(run)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .errors import UnineuronsError

__all__ = ["relocated", "parse_model_paths", "moved_model", "moved_tokenizer", "hold"]

_MODELS: ContextVar[dict[str, str] | None] = ContextVar("unineurons_moved_models", default=None)
_TOKENIZER: ContextVar[str | None] = ContextVar("unineurons_moved_tokenizer", default=None)


def parse_model_paths(values: Sequence[str] | None) -> dict[str, str]:
    """``["SPEC=FOLDER", ...]`` (the ``--model-path`` option) as ``{SPEC: FOLDER}``.

    Raises:
        UnineuronsError: a value without ``=``, or a model given twice.
    """
    out: dict[str, str] = {}
    for v in values or ():
        old, sep, new = v.rpartition("=")
        if not sep or not old or not new:
            raise UnineuronsError(f"option --model-path: {v!r} is not SPEC=FOLDER (the run's "
                                  "model spec, =, the folder it is in now)")
        if old in out:
            raise UnineuronsError(f"option --model-path: model {old} is given twice")
        out[old] = new
    return out


@contextmanager
def relocated(models: Mapping[str, str] | None = None,
              tokenizer: str | Path | None = None) -> Iterator[None]:
    """Within the block, load a run's model recorded as ``SPEC`` (its spec or its recorded
    folder) from ``models[SPEC]``, and a token store's tokenizer from ``tokenizer``."""
    t1 = _MODELS.set({**(_MODELS.get() or {}), **{str(k): str(v) for k, v in (models or {}).items()}})
    t2 = _TOKENIZER.set(None if tokenizer is None else str(tokenizer))
    try:
        yield
    finally:
        _TOKENIZER.reset(t2)
        _MODELS.reset(t1)


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return Path(a).expanduser().absolute() == Path(b).expanduser().absolute()
    except (OSError, ValueError):
        return False


def moved_model(spec: str, location: str | None) -> str | None:
    """The folder given for the run's model ``spec`` (recorded at ``location``), or None.

    Raises:
        UnineuronsError: the given folder does not exist.
    """
    for old, new in (_MODELS.get() or {}).items():
        if _same(old, spec) or (location and _same(old, location)):
            if not Path(new).expanduser().is_dir():
                raise UnineuronsError(f"option --model-path {old}={new}: the folder {new} does not "
                                      "exist")
            return str(Path(new).expanduser().absolute())
    return None


def moved_tokenizer() -> str | None:
    """The tokenizer folder given with ``--tokenizer`` (absolute), or None.

    Raises:
        UnineuronsError: the folder does not exist.
    """
    t = _TOKENIZER.get()
    if t is None:
        return None
    if not Path(t).expanduser().is_dir():
        raise UnineuronsError(f"option --tokenizer: the folder {t} does not exist")
    return str(Path(t).expanduser().absolute())


def hold(ctx, models: Sequence[str] | None = None, tokenizer: str | Path | None = None) -> None:
    """For a CLI command: ``--model-path SPEC=FOLDER`` values and ``--tokenizer DIR`` hold for
    the rest of the command (``ctx``: its ``typer.Context``)."""
    moves = parse_model_paths(models)
    if not moves and tokenizer is None:
        return
    held = relocated(moves, tokenizer)
    held.__enter__()
    ctx.call_on_close(lambda: held.__exit__(None, None, None))
