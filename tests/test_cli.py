"""The command line: every subcommand listed, errors as one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unineurons.cli import main

COMMANDS = ["tokenizer", "tokens", "zoo", "correlate", "plan", "analyze", "ablate", "intervene", "dynamics", "report",
            "run", "demo"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from unineurons.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    r = _cli("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert f" {c} " in r.stdout, c


@pytest.mark.parametrize("cmd", [["correlate"], ["tokens", "build"], ["zoo", "train"], ["analyze"],
                                 ["ablate"], ["intervene"], ["run"], ["demo"]])
def test_each_subcommand_explains_its_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--help" in out and "Usage" in out


def test_user_errors_are_one_line_without_traceback(tmp_path):
    r = _cli("correlate", "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"),
             "--tokens", str(tmp_path / "t"), "--out", str(tmp_path / "run"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    r = _cli("run", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_exit_2():
    r = _cli("tokens", "build", "--source", "stdlib")
    assert r.returncode == 2 and "Missing option" in r.stderr and "Traceback" not in r.stderr
