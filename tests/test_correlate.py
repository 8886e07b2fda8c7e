"""The correlate stage against direct references (numpy on captured activations)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unineurons.accumulators.comoments import CoMoments
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import plan_for, run_correlate
from unineurons.correlate.plan import ModelShape, parse_bytes
from unineurons.correlate.rotation import rotation_for
from unineurons.errors import UnineuronsError
from unineurons.io import load_tensors
from unineurons.models.load import load_model
from unineurons.rundir import pair_file_name
from unineurons.stream import MaskConfig, activation_stream
from unineurons.tokens import TokenStore

N_TOK = 2048  # 32 contexts of 64


@pytest.fixture(scope="session")
def seed_models(tmp_path_factory, make_gpt2) -> list[Path]:
    """Three random 2-layer GPT-2 models (d_mlp 64) and a byte-identical copy of the first."""
    root = tmp_path_factory.mktemp("seeds")
    paths = [make_gpt2(root / f"s{i}", i) for i in range(3)]
    shutil.copytree(paths[0], root / "s0_copy")
    return paths + [root / "s0_copy"]


def _captured(paths, store_path, n_tokens=N_TOK) -> list[np.ndarray]:
    """Every model's activations over the kept positions, captured directly: [n, L*d]."""
    store = TokenStore.open(store_path)
    models = [load_model(str(p)) for p in paths]
    out = [[] for _ in models]
    for b in activation_stream(models, store.contexts(n_tokens), store.manifest["tokenizer"],
                               batch_size=5):
        for i, a in enumerate(b.acts):
            out[i].append(a.double().numpy())
    return [np.concatenate(x) for x in out]


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = np.corrcoef(x.T, y.T)
    return c[: x.shape[1], x.shape[1]:]


def _cfg(paths, store, **kw) -> CorrelateConfig:
    base = dict(models=[str(p) for p in paths], tokens=str(store), n_tokens=N_TOK, batch_size=4,
                checkpoint_tokens=10**9)
    base.update(kw)
    return CorrelateConfig(**base)


# ---- the accumulator against numpy ----------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), seed=st.integers(0, 2**16),
       order=st.randoms())
def test_comoments_match_corrcoef_any_shard_order(sizes, seed, order):
    if sum(sizes) < 3:
        sizes = sizes + [5]
    g = np.random.default_rng(seed)
    n = sum(sizes)
    z = g.normal(size=(n, 2))
    x = np.concatenate([z, g.normal(size=(n, 2))], 1) * 3 + 1e3  # large means
    y = np.concatenate([z[:, :1] * -2 + 0.1 * g.normal(size=(n, 1)), g.normal(size=(n, 2))], 1) - 2e3
    edges = np.cumsum([0] + sizes)
    shards = [CoMoments(4, 3, compute_dtype=torch.float64).update(
        torch.from_numpy(x[a:b]), torch.from_numpy(y[a:b])) for a, b in zip(edges[:-1], edges[1:], strict=False)]
    order.shuffle(shards)
    acc = CoMoments(4, 3, compute_dtype=torch.float64)
    for s in shards:
        acc.merge(s)
    cov = acc.result()["cov"].numpy()
    np.testing.assert_allclose(cov, np.cov(x.T, y.T, bias=True)[:4, 4:], atol=1e-9)
    sx, sy = x.std(0), y.std(0)
    rho = cov / np.outer(sx, sy)
    np.testing.assert_allclose(rho, _corr(x, y), atol=1e-6)


def test_float32_batches_stay_accurate_with_large_means():
    g = np.random.default_rng(0)
    x = (g.normal(size=(4000, 6)) + 1e3).astype(np.float32)
    y = (x[:, :3] * 0.5 + g.normal(size=(4000, 3)) - 5e2).astype(np.float32)
    acc = CoMoments(6, 3, compute_dtype=torch.float32)
    for a in range(0, 4000, 256):
        acc.update(torch.from_numpy(x[a:a + 256]), torch.from_numpy(y[a:a + 256]))
    cov = acc.result()["cov"].numpy()
    ref = np.cov(x.astype(np.float64).T, y.astype(np.float64).T, bias=True)[:6, 6:]
    rho = cov / np.outer(x.astype(np.float64).std(0), y.astype(np.float64).std(0))
    np.testing.assert_allclose(rho, ref / np.outer(x.std(0), y.std(0)), atol=1e-5)


def test_rotations_are_orthogonal_and_seeded():
    r = rotation_for(0, "abc", 1, 64)
    np.testing.assert_allclose((r.T @ r).numpy(), np.eye(64), atol=1e-10)
    assert torch.equal(r, rotation_for(0, "abc", 1, 64))
    assert not torch.equal(r, rotation_for(1, "abc", 1, 64))
    assert not torch.equal(r, rotation_for(0, "abc", 0, 64))


