"""The memory planner and `unineurons plan` on real model configs (no weights)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from unineurons.cli import main
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import _stream
from unineurons.correlate.estimate import estimate, shape_from_config
from unineurons.correlate.plan import (
    F64,
    FWD_SCORES,
    SUM_ROWS,
    WORK_TILE,
    ModelShape,
    forward_workspace,
    pair_list,
    parse_bytes,
    plan_units,
    stream_bytes,
    work_bytes,
)
from unineurons.errors import UnineuronsError
from unineurons.models.adapters import get_adapter
from unineurons.stream import _run_one


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
    assert (s.d_model, s.n_heads, s.vocab_size) == (768, 12, 50257)
    assert 120e6 < s.n_params < 130e6  # GPT-2 small: 124M
    m = shape_from_config(configs["medium"][0])
    assert (m.n_layers, m.d_mlp, m.d_model, m.n_heads) == (24, 4096, 1024, 16) and 340e6 < m.n_params < 370e6
    p = shape_from_config(configs["pythia"][0])
    assert (p.n_layers, p.d_mlp, p.d_model, p.n_heads, p.vocab_size) == (12, 3072, 768, 12, 50304)
    assert 150e6 < p.n_params < 175e6


def _fits(plan, budget: str) -> bool:
    """Every pass's co-moments and working copies fit next to the persistent and stream memory."""
    room = parse_bytes(budget) - plan.persistent_bytes - plan.stream_bytes
    return all(b + w <= room for b, w in zip(plan.pass_bytes, plan.work_bytes, strict=True))


def test_five_gpt2_small_seeds_fit_one_80gb_gpu_in_one_pass(configs):
    est = estimate(_cfg(configs["small"], "80GB", device="cuda", dtype="bfloat16"), 100_000_000, 512,
                   rate=4e14)
    plan = est.plan
    assert len(plan.passes) == 1
    # 4 pairs + the ceiling: five 36,864 x 36,864 float64 matrices (10.9 GB each), accumulated
    # as blocks of a few layers: a whole pair's fold would need another 10.9 GB of cross product
    assert plan.pass_bytes[0] == 5 * 36864 * 36864 * F64
    assert all(u.l1 - u.l0 < 12 for u in plan.passes[0])
    assert plan.work_bytes == [max(work_bytes(u, est.shapes) for u in plan.passes[0])]
    assert plan.work_bytes[0] == max(u.nbytes(est.shapes) for u in plan.passes[0])  # > 3 tiles
    assert plan.peak_bytes == (plan.persistent_bytes + plan.stream_bytes + plan.pass_bytes[0]
                               + plan.work_bytes[0])
    assert plan.peak_bytes <= parse_bytes("80GB") and _fits(plan, "80GB")


def test_five_gpt2_small_seeds_fit_a_24gb_gpu_in_several_passes(configs):
    est = estimate(_cfg(configs["small"], "24GB", device="cuda", dtype="bfloat16"), 100_000_000, 512,
                   rate=1e11)
    assert len(est.plan.passes) > 1
    assert est.plan.peak_bytes <= parse_bytes("24GB") and _fits(est.plan, "24GB")
    # the forward passes repeat once per pass; the stream runs no LM head (no unembedding)
    s = est.shapes[0]
    assert est.flops["forward"] == pytest.approx(
        len(est.plan.passes) * 5 * 2 * (s.n_params - s.d_model * s.vocab_size))


def test_24gb_on_cpu_takes_more_passes_with_bigger_batches(configs):
    # on CPU the baseline's rotations (4.5 GB for five models) share the budget with the
    # batch buffers: halving the batch leaves room for more blocks per pass
    b8 = estimate(_cfg(configs["small"], "24GB"), 100_000_000, 512, rate=1e11).plan
    b4 = estimate(_cfg(configs["small"], "24GB", batch_size=4), 100_000_000, 512, rate=1e11).plan
    assert 1 < len(b4.passes) < len(b8.passes)
    assert _fits(b8, "24GB") and _fits(b4, "24GB") and b4.stream_bytes < b8.stream_bytes
    with pytest.raises(UnineuronsError, match="lower --batch-size"):
        estimate(_cfg(configs["small"], "16GB"), 100_000_000, 512, rate=1e11)


def test_plan_covers_every_block_exactly_once():
    shapes = [ModelShape(3, 100, 0), ModelShape(3, 100, 0), ModelShape(3, 100, 0)]
    room = 2_000_000  # one layer block is 240 KB, and so is its fold temporary
    for mode in ("reference", "all"):
        plan = plan_units(shapes, mode, room + 3 * 3 * 100 * 100 * 8 + 3 * 4 * 300 * 8, 0)
        rows = {}
        for p, load, work in zip(plan.passes, plan.pass_bytes, plan.work_bytes, strict=True):
            assert load == sum(u.nbytes(shapes) for u in p)
            assert work == max(work_bytes(u, shapes) for u in p)
            assert load + work <= room
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


