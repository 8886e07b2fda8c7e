"""benchmarks/gpu.py runs end to end on CPU with --quick (the same code as the GPU run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_quick_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    rows = _load().main(["--device", "cpu", "--quick", "--n-tokens", "2048", "--json", str(out)])
    assert json.loads(out.read_text()) == [list(r) for r in rows]
    names = [r[0] for r in rows]
    assert not [n for n in names if "FAILED" in n], rows
    for section in ("(a) accumulate fp32", "(a) accumulate tf32", "(a) accumulate bf16",
                    "(b) forward passes alone", "(b) correlate", "(d) peak memory",
                    "(c) anchor, 1 pair", "(c) anchor rho only", "(c) anchor with its rotated",
                    "(e) zoo train (evals, checkpoints)", "(e) zoo train, steps only"):
        assert any(n.startswith(section) for n in names), section
    for r in rows:
        if r[0].startswith("(a)"):  # ratios are finite positive numbers
            assert 0 < float(r[3]) < math.inf


def test_random_store_and_models_agree(tmp_path):
    mod = _load()
    models = mod.build_models(tmp_path, quick=True, device="cpu", n_models=2)
    store = mod.random_store(tmp_path / "tok", models[0].adapter.vocab_size, 64, 300)
    assert store.n_contexts == 5 and store.tokens.max() < models[0].adapter.vocab_size
    assert (store.tokens[:, 0] == store.manifest["tokenizer"]["bos_id"]).all()
    # different seeds give different weights
    w0, w1 = (next(m.model.parameters()) for m in models)
    assert not w0.equal(w1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_benchmark_quick_on_cuda(tmp_path):
    """The whole CUDA path (correlate on cuda included) on tiny shapes."""
    rows = _load().main(["--device", "cuda", "--quick", "--n-tokens", "2048"])
    assert not [r for r in rows if "FAILED" in r[0]], rows
