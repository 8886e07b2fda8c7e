"""The memory planner and `unineurons plan` on real model configs (no weights)."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPTNeoXConfig

from unineurons.cli import main
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.estimate import estimate, shape_from_config
from unineurons.correlate.plan import F64, ModelShape, pair_list, parse_bytes, plan_units
from unineurons.errors import UnineuronsError


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for i in range(5):
        GPT2Config().save_pretrained(root / f"gpt2-small-{i}")  # the defaults are GPT-2 small
        out.setdefault("small", []).append(str(root / f"gpt2-small-{i}"))
    for i in range(2):
        GPT2Config(n_embd=1024, n_layer=24, n_head=16).save_pretrained(root / f"gpt2-medium-{i}")
        out.setdefault("medium", []).append(str(root / f"gpt2-medium-{i}"))
    GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  vocab_size=50304).save_pretrained(root / "pythia-160m")
    out["pythia"] = [str(root / "pythia-160m")]
    return out


def _cfg(models, budget, **kw):
    return CorrelateConfig(models=models, tokens="-", memory_budget=budget, **kw)


def test_shapes_from_configs(configs):
    s = shape_from_config(configs["small"][0])
    assert (s.n_layers, s.d_mlp, s.n) == (12, 3072, 36864)
    assert 120e6 < s.n_params < 130e6  # GPT-2 small: 124M
    m = shape_from_config(configs["medium"][0])
    assert (m.n_layers, m.d_mlp) == (24, 4096) and 340e6 < m.n_params < 370e6
    p = shape_from_config(configs["pythia"][0])
    assert (p.n_layers, p.d_mlp) == (12, 3072) and 150e6 < p.n_params < 175e6


def test_five_gpt2_small_seeds_fit_one_80gb_gpu_in_one_pass(configs):
    est = estimate(_cfg(configs["small"], "80GB", device="cuda", dtype="bfloat16"), 100_000_000, 512,
                   rate=4e14)
    assert len(est.plan.passes) == 1
    assert est.plan.peak_bytes <= parse_bytes("80GB")
    # 4 pairs + the ceiling: five 36,864 x 36,864 float64 matrices (10.9 GB each)
    assert est.plan.pass_bytes[0] == 5 * 36864 * 36864 * F64


def test_five_gpt2_small_seeds_fit_24gb_in_several_passes(configs):
    est = estimate(_cfg(configs["small"], "24GB"), 100_000_000, 512, rate=1e11)
    assert len(est.plan.passes) > 1
    assert est.plan.peak_bytes <= parse_bytes("24GB")
    assert all(b <= parse_bytes("24GB") for b in est.plan.pass_bytes)
    # the forward passes repeat once per pass
    assert est.flops["forward"] == pytest.approx(len(est.plan.passes) * 5 * 2 * est.shapes[0].n_params)


def test_plan_covers_every_block_exactly_once():
    shapes = [ModelShape(3, 100, 0), ModelShape(3, 100, 0), ModelShape(3, 100, 0)]
    for mode in ("reference", "all"):
        plan = plan_units(shapes, mode, 400_000 + 3 * 3 * 100 * 100 * 8 + 3 * 4 * 300 * 8, 0)
        rows = {}
        for p in plan.passes:
            assert sum(u.nbytes(shapes) for u in p) <= 400_000
            for u in p:
                for layer in range(u.l0, u.l1):
                    key = (u.kind, u.a, u.b, layer)
                    assert key not in rows
                    rows[key] = True
        pairs = {(a, b) for a, b, _ in pair_list(3, mode)}
        want = {("pair", a, b, layer) for a, b in pairs for layer in range(3)}
        sides = [0] if mode == "reference" else [0, 1, 2]
        want |= {("ceiling", a, a, layer) for a in sides for layer in range(3)}
        assert set(rows) == want


def test_refuses_with_numbers_when_one_layer_cannot_fit():
    with pytest.raises(UnineuronsError, match=r"too small: one layer .* needs 2\.4 MB"):
        plan_units([ModelShape(1, 1000, 0), ModelShape(1, 300, 0)], "reference", 3_000_000, 0)


def test_plan_cli(configs, capsys):
    args = ["plan", "--memory-budget", "80GB", "--device", "cuda", "--dtype", "bfloat16",
            "--flops-per-s", "4e14"]
    for m in configs["small"]:
        args += ["--model", m]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "5 in 1 pass(es)" in out and "36,864 neurons" in out and "estimated time" in out