def test_blocks_are_split_into_layers_only_when_that_saves_passes():
    shapes = [ModelShape(4, 100, 0), ModelShape(4, 100, 0)]
    persistent = 2 * (4 * 100 * 100 * 8 + 4 * 400 * 8)
    layer = 100 * 400 * 8  # one layer of model 0 against all of model 1: 320 KB
    # a pair and the ceiling, whole: 2 x 1.28 MB plus one block's fold temporary (1.28 MB)
    whole = plan_units(shapes, "reference", persistent + 8 * layer + 4 * layer, 0)
    assert len(whole.passes) == 1 and {u.l1 - u.l0 for u in whole.passes[0]} == {4}
    # whole blocks do not fit, one-layer blocks do (2.56 MB + the layer similarity's working
    # copies of one layer pair, more than a block here) in one pass
    from unineurons.correlate.extras import extras_work_bytes
    from unineurons.correlate.plan import Unit

    extra = extras_work_bytes(Unit(0, 1, 0, 1, "pair"), shapes)
    assert extra > layer
    split = plan_units(shapes, "reference", persistent + 8 * layer + extra + 1000, 0)
    assert len(split.passes) == 1 and {u.l1 - u.l0 for u in split.passes[0]} == {1}
    assert split.pass_bytes == [8 * layer] and split.work_bytes == [extra]
    assert split.peak_bytes == persistent + 8 * layer + extra
    # a tile (one layer by one layer, 80 KB) needs WORK_TILE copies; here a block is 4 tiles
    ceil = next(u for u in split.passes[0] if u.kind == "ceiling")
    assert work_bytes(ceil, shapes) == max(layer, WORK_TILE * 100 * 100 * F64)


def test_refuses_with_numbers_when_one_layer_cannot_fit():
    # the layer similarity of one 1000 x 300 layer pair (correlate/similarity.py) outweighs
    # the block's WORK_TILE tiles
    with pytest.raises(UnineuronsError, match=r"too small: one layer .* needs 2\.4 MB and 47\.2 MB"):
        plan_units([ModelShape(1, 1000, 0), ModelShape(1, 300, 0)], "reference", 3_000_000, 0)


def _peak_live_bytes(fn) -> int:
    """Peak bytes of CPU tensors alive while ``fn`` runs, above those alive before: the torch
    profiler's per-op allocations (net of frees inside the op) and frees outside any op, in time
    order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


# a vocabulary large enough that an LM head's [4, 64, 4096] logits (4.2 MB) would break the bound
_FAMILIES = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, vocab_size=4096, n_positions=64),
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      intermediate_size=256, vocab_size=4096, max_position_embeddings=64),
    "llama": lambda: LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=4, intermediate_size=256, vocab_size=4096,
                                 max_position_embeddings=64),
}


def test_forward_workspace_is_one_block_of_float32_intermediates():
    s = ModelShape(2, 64, 0, d_model=32, n_heads=2, vocab_size=100)
    # 3 contexts of 16 tokens: 48 rows of 12 x 32 hidden + 4 x 64 MLP floats, and 2 x [3, 2, 16, 16]
    # attention scores; the vocabulary does not count (the stream runs no LM head)
    assert forward_workspace(s, 3, 16) == 4 * (48 * (12 * 32 + 4 * 64) + 2 * 3 * 2 * 16 * 16) == 135_168
    # unknown residual width and heads: only the MLP term is left
    assert forward_workspace(ModelShape(2, 64), 3, 16) == 4 * 48 * 4 * 64


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_forward_phase_bounds_a_real_forward_pass(family):
    """One model's forward phase as the plan counts it (workspace, full-batch capture, kept
    rows) bounds the tensor memory the stream's forward really holds, and not loosely."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_FAMILIES[family]()).eval()
    ad = get_adapter(model)
    m = SimpleNamespace(model=model, adapter=ad, name=family)
    shape = ModelShape(ad.n_layers, ad.d_mlp, d_model=ad.d_model,
                       n_heads=model.config.num_attention_heads, vocab_size=ad.vocab_size)
    B, T = 4, 64
    tokens = torch.randint(0, 4096, (B, T))
    kept = torch.arange(B * T)  # every position
    _run_one(m, tokens, kept, False)  # warm-up: lazy buffers (rotary tables, masks)
    measured = _peak_live_bytes(lambda: _run_one(m, tokens, kept, False))
    counted = forward_workspace(shape, B, T) + 2 * B * T * shape.n * 4
    assert measured <= counted <= 3 * measured


