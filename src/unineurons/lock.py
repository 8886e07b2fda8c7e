"""One command at a time per output folder: a lock file holding the owner's pid and start time.

A command that writes a run directory (or a zoo, or a pipeline folder) takes
``FOLDER/.unineurons.lock`` before it writes anything, and holds it until it ends. A second
command on the same folder is refused with the holder's pid and start time; a lock left by a
process that no longer exists (killed, crashed, rebooted machine) is stale and taken over.
Taking a lock also sweeps the temporary files a killed writer left behind
(``.NAME.*.tmp`` of :func:`unineurons.io.atomic_path`): nobody else can be writing them.

The lock is advisory (it protects unineurons commands from each other, nothing else) and
re-entrant within a process: opening the same folder twice in one command is fine. Only
CLI commands lock (:data:`hold_on_open`); the importable API does not.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from .errors import UnineuronsError

__all__ = ["LOCK_NAME", "acquire", "release_all", "held", "sweep_temp_files", "hold_on_open",
           "sweep_stale_staging"]

LOCK_NAME = ".unineurons.lock"

#: folder (resolved) -> lock file path, for the locks this process holds
_HELD: dict[Path, Path] = {}

#: Set by the CLI for the duration of a command: only commands lock (a program importing
#: unineurons, a notebook, is not held to one command per folder, nor blocks the CLI).
hold_on_open = False


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; Linux), to tell a live
    holder from an unrelated process that got the same pid later; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(info: dict) -> bool:
    """Whether the process that wrote the lock ``info`` still runs (on another host: assume so)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    want, now = info.get("proc_start"), _proc_start(pid)
    return not (want is not None and now is not None and want != now)


def _read(lock: Path) -> dict | None:
    try:
        info = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: no live holder can be named
    return info if isinstance(info, dict) else {}


def acquire(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Lock ``folder`` (which exists) for this process until :func:`release_all` or exit.

    Raises :class:`UnineuronsError` naming the holder's pid and start time when another live
    process holds it. Returns the lock file's path.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        return _HELD[key]
    lock = folder / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started_unix": time.time()}
    tmp = folder / f".{LOCK_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(mine))
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)  # atomic: fails when a lock exists
                break
            except FileExistsError:
                info = _read(lock)
                if info is None:
                    continue  # released meanwhile: try again
                if info.get("pid") == os.getpid() and info.get("host") == mine["host"]:
                    break  # ours (e.g. carried over by a rename)
                if _alive(info) and info:
                    raise UnineuronsError(
                        f"{what} {folder} is in use by another unineurons command (pid "
                        f"{info.get('pid')} on {info.get('host')}, started {info.get('started')}); "
                        f"wait for it to finish, or, if no such command runs, delete {lock}"
                    ) from None
                os.replace(tmp, lock)  # stale: take it over
                tmp.write_text("")  # recreated only so that the finally below has a file
                if (_read(lock) or {}).get("pid") == os.getpid():
                    break
        else:
            raise UnineuronsError(f"{what} {folder}: cannot take its lock {lock}; retry")
    finally:
        tmp.unlink(missing_ok=True)
    _HELD[key] = lock
    sweep_temp_files(folder)
    return lock


def held(folder: str | os.PathLike) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return Path(folder).resolve() in _HELD


def release_all() -> None:
    """Remove every lock this process holds (the CLI calls it when a command ends)."""
    for key, lock in list(_HELD.items()):
        if not lock.exists() and key.name.startswith(".") and key.name.endswith(".tmp"):
            # a staging folder ``.OUT.XXXX.tmp`` renamed onto OUT: its lock went with it
            lock = key.parent / key.name[1:-4].rsplit(".", 1)[0] / LOCK_NAME
        info = _read(lock)
        if info is not None and info.get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        del _HELD[key]


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.*.tmp`` files under ``folder`` that a killed writer left (see
    :func:`unineurons.io.atomic_path`); called with the folder's lock held, so no live
    unineurons command is writing them. Returns what was removed."""
    gone = []
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file() and not p.name.startswith(f".{LOCK_NAME}."):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def sweep_stale_staging(out: str | os.PathLike) -> list[Path]:
    """Remove the hidden staging folders ``.OUT.*.tmp`` / ``.OUT.*.old`` next to ``out`` that
    a killed (or crashed: a full disk under a memory map is a bus error) build left behind:
    those whose lock names a process that no longer runs. Returns what was removed."""
    import shutil

    out = Path(out)
    gone = []
    if not out.parent.is_dir():
        return gone
    for p in out.parent.glob(f".{out.name}.*"):
        if not p.is_dir() or not p.name.endswith((".tmp", ".old")):
            continue
        info = _read(p / LOCK_NAME)
        if info is not None and (not info or not _alive(info)):  # unlocked: not a command's
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


atexit.register(release_all)