def test_serial_qr_keeps_the_thread_count_and_the_distribution():
    """Small rotations' QR runs on one thread (rotation.SERIAL_QR_MAX); the caller's thread
    count is restored, and the result is the same orthogonal matrix up to rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = rotation_for(0, "abc", 1, 64)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    g = torch.randn(64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q, rr = torch.linalg.qr(g)
    np.testing.assert_allclose((r.T @ r).numpy(), np.eye(64), atol=1e-10)
    from unineurons.correlate.rotation import random_orthogonal

    np.testing.assert_allclose(random_orthogonal(64, torch.Generator().manual_seed(5)).numpy(),
                               (q * torch.sign(torch.diagonal(rr))).numpy(), atol=1e-12)


# ---- end to end against direct references ---------------------------------------------------

def test_correlations_match_direct_computation(seed_models, tiny_store, tmp_path):
    paths = seed_models[:3]
    res = run_correlate(_cfg(paths, tiny_store, dtype="float64"), tmp_path / "run")
    acts = _captured(paths, tiny_store)
    m = pd.read_parquet(tmp_path / "run" / "matches.parquet")
    d = 64
    for j, b in enumerate(paths[1:], start=1):
        rho = _corr(acts[0], acts[j])
        sub = m[m.partner == str(b)].sort_values(["layer", "neuron"])
        np.testing.assert_allclose(sub.max_corr.to_numpy(), np.nanmax(rho, 1), atol=1e-6)
        arg = np.nanargmax(rho, 1)
        np.testing.assert_array_equal(sub.argmax_layer * d + sub.argmax_neuron, arg)
        # the analytic baseline equals rotating b's activations for real
        rot = np.concatenate([acts[j][:, l * d:(l + 1) * d] @ rotation_for(
            0, load_model(str(b)).weights_sha256, l, d).numpy() for l in range(2)], 1)  # noqa: E741
        np.testing.assert_allclose(sub.baseline_corr.to_numpy(),
                                   np.nanmax(_corr(acts[0], rot), 1), atol=1e-6)
        pf, _ = load_tensors(tmp_path / "run" / "pairs" / pair_file_name(str(paths[0]), str(b)))
        top = np.sort(rho, 1)[:, ::-1][:, :5]
        np.testing.assert_allclose(pf["topk_corr"].numpy(), top, atol=1e-6)
    n = res.neurons
    assert len(n) == 2 * 64 and set(n.model) == {str(paths[0])}
    np.testing.assert_allclose(n.excess_corr, n.max_corr - n.baseline_corr, atol=1e-12)
    assert (n.is_universal == (n.excess_corr > 0.5)).all()
    # ceiling: max correlation of a neuron with its own rotated layers
    w = load_model(str(paths[0])).weights_sha256
    own = np.concatenate([acts[0][:, l * d:(l + 1) * d] @ rotation_for(0, w, l, d).numpy()
                          for l in range(2)], 1)  # noqa: E741
    np.testing.assert_allclose(n.sort_values(["layer", "neuron"]).ceiling_corr,
                               np.nanmax(_corr(acts[0], own), 1), atol=1e-6)
    assert set(res.layers.columns) >= {"participation_ratio", "share_max_gt_0.7",
                                       "share_baseline_gt_0.7", "universal_share"}


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_block_summaries_in_tiles_match_numpy():
    """The tiled summaries (one row layer x one column layer at a time) against a direct numpy
    computation of every correlation, rotated baseline and top-k, both directions, with a
    constant neuron on each side."""
    from unineurons.correlate.maxcorr import block_results
    from unineurons.correlate.rotation import rotation_for

    rng = np.random.default_rng(3)
    la, lb, da, db, n, k = 2, 3, 6, 5, 400, 4
    x = rng.standard_normal((n, la * da)) @ rng.standard_normal((la * da, la * da))
    y = np.concatenate([x[:, :7], rng.standard_normal((n, lb * db - 7))], 1) + 0.1 * rng.standard_normal((n, lb * db))
    x[:, 3] = 1.0  # zero variance: NaN correlations
    y[:, 11] = -2.0
    xc, yc = x - x.mean(0), y - y.mean(0)
    c = torch.from_numpy(xc.T @ yc)  # [R, Nb] summed co-moments
    m2x, m2y = (xc**2).sum(0), (yc**2).sum(0)
    cov_x = np.stack([xc[:, i * da:(i + 1) * da].T @ xc[:, i * da:(i + 1) * da] for i in range(la)])
    cov_y = np.stack([yc[:, j * db:(j + 1) * db].T @ yc[:, j * db:(j + 1) * db] for j in range(lb)])
    rot_a = [rotation_for(0, "a", i, da) for i in range(la)]
    rot_b = [rotation_for(0, "b", j, db) for j in range(lb)]
    res = block_results(c, torch.tensor(float(n)), torch.from_numpy(m2x), torch.from_numpy(m2y), k=k,
                        col_cov=torch.from_numpy(cov_y), col_rot=rot_b, row_cov=torch.from_numpy(cov_x),
                        row_rot=rot_a, rows_dir=True, cols_dir=True, want_rho=True, d_rows=da, d_cols=db)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.corrcoef(x.T, y.T)[:la * da, la * da:]
        yr = np.concatenate([yc[:, j * db:(j + 1) * db] @ rot_b[j].double().numpy() for j in range(lb)], 1)
        xr = np.concatenate([xc[:, i * da:(i + 1) * da] @ rot_a[i].double().numpy() for i in range(la)], 1)
        base_rows = np.corrcoef(x.T, yr.T)[:la * da, la * da:]
        base_cols = np.corrcoef(xr.T, y.T)[:la * da, la * da:]
    top_rows = -np.sort(-np.nan_to_num(rho, nan=-np.inf), 1)[:, :k]
    top_cols = -np.sort(-np.nan_to_num(rho, nan=-np.inf), 0)[:k].T
    ok = np.isfinite(top_rows)
    np.testing.assert_allclose(res["row_topv"].numpy()[ok], top_rows[ok], atol=1e-12)
    assert np.isnan(res["row_topv"].numpy()[3]).all() and (res["row_topi"].numpy()[3] == -1).all()
    np.testing.assert_allclose(np.take_along_axis(rho, res["row_topi"].numpy().clip(0), 1)[ok],
                               top_rows[ok], atol=1e-12)  # the indices point at those values
    ok = np.isfinite(top_cols)
    np.testing.assert_allclose(res["col_topv"].numpy()[ok], top_cols[ok], atol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(rho.T, res["col_topi"].numpy().clip(0), 1)[ok],
                               top_cols[ok], atol=1e-12)  # row indices across row tiles
    np.testing.assert_allclose(res["row_base"].numpy(), np.nanmax(base_rows, 1), atol=1e-12)
    np.testing.assert_allclose(res["col_base"].numpy(), np.nanmax(base_cols, 0), atol=1e-12)
    np.testing.assert_allclose(res["rho"].float().numpy(), rho, atol=1e-3)
    # without a baseline the whole block is one tile: the same top-k
    whole = block_results(c, torch.tensor(float(n)), torch.from_numpy(m2x), torch.from_numpy(m2y), k=k,
                          rows_dir=True, cols_dir=True)
    for key in ("row_topv", "col_topv"):
        torch.testing.assert_close(whole[key], res[key], rtol=0, atol=1e-12, equal_nan=True)


def test_identical_copy_is_its_own_best_match(seed_models, tiny_store, tmp_path):
    res = run_correlate(_cfg([seed_models[0], seed_models[3]], tiny_store), tmp_path / "run")
    m = pd.read_parquet(tmp_path / "run" / "matches.parquet")
    np.testing.assert_allclose(m.max_corr, 1.0, atol=1e-5)
    assert (m.argmax_layer == m.layer).all() and (m.argmax_neuron == m.neuron).all()
    assert (m.baseline_corr < 0.999).all()
    assert res.neurons.excess_corr.mean() > 0


def test_passes_and_all_pairs_agree_with_one_pass(seed_models, tiny_store, tmp_path):
    paths = seed_models[:3]
    one = run_correlate(_cfg(paths, tiny_store, pairs="all", accumulate_tokens=256), tmp_path / "one").neurons
    # 2 layers x 64 x 128 x 8 bytes = 64 KB per pair: a budget that forces several passes
    n_params = sum(p.numel() for p in load_model(str(paths[0])).model.parameters())
    shapes = [ModelShape(2, 64, n_params)] * 3
    free = plan_for(_cfg(paths, tiny_store, pairs="all", memory_budget="1TB", accumulate_tokens=256),
                    shapes, 64)
    small = parse_bytes("200KB") + free.persistent_bytes + free.stream_bytes + max(free.work_bytes)
    many = run_correlate(_cfg(paths, tiny_store, pairs="all", memory_budget=str(small),
                              accumulate_tokens=256), tmp_path / "many")
    assert len(many.plan.passes) > 1
    pd.testing.assert_frame_equal(one, many.neurons, check_exact=False, atol=1e-9, rtol=0)
    assert set(one.model) == {str(p) for p in paths}
    # the reverse direction of an unordered pair equals running that model as the reference
    ref1 = run_correlate(_cfg([paths[1], paths[0], paths[2]], tiny_store), tmp_path / "ref1")
    a = one[one.model == str(paths[1])].reset_index(drop=True)
    b = ref1.neurons.reset_index(drop=True)
    for col in ("max_corr", "baseline_corr", "excess_corr", "ceiling_corr"):
        # xᵀy vs (yᵀx)ᵀ in float32 GEMMs, stored as float32: equal to float32 precision
        np.testing.assert_allclose(a[col], b[col], atol=1e-6)


def test_zero_variance_neurons_are_nan(seed_models, tiny_store, tmp_path):
    from safetensors.torch import load_file, save_file

    dead = tmp_path / "dead"
    shutil.copytree(seed_models[1], dead)
    sd = load_file(dead / "model.safetensors")
    # neuron L0.N3 never varies: zero input weights and a bias make it constant
    sd["transformer.h.0.mlp.c_fc.weight"][:, 3] = 0.0
    save_file(sd, dead / "model.safetensors", metadata={"format": "pt"})
    res = run_correlate(_cfg([dead, seed_models[0]], tiny_store), tmp_path / "run")
    row = res.neurons[(res.neurons.layer == 0) & (res.neurons.neuron == 3)].iloc[0]
    assert row.zero_var and np.isnan(row.max_corr) and not row.is_universal
    assert int(res.layers.zero_var.sum()) == 1
    others = res.neurons.drop(index=row.name)
    assert others.max_corr.notna().all()


def test_bad_inputs(seed_models, tiny_store, tmp_path, tiny_tokenizer):
    with pytest.raises(Exception, match="at least two"):
        _cfg([seed_models[0]], tiny_store)
    from transformers import GPT2Config, GPT2LMHeadModel

    small = tmp_path / "small_vocab"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100,
                               n_positions=64)).save_pretrained(small)
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    shutil.copytree(small, other)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(small)
    with pytest.raises(UnineuronsError, match="vocabulary"):
        run_correlate(_cfg([seed_models[0], small], tiny_store), tmp_path / "r1")
    # no tokenizer files: transformers' made-up default tokenizer is not taken for the model's
    # (issue 17); its vocabulary is checked against the store's
    with pytest.raises(UnineuronsError, match="different tokenizers|smaller than"):
        run_correlate(_cfg([seed_models[0], other], tiny_store), tmp_path / "r3")
    with pytest.raises(UnineuronsError, match="too small"):
        run_correlate(_cfg(seed_models[:2], tiny_store, memory_budget="10KB"), tmp_path / "r2")
    # refused runs leave no partial output behind
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(UnineuronsError, match="not made by unineurons"):
        run_correlate(_cfg(seed_models[:2], tiny_store), tmp_path / "theirs")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]


def test_resume_after_kill_matches_uninterrupted(seed_models, tiny_store, tmp_path):
    paths = [str(p) for p in seed_models[:2]]
    full = run_correlate(_cfg(paths, tiny_store, n_tokens=8192, batch_size=1,
                              accumulate_tokens=64),
                         tmp_path / "full").neurons
    run = tmp_path / "killed"
    args = [sys.executable, "-c", "from unineurons.cli import main; main()", "correlate",
            "--model", paths[0], "--model", paths[1], "--tokens", str(tiny_store),
            "--n-tokens", "8192", "--batch-size", "1", "--checkpoint-tokens", "128",
            "--accumulate-tokens", "64",
            "--out", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "state" / "checkpoint.safetensors"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()  # at once: the first checkpoint is 2 of 128 contexts in
    proc.wait()
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (run / "neurons.parquet").exists()
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1 and "--resume" in r.stderr  # refuses to silently restart
    # another budget makes another pass plan (one-layer blocks): the checkpoint does not fit it
    cfg = _cfg(paths, tiny_store, n_tokens=8192, batch_size=1, accumulate_tokens=64)
    n_params = sum(p.numel() for p in load_model(paths[0]).model.parameters())
    free = plan_for(cfg, [ModelShape(2, 64, n_params, d_model=32, n_heads=2, vocab_size=512)] * 2, 64)
    budget = free.persistent_bytes + free.stream_bytes + 360_000
    r = subprocess.run(args + ["--resume", "--memory-budget", str(budget)], capture_output=True, text=True)
    assert r.returncode == 1 and "another pass plan" in r.stderr, r.stderr
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    resumed = pd.read_parquet(run / "neurons.parquet")
    pd.testing.assert_frame_equal(full, resumed, check_exact=True)


def test_masking_drops_bos_and_newlines(seed_models, tiny_store):
    store = TokenStore.open(tiny_store)
    m = load_model(str(seed_models[0]))
    sp = store.manifest["tokenizer"]
    b = next(activation_stream([m], store.contexts(640), sp, batch_size=10))
    assert (b.positions > 0).all()
    assert not np.isin(b.token_ids.numpy(), sp["newline_ids"] + [sp["bos_id"], sp["eos_id"]]).any()
    keep_all = next(activation_stream([m], store.contexts(640), sp, batch_size=10,
                                      mask=MaskConfig(False, False, False, False)))
    assert keep_all.n == 640 and b.n < 640
