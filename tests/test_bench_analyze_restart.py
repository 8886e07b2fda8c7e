"""benchmarks/analyze_restart.py: its quick mode runs analyze both ways with equal outputs, and
its "before" switch really runs the blocks below the patched layer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unineurons.analyses import interventions
from unineurons.analyses.interventions import evaluate_patches, make_patch
from unineurons.models.adapters import get_adapter
from unineurons.models.load import LoadedModel, parse_model_spec
from unineurons.models.partial import record_block_inputs, restart_at

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "analyze_restart.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_analyze_restart", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_quick_prints_both_rows_and_equal_outputs(capsys):
    res = _load().main(["--quick"])
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"before", "after", "ratio"} <= set(rows), out
    assert res["diffs"] == [] and "outputs equal" in out, out
    assert {"neurons.parquet", "entropy.parquet", "top_contexts.parquet"} <= set(res["tables"])
    # the planted neurons are the entropy search's candidates: 10 + 10 random x 4 values
    for t in (res["before"], res["after"]):
        assert [p for _, _, p in t.confirmation] == [80]
        assert t.wall["token pass"] > 0 and t.wall["entropy confirmation"] > 0
        assert abs(t.cpu["analyze"] - sum(t.cpu[p] for p in
                                          ("token pass", "entropy confirmation", "rest"))) < 1e-9


def test_full_forwards_runs_the_lower_blocks():
    """Patches of the last layer: with the restart, block 0 runs once per batch (the clean
    forward); under full_forwards() once per forward, as before the restart; metrics equal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    mod = _load()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=97, max_position_embeddings=64)).eval()
    m = LoadedModel(spec=parse_model_spec("."), model=model, adapter=get_adapter(model),
                    tokenizer=None, weights_sha256="random")
    contexts = np.random.default_rng(0).integers(1, 97, size=(2, 16))
    special = {"bos_id": 0, "eos_id": 0, "pad_id": None}
    patches = [make_patch([(2, i)], [3.0]) for i in (1, 5, 7)]
    calls = []
    h = m.adapter.blocks[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, fast = evaluate_patches(m, contexts, special, patches, batch_size=2)
        n_fast = len(calls)
        calls.clear()
        with mod.full_forwards():
            _, slow = evaluate_patches(m, contexts, special, patches, batch_size=2)
        n_slow = len(calls)
    finally:
        h.remove()
    assert (n_fast, n_slow) == (1, 1 + len(patches))
    assert interventions.restart_at is restart_at  # restored
    assert interventions.record_block_inputs is record_block_inputs
    for a, b in zip(fast, slow, strict=True):
        assert a["loss"] == b["loss"] and a["entropy"] == b["entropy"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_on_cuda():
    """The device path: analyze on cuda both ways, outputs equal to the tolerance."""
    res = _load().main(["--quick", "--device", "cuda"])
    assert res["diffs"] == [] and [p for _, _, p in res["after"].confirmation] == [80]