def test_stream_bytes_phases():
    s = ModelShape(2, 64, 1000, d_model=32, n_heads=2)
    n = s.n  # 128 columns
    # the fold dominates: 256 accumulated rows + 2 contexts of 16; rows and their float32
    # shifted copies, 256 rows of float64 column sums; plus the weights
    rows = 256 + 32
    assert stream_bytes([s], 256, 2, 16) == 1000 * 4 + rows * n * 8 + SUM_ROWS * n * 8
    # bfloat16 products: 6 bytes a row entry, and a float32 difference of one model before its
    # bfloat16 copy; float64: 12 bytes, and the float64 copy of one model's rows
    assert stream_bytes([s], 256, 2, 16, compute_bytes=2) == max(
        1000 * 4 + rows * n * 8, 1000 * 4 + rows * n * 6 + rows * n * 4 + SUM_ROWS * n * 8)
    assert stream_bytes([s], 256, 2, 16, compute_bytes=8) == (
        1000 * 4 + rows * n * 12 + rows * n * 8 + SUM_ROWS * n * 8)
    # many models: the concatenation (both float32 copies of everyone's rows) is the larger
    many = [ModelShape(2, 64)] * 8
    assert stream_bytes(many, 256, 2, 16, compute_bytes=2) == max(
        8 * rows * n * 8, 8 * rows * n * 6 + rows * n * 4 + SUM_ROWS * n * 8) == 8 * rows * n * 8
    # the rotations of a CPU run: float64 [d_mlp, d_mlp] per layer
    assert (stream_bytes([s], 256, 2, 16, rotations=True) - stream_bytes([s], 256, 2, 16)
            == 2 * 64 * 64 * 8)
    # the forward pass dominates (narrow MLP, wide attention): pending rows, capture, workspace
    wide = ModelShape(1, 8, 0, d_model=64, n_heads=16)
    assert stream_bytes([wide], 0, 2, 128) == 256 * 8 * 4 + 256 * 8 * 4 + forward_workspace(wide, 2, 128)


def test_stream_bytes_grows_with_batch_and_context():
    gpt2 = [ModelShape(12, 3072, 124_439_808, d_model=768, n_heads=12, vocab_size=50257)] * 5
    n = 36864

    def f(acc: int, batch: int, ctx: int) -> int:
        return stream_bytes(gpt2, acc, batch, ctx)

    # each more context of 512 tokens: 5 models' rows (4 B) and their concatenated copy (4 B)
    per_context = 512 * n * 5 * 8
    assert [f(4096, b + 1, 512) - f(4096, b, 512) for b in range(1, 16)] == [per_context] * 15
    # more accumulated rows: the same
    assert f(8192, 8, 512) - f(4096, 8, 512) == 4096 * n * 5 * 8
    # tokens, not contexts, count while the fold dominates: 8 x 512 = 16 x 256
    assert f(4096, 8, 512) == f(4096, 16, 256)
    # when the forward pass dominates, the attention scores grow with ctx squared
    wide = [ModelShape(1, 8, 0, d_model=64, n_heads=16)]
    g = [stream_bytes(wide, 0, 2, t) for t in range(60, 70)]
    assert all(b > a for a, b in zip(g, g[1:], strict=False))
    second = {g[i + 1] - 2 * g[i] + g[i - 1] for i in range(1, len(g) - 1)}
    assert second == {4 * FWD_SCORES * 2 * 16 * 2}


def test_engine_counts_float32_weights_and_host_rotations():
    shapes = [ModelShape(2, 64, 10_000, d_model=32, n_heads=2, vocab_size=100)] * 2
    models = ["a", "b"]
    cuda = _cfg(models, "1GB", device="cuda", dtype="bfloat16", accumulate_tokens=256)
    cpu = _cfg(models, "1GB", accumulate_tokens=256)
    # models load in float32 whatever --dtype is; --dtype sets the shifted copies' bytes
    assert _stream(cuda, shapes, 64, 256) == stream_bytes(shapes, 256, 8, 64, compute_bytes=2,
                                                          weight_bytes=4)
    assert _stream(cpu, shapes, 64, 256) == stream_bytes(shapes, 256, 8, 64, compute_bytes=4,
                                                         rotations=True)
    no_weights = [ModelShape(2, 64, 0, d_model=32, n_heads=2, vocab_size=100)] * 2
    assert _stream(cuda, shapes, 64, 256) - _stream(cuda, no_weights, 64, 256) == 2 * 10_000 * 4


def test_plan_cli(configs, capsys):
    args = ["plan", "--memory-budget", "80GB", "--device", "cuda", "--dtype", "bfloat16",
            "--flops-per-s", "4e14"]
    for m in configs["small"]:
        args += ["--model", m]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    out = capsys.readouterr().out
    # five blocks, as units of a few layers, in one pass
    assert re.search(r"\d+ in 1 pass\(es\)", out) and "36,864 neurons" in out
    assert "estimated time" in out and "temporaries of one block" in out
