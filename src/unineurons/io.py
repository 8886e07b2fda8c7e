"""Atomic, pickle-free file writing and hashing.

Every file unineurons writes goes through here: written to a temporary sibling, flushed and
renamed into place, so a killed process never leaves a half-written file that looks whole.
Only JSON, NumPy ``.npy``, parquet and safetensors are written or read: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnineuronsError

__all__ = [
    "atomic_path",
    "write_json",
    "read_json",
    "write_parquet",
    "save_tensors",
    "load_tensors",
    "sha256_file",
    "prepare_out_dir",
    "MARKER",
    "read_text",
    "check_free_disk",
    "created_outputs",
    "remove_created_outputs",
]

#: Name of the marker file that says "this folder was made by unineurons, of this kind".
MARKER = ".unineurons.json"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's contents; a missing file or one in another encoding is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UnineuronsError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UnineuronsError(
            f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


def check_free_disk(path: str | os.PathLike, need_bytes: int, what: str,
                    fix: str = "free some space or write elsewhere") -> None:
    """Refuse to start writing ``need_bytes`` under ``path`` (or its nearest existing parent)
    when the file system has less free space, rather than fail (or crash) half-way; ``fix``
    ends the message."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if need_bytes > free:
        raise UnineuronsError(
            f"{what} needs {need_bytes / 1e9:,.2f} GB but {p} has only {free / 1e9:,.2f} GB free; "
            f"{fix}"
        )


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or malformed file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UnineuronsError(f"{what} {path} does not exist")
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UnineuronsError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); "
            "it is corrupt: delete it and re-create it"
        ) from None


def write_parquet(df: Any, path: str | os.PathLike) -> None:
    """Write a pandas DataFrame to parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None):
    """Save a dict of torch tensors / numpy arrays as safetensors, atomically."""
    import torch
    from safetensors.torch import save_file

    clean = {}
    for k, v in tensors.items():
        t = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
        clean[k] = t.detach().to("cpu").contiguous()
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, what: str = "state file") -> tuple[dict, dict]:
    """Load safetensors (tensors, metadata); a corrupt file gives a clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UnineuronsError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UnineuronsError(
            f"{what} {path} cannot be read as safetensors ({e}); it is corrupt: delete it"
        ) from None


def save_checkpoint(path: str | os.PathLike, tensors: dict, progress: dict) -> None:
    """A resumable state: ``tensors`` plus a ``progress`` record (JSON in the metadata) that
    names the ``config_hash`` the state belongs to and where the stage got to."""
    save_tensors(path, tensors, metadata={"progress": json.dumps(progress)})


def load_checkpoint(path: str | os.PathLike, config_hash: str, what: str, mismatch: str
                    ) -> tuple[dict, dict]:
    """``(tensors, progress)`` of a :func:`save_checkpoint` file; ``mismatch`` is the error
    when it belongs to another configuration (resuming it would mix two runs' numbers)."""
    tensors, meta = load_tensors(path, what)
    progress = json.loads(meta.get("progress", "{}"))
    if progress.get("config_hash") != config_hash:
        raise UnineuronsError(mismatch)
    return tensors, progress


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22, desc: str | None = None) -> str:
    """Hex sha256 of a file's bytes, streamed; with ``desc``, under a progress bar of that
    name counting MB (a token store of 10^9 tokens takes seconds)."""
    from contextlib import nullcontext

    from .progress import progress

    h = hashlib.sha256()
    shown = progress(desc, os.path.getsize(path) / 1e6, unit="MB") if desc else nullcontext()
    with open(path, "rb") as f, shown as bar:
        while block := f.read(chunk):
            h.update(block)
            if bar is not None:
                bar.advance(len(block) / 1e6)
    return h.hexdigest()


def prepare_out_dir(path: str | os.PathLike, kind: str, *, exist_ok: bool = True) -> Path:
    """Create (or reuse) an output folder that belongs to unineurons and holds ``kind``.

    A folder that exists, is not empty and has no marker of the same kind holds something
    else: refuse it rather than write into (or over) the user's files.
    """
    path = Path(path)
    marker = path / MARKER
    existed = path.exists()
    if existed:
        if not path.is_dir():
            raise UnineuronsError(f"output {path} exists and is not a folder; choose another --out")
        if any(path.iterdir()):
            if not marker.is_file():
                raise UnineuronsError(
                    f"output folder {path} is not empty and was not made by unineurons; "
                    "choose an empty or new --out"
                )
            found = read_json(marker, "marker").get("kind")
            if found != kind:
                raise UnineuronsError(
                    f"output folder {path} holds a unineurons {found!r}, not a {kind!r}; "
                    "choose another --out"
                )
            if not exist_ok:
                raise UnineuronsError(f"output folder {path} already holds a {kind}")
    if not existed:
        # the topmost folder this call makes is what a failed command removes again
        top = path.absolute()
        while not top.parent.exists():
            top = top.parent
        path.mkdir(parents=True, exist_ok=True)
        _CREATED.append((top, kind))
    from . import lock

    if lock.hold_on_open:  # a CLI command: one at a time per folder; sweeps stale temp files
        lock.acquire(path, f"output folder ({kind})")
    if not marker.is_file():
        from . import __version__

        write_json(marker, {"kind": kind, "version": __version__})
    return path


#: folders :func:`prepare_out_dir` created in this process (oldest first), with their kind
_CREATED: list[tuple[Path, str]] = []

#: Kinds whose finished parts a rerun reuses (a pipeline's stages, a zoo's seeds and
#: checkpoints): a failure later on keeps them rather than throw away hours of training.
KEEP_ON_FAILURE = ("pipeline", "zoo")


def created_outputs() -> list[Path]:
    """The output folders made by this process so far (the CLI removes them on failure)."""
    return [p for p, _ in _CREATED]


def remove_created_outputs(since: int = 0) -> list[Path]:
    """Remove the folders :func:`prepare_out_dir` made (from the ``since``-th on), newest
    first, with everything in them: what a failed command made is not left behind (except
    the kinds in :data:`KEEP_ON_FAILURE`, whose finished parts a rerun resumes from)."""
    gone = []
    while len(_CREATED) > since:
        p, kind = _CREATED.pop()
        holds_work = kind in KEEP_ON_FAILURE and p.is_dir() and any(
            q.is_dir() and not q.name.startswith(".") for q in p.iterdir())  # stages, seeds
        if not holds_work and p.exists():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone
