"""--split-half: two disjoint halves of the contexts in the same pass, against separate runs
and direct computations; the halves' accumulators merge into the whole exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import _fold, _PassState, run_correlate, segments
from unineurons.correlate.plan import ModelShape, Unit, plan_units
from unineurons.correlate.splithalf import jaccard
from unineurons.models.load import load_model
from unineurons.stream import activation_stream
from unineurons.tokens import TokenStore

N_TOK = 2048  # 32 contexts of 64: halves of 16 contexts


@given(c0=st.integers(0, 40), length=st.integers(0, 40), n_ctx=st.integers(1, 80),
       halves=st.sampled_from([1, 2]))
def test_segments_cover_the_range_and_never_cross_the_split(c0, length, n_ctx, halves):
    c1 = min(c0 + length, n_ctx)
    segs = segments(c0, c1, n_ctx, halves)
    covered = [c for s, e, _ in segs for c in range(s, e)]
    assert covered == list(range(c0, c1))
    for s, e, h in segs:
        assert s < e
        assert h == (0 if halves == 1 or e <= n_ctx // 2 else 1)
        assert halves == 1 or e <= n_ctx // 2 or s >= n_ctx // 2


def test_jaccard():
    a = np.array([1, 1, 0, 0], bool)
    assert jaccard(a, np.array([1, 0, 1, 0], bool)) == pytest.approx(1 / 3)
    assert np.isnan(jaccard(~a & a, ~a & a))


def test_half_states_merge_like_one_stream():
    """Shards of a split pass (each holding both halves' accumulators) merge into the state
    of one stream: the Ray driver's path (``merge_from``)."""
    shapes = [ModelShape(2, 3), ModelShape(2, 4)]
    units = [Unit(0, 1, 0, 2, "pair")]
    g = torch.Generator().manual_seed(0)
    batches = [([torch.randn(n, 6, generator=g) + 5, torch.randn(n, 8, generator=g) - 3], h)
               for n, h in ((7, 0), (5, 0), (9, 1), (4, 1))]
    one = _PassState(units, shapes, "cpu", torch.float64, None, halves=2)
    for acts, h in batches:
        _fold(acts, [0, 1], one, shapes, torch.float64, h)
    shards = [_PassState(units, shapes, "cpu", torch.float64, None, halves=2) for _ in range(2)]
    for i, (acts, h) in enumerate(batches):
        _fold(acts, [0, 1], shards[i % 2], shapes, torch.float64, h)
    merged = _PassState(units, shapes, "cpu", torch.float64, None, halves=2)
    for s in shards:
        merged.merge_from(s.state_dict().__getitem__)
    want, got = one.state_dict(), merged.state_dict()
    assert set(want) == set(got) and any(".h1." in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-10)
    # each half holds only its own rows
    assert float(one.co["pair.0.1.0.2"].n) == 12 and float(one.co["pair.0.1.0.2.h1"].n) == 13


def test_planner_counts_the_second_half():
    shapes = [ModelShape(2, 64), ModelShape(2, 64)]
    one = plan_units(shapes, "reference", 10**10, 0)
    two = plan_units(shapes, "reference", 10**10, 0, halves=2)
    # the pair block (2 layers x 64 rows x 128 columns, float64) twice; the ceiling once
    assert sum(two.pass_bytes) - sum(one.pass_bytes) == 2 * 64 * 128 * 8
    # the layer covariances: each half's and the merged ones
    assert two.persistent_bytes - one.persistent_bytes == 2 * sum(2 * 64 * 64 * 8 for _ in shapes)


def _max_corr_direct(paths, store_path, c0, c1):
    """Max over the partner's neurons of each reference neuron's correlation, contexts [c0, c1)."""
    store = TokenStore.open(store_path)
    models = [load_model(str(p)) for p in paths]
    out = [[], []]
    for b in activation_stream(models, store.contexts(N_TOK)[:c1], store.manifest["tokenizer"],
                               batch_size=4, start=c0):
        for i, a in enumerate(b.acts):
            out[i].append(a.double().numpy())
    x, y = (np.concatenate(o) for o in out)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1]:]
    return np.nanmax(np.where(np.isfinite(rho), rho, -np.inf), axis=1)


def test_split_half_matches_separate_runs(tiny_store, make_gpt2, tmp_path):
    paths = [make_gpt2(tmp_path / f"m{i}", i) for i in range(2)]
    base = dict(models=[str(p) for p in paths], tokens=str(tiny_store), batch_size=3,
                null_rotations=8, checkpoint_tokens=10**9)
    split = run_correlate(CorrelateConfig(**base, n_tokens=N_TOK, split_half=True), tmp_path / "s")
    whole = run_correlate(CorrelateConfig(**base, n_tokens=N_TOK), tmp_path / "w")
    # all contexts: the halves merged are the whole, to float32 rounding (other fold edges);
    # a p-value may move by a null draw or two (of 8 x 64 per layer) with it
    for col in ("max_corr", "baseline_corr", "excess_corr"):
        np.testing.assert_allclose(split.neurons[col], whole.neurons[col], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.neurons["p_value"], whole.neurons["p_value"], atol=3 / 513)
    # layer similarity and one-to-one matching are of all contexts too (not of half 0)
    sim_s, sim_w = split.run.read_table("layer_similarity"), whole.run.read_table("layer_similarity")
    assert len(sim_w) and (sim_w["cka"] <= 1 + 1e-9).all() and (sim_s["cka"] <= 1 + 1e-9).all()
    for col in ("cka", "cka_debiased", "ridge_r2_in_sample", "neuron_r2", "rotated_r2"):
        np.testing.assert_allclose(sim_s[col], sim_w[col], rtol=1e-4, atol=1e-6, err_msg=col)
    m_s, m_w = split.run.read_table("matches"), whole.run.read_table("matches")
    np.testing.assert_allclose(m_s["assigned_corr"], m_w["assigned_corr"], rtol=1e-4, atol=1e-6)
    # half 0 is the run over the first 16 contexts
    first = run_correlate(CorrelateConfig(**base, n_tokens=N_TOK // 2), tmp_path / "f").neurons
    table = split.run.read_table("split_half")
    assert list(table.columns[:3]) == ["model", "layer", "neurons"]
    assert {"jaccard", "jaccard_calibrated", "excess_corr_r", "max_corr_r",
            "universal_calibrated_h0"} <= set(table.columns)
    assert len(table) == 2 and (table["neurons"] == 64).all()
    second = _max_corr_direct(paths, tiny_store, 16, 32)
    np.testing.assert_allclose(_max_corr_direct(paths, tiny_store, 0, 16), first["max_corr"],
                               rtol=1e-6, atol=1e-9)
    for layer in (0, 1):
        sub = first[first.layer == layer]
        x, y = sub["max_corr"].to_numpy(), second[layer * 64:(layer + 1) * 64]
        ok = np.isfinite(x) & np.isfinite(y)
        r = np.corrcoef(x[ok], y[ok])[0, 1]
        assert table.loc[table.layer == layer, "max_corr_r"].item() == pytest.approx(r, abs=1e-6)
        assert table.loc[table.layer == layer, "universal_h0"].item() == int(sub["is_universal"].sum())
        assert table.loc[table.layer == layer, "universal_calibrated_h0"].item() == \
            int(sub["is_universal_calibrated"].sum())
    assert (table["kept_tokens_h0"] > 0).all() and (table["kept_tokens_h1"] > 0).all()
    assert isinstance(table, pd.DataFrame)


def test_ray_worker_shards_crossing_the_split_merge_to_each_half(tiny_store, make_gpt2, tmp_path):
    """The Ray worker's code (in-process, no Ray) cuts a shard at the split: merged shards give
    numpy's covariances of each half."""
    import dataclasses

    from safetensors.torch import load

    from unineurons.correlate.distributed import TASK, correlate_job
    from unineurons.correlate.engine import plan_for
    from unineurons.sharding import ShardWorker

    paths = [str(make_gpt2(tmp_path / f"m{i}", i)) for i in range(2)]
    cfg = CorrelateConfig(models=paths, tokens=str(tiny_store), n_tokens=N_TOK, batch_size=2,
                          accumulate_tokens=128, dtype="float64", backend="ray", split_half=True)
    models = [load_model(p) for p in paths]
    shapes = [ModelShape(m.adapter.n_layers, m.adapter.d_mlp) for m in models]
    units = plan_for(cfg, shapes, 64).passes[0]
    job = correlate_job(cfg, models, shapes, 128, "hash")
    extra = {"units": [dataclasses.asdict(u) for u in units], "fresh_layercov": True}
    merged = _PassState(units, shapes, "cpu", torch.float64, None, halves=2)
    w = ShardWorker()
    for c0, c1 in ((0, 5), (5, 20), (20, 32)):  # the middle shard crosses the split at 16
        merged.merge_from(load(w.run(TASK, job, "pass0", c0, c1, extra)).__getitem__)
    store = TokenStore.open(tiny_store)
    pair = next(u for u in units if u.kind == "pair")
    for half, (c0, c1) in enumerate(((0, 16), (16, 32))):
        acts = [[], []]
        for b in activation_stream(models, store.contexts(N_TOK)[:c1], store.manifest["tokenizer"],
                                   batch_size=7, start=c0):
            for i in range(2):
                acts[i].append(b.acts[i].double().numpy())
        x, y = (np.concatenate(a) for a in acts)
        co = merged.co[pair.key() + (".h1" if half else "")].result()
        assert int(co["n"]) == x.shape[0]
        np.testing.assert_allclose(co["cov"].numpy(), np.cov(x.T, y.T, bias=True)[:128, 128:],
                                   atol=1e-10)
        lc = merged.layercov[half * 2 + 1].result()["cov"].numpy()
        np.testing.assert_allclose(lc[1], np.cov(y[:, 64:].T, bias=True), atol=1e-10)
