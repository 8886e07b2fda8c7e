"""benchmarks/zoo_speed.py runs end to end (micro preset, 2 steps) and reports every contender."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_speed.py"


def test_zoo_speed_benchmark_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_zoo_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        rows = mod.main(["--preset", "micro", "--steps", "2", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    names = [r[0] for r in rows]
    assert len(names) == 5 and "bare loop, AdamW foreach=False" in names
    assert all(sec > 0 and math.isfinite(ratio) for _, sec, ratio in rows)
    assert dict((n, r) for n, _, r in rows)["bare loop, AdamW foreach=False"] == 1.0
    assert "| zoo train (evals, checkpoints) |" in capsys.readouterr().out
