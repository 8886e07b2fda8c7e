"""One command at a time per output folder (issue 17, kind 6): the lock file, its refusal with
the holder's pid and start time, and the take-over of a stale lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from unineurons import lock
from unineurons.cli import main
from unineurons.rundir import RunDir


def _lock_of(pid: int, **extra) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(),
                       "proc_start": lock._proc_start(pid), "started": "2026-01-02 03:04:05 UTC",
                       **extra})


@pytest.fixture
def sleeper():
    """A live process that is not us."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return int(e.value.code or 0), capsys.readouterr().err


def test_second_command_is_refused_with_the_holders_pid_and_start(tmp_path, sleeper, capsys):
    run = RunDir.create(tmp_path / "run").path  # the API does not lock
    (run / lock.LOCK_NAME).write_text(_lock_of(sleeper.pid))
    before = sorted(p.name for p in run.iterdir())
    for args in (["correlate", "-m", "a", "-m", "b", "--tokens", tmp_path, "--out", run],
                 ["ablate", run], ["analyze", run], ["report", run]):
        rc, err = _cli(capsys, *args)
        assert rc == 1 and "Traceback" not in err
        assert f"pid {sleeper.pid}" in err and "started 2026-01-02 03:04:05" in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before
    assert json.loads((run / lock.LOCK_NAME).read_text())["pid"] == sleeper.pid  # untouched


def test_a_stale_lock_is_taken_over_and_released(tmp_path, dead_pid, capsys):
    run = RunDir.create(tmp_path / "run").path
    (run / lock.LOCK_NAME).write_text(_lock_of(dead_pid, proc_start=None))
    rc, err = _cli(capsys, "analyze", run)  # takes the lock, then fails: the run has no models
    assert rc == 1 and "lists no models" in err
    assert not (run / lock.LOCK_NAME).exists()  # released at the end of the command


def test_a_reused_pid_is_not_a_holder(tmp_path, sleeper):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / lock.LOCK_NAME).write_text(_lock_of(sleeper.pid, proc_start="1"))  # another start
    try:
        lock.acquire(folder)
        assert json.loads((folder / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release_all()
    assert not (folder / lock.LOCK_NAME).exists()


def test_reentrant_within_a_process_and_swept_temp_files(tmp_path):
    folder = tmp_path / "f"
    (folder / "pairs").mkdir(parents=True)
    left = [folder / ".neurons.parquet.abc.tmp", folder / "pairs" / ".x__y.safetensors.z.tmp"]
    for p in left:
        p.write_text("half written")
    keep = folder / "pairs" / "x__y.safetensors"
    keep.write_text("whole")
    try:
        first = lock.acquire(folder)
        assert lock.acquire(folder) == first and lock.held(folder)
        assert not any(p.exists() for p in left) and keep.exists()
    finally:
        lock.release_all()
    assert not lock.held(folder)


def test_unreadable_lock_file_is_stale(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / lock.LOCK_NAME).write_bytes(b"\x00\xff not json")
    try:
        lock.acquire(folder)
    finally:
        lock.release_all()


def test_two_processes_one_folder(tmp_path):
    """A real second process, holding the folder through the CLI's own code path."""
    folder = tmp_path / "f"
    folder.mkdir()
    code = ("import sys, time; from unineurons import lock; lock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ})
    try:
        assert p.stdout.readline().strip() == "held"
        from unineurons.errors import UnineuronsError

        with pytest.raises(UnineuronsError, match=f"pid {p.pid}"):
            lock.acquire(folder)
    finally:
        p.kill()
        p.wait()
    try:
        lock.acquire(folder)  # the holder died: stale, taken over
    finally:
        lock.release_all()
