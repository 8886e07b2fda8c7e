"""Effects with uncertainty (issue 13 item 3): the paired bootstrap over contexts against a
direct numpy computation and scipy, its coverage, the per-context sums (merging across token
shards), planted ablations with zero and with large effects, and the headline's intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from unineurons.accumulators.contexts import ContextSums
from unineurons.analyses.ablate import AblateConfig, ablate_model, headline, summarize
from unineurons.analyses.ablate_shards import _state
from unineurons.analyses.effects import (
    BLOCK,
    bootstrap_replicates,
    draw_mean_replicates,
    group_interval,
    interval,
    match_size,
    paired_delta_replicates,
    per_context,
)
from unineurons.analyses.interventions import (
    LMMetrics,
    evaluate_patches,
    make_patch,
    patch_metrics,
    patch_results,
    target_mask,
)
from unineurons.io import load_tensors, save_tensors
from unineurons.models.load import load_model
from unineurons.tokens import TokenStore


# ---- the bootstrap itself -------------------------------------------------------------------
def direct_replicates(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The same resampling written out: one call for every index, then plain sums."""
    idx = np.random.default_rng(seed).integers(0, len(den), size=(n_boot, len(den)))
    return num[idx].sum(1) / den[idx].sum(1)[:, None]


@pytest.mark.parametrize("n_boot", [1, BLOCK, 3 * BLOCK + 5])
def test_replicates_equal_direct_numpy(n_boot):
    rng = np.random.default_rng(1)
    c = 37
    den = rng.integers(1, 60, c).astype(float)  # scored predictions per context
    num = rng.normal(0.1, 1.0, (c, 3)) * den[:, None]
    got = bootstrap_replicates(num, den, n_boot, seed=4)
    np.testing.assert_allclose(got, direct_replicates(num, den, n_boot, 4), rtol=1e-12)
    assert np.array_equal(got, bootstrap_replicates(num, den, n_boot, seed=4))  # seeded
    assert not np.array_equal(got, bootstrap_replicates(num, den, n_boot, seed=5))
    lo, hi = interval(got)
    np.testing.assert_allclose(lo, np.quantile(got, 0.025, axis=0), rtol=1e-12)
    np.testing.assert_allclose(hi, np.quantile(got, 0.975, axis=0), rtol=1e-12)


def test_interval_agrees_with_scipy_paired_bootstrap():
    rng = np.random.default_rng(2)
    c = 80
    n = rng.integers(20, 60, c).astype(float)
    clean = rng.normal(3.0, 0.5, c) * n
    patched = clean + rng.normal(0.05, 0.3, c) * n
    reps = paired_delta_replicates((np.arange(c), np.stack([n, clean, clean, clean], 1)),
                                   [(np.arange(c), np.stack([n, patched, clean, clean], 1))],
                                   [1], 4000, seed=0)[0, :, 0]
    lo, hi = interval(reps)
    ref = stats.bootstrap((patched, clean, n), lambda a, b, m, axis=-1:
                          (a.sum(axis) - b.sum(axis)) / m.sum(axis), paired=True,
                          vectorized=True, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(9)).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.1 * width and abs(hi - ref.high) < 0.1 * width
    point = (patched.sum() - clean.sum()) / n.sum()
    assert lo < point < hi


def test_interval_covers_the_truth_about_95_percent_of_the_time():
    """Contexts drawn from a population with a known mean effect: the 95 % interval must
    cover it in about 95 % of repeated experiments (percentile intervals run a little low)."""
    rng = np.random.default_rng(3)
    truth, hits, trials = 0.2, 0, 300
    for _ in range(trials):
        n = rng.integers(10, 40, 60).astype(float)
        d = rng.normal(truth, 1.0, 60) * n + rng.normal(0, 3.0, 60)  # per-context loss change
        lo, hi = interval(bootstrap_replicates(d, n, 400, seed=int(rng.integers(1 << 30))))
        hits += bool(lo <= truth <= hi)
    assert 0.89 <= hits / trials <= 0.99


def test_unpaired_contexts_are_refused():
    from unineurons.errors import UnineuronsError

    a = (np.arange(3), np.ones((3, 4)))
    b = (np.array([0, 1, 5]), np.ones((3, 4)))
    with pytest.raises(UnineuronsError, match="other contexts"):
        paired_delta_replicates(a, [b], [1], 10, 0)
    out = paired_delta_replicates(a, [None, a], [1], 10, 0)
    assert np.isnan(out[0, :, 0]).all() and (out[0, :, 1] == 0).all()


def test_draw_resampling_and_match_size():
    reps = np.arange(12, dtype=float).reshape(3, 4)  # 3 draws x 4 replicates
    assert np.array_equal(draw_mean_replicates(reps[:1]), reps[0])
    got = draw_mean_replicates(reps)
    pick = np.random.default_rng([7, 3, 4]).integers(0, 3, size=(4, 3))
    np.testing.assert_allclose(got, [reps[pick[b], b].mean() for b in range(4)])
    xs = np.array([0.0, 10, 20, 40])
    ys = np.array([[0.0, 0.2, 0.4, 0.8], [0.0, 0.5, 0.4, 0.9]])
    np.testing.assert_allclose(match_size(xs, ys, np.array([0.6, 0.45])), [30.0, 9.0])
    assert np.isinf(match_size(xs, ys[0], np.array(0.9)))
    assert match_size(xs, ys[0], np.array(-0.1)) == 0.0


# ---- per-context sums: mergeable, and equal to a direct computation ---------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.floats(-5, 5)), min_size=1, max_size=60),
       st.lists(st.integers(0, 60), max_size=5), st.randoms(use_true_random=False))
def test_context_sums_split_and_merge_in_any_order(rows, cuts, rnd):
    ids = torch.tensor([r[0] for r in rows])
    vals = torch.tensor([[r[1], 1.0] for r in rows], dtype=torch.float64)
    edges = sorted({0, len(rows), *[min(c, len(rows)) for c in cuts]})
    parts = [ContextSums(2).update(ids[a:b], vals[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    rnd.shuffle(parts)
    merged = ContextSums(2)
    for p in parts:
        merged.merge(p)
    got_ids, got = merged.result()
    ref = pd.DataFrame({"c": ids.numpy(), "v": vals[:, 0].numpy(), "n": 1.0}).groupby("c").sum()
    assert got_ids.tolist() == ref.index.tolist()
    np.testing.assert_allclose(got.numpy(), ref[["v", "n"]].to_numpy(), atol=1e-9)


def test_context_sums_fold_many_batches_and_round_trip(tmp_path):
    acc = ContextSums(1)
    for c in range(3000):  # far more rows than the pending limit
        acc.update(torch.tensor([c % 1000, c % 1000]), torch.ones(2, 1))
    save_tensors(tmp_path / "s.safetensors", acc.state_dict())
    back = ContextSums(1).load_state_dict(load_tensors(tmp_path / "s.safetensors")[0])
    ids, sums = back.result()
    assert ids.tolist() == list(range(1000)) and (sums[:, 0] == 6).all()


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory, make_gpt2, tiny_store):
    path = make_gpt2(tmp_path_factory.mktemp("boot") / "gpt2", seed=3)
    m = load_model(str(path), with_tokenizer=False)
    store = TokenStore.open(tiny_store)
    return m, np.asarray(store.contexts(12 * store.ctx)), store.manifest["tokenizer"]


def test_per_context_sums_match_direct_losses(model_and_data):
    m, contexts, special = model_and_data
    clean, (acc,) = patch_metrics(m, contexts, special, [make_patch([(1, 3), (0, 9)], 0.0)],
                                  batch_size=5)
    ids, sums = per_context(clean)
    tokens = torch.from_numpy(contexts.astype(np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(m.model(input_ids=tokens).logits[:, :-1].double(), -1)
    valid = target_mask(tokens, special)
    nll = -logp.gather(2, tokens[:, 1:, None])[..., 0]  # [B, T-1]
    assert ids.tolist() == [c for c in range(len(contexts)) if valid[c].any()]
    np.testing.assert_allclose(sums[:, 0], valid.sum(1)[ids].numpy())
    np.testing.assert_allclose(sums[:, 1], (nll * valid).sum(1)[ids].numpy(), rtol=1e-5)
    assert sums[:, 3] == pytest.approx(0.0, abs=1e-9)  # KL of the clean model to itself
    _, psum = per_context(acc)
    np.testing.assert_allclose(psum[:, 1].sum() / psum[:, 0].sum(), acc.result()["loss"])


def test_token_shards_merge_to_the_one_pass_intervals(model_and_data):
    """The Ray path: shards [c0, c1) return LMMetrics states that the driver merges."""
    m, contexts, special = model_and_data
    patches = [make_patch([(1, 3)], 0.0), make_patch([(0, 1), (1, 2)], 2.0)]
    whole = patch_results(*patch_metrics(m, contexts, special, patches, batch_size=4))[1]
    vocab = m.adapter.vocab_size
    clean, accs = LMMetrics(vocab), [LMMetrics(vocab) for _ in patches]
    for c0, c1 in ((0, 5), (5, 6), (6, 12)):  # shards split batches
        state = _state(*patch_metrics(m, contexts[:c1], special, patches, batch_size=4, start=c0))
        for name, a in [("clean", clean)] + [(f"p{i}", x) for i, x in enumerate(accs)]:
            a.merge(LMMetrics(vocab).load_state_dict(
                {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}))
    sharded = patch_results(clean, accs)[1]
    for w, s in zip(whole, sharded, strict=True):
        for k in ("delta_loss", "delta_loss_lo", "delta_loss_hi", "delta_entropy_hi"):
            assert s[k] == pytest.approx(w[k], rel=1e-9, abs=1e-12), k


def test_intervals_bracket_the_effect_and_are_seeded(model_and_data):
    m, contexts, special = model_and_data
    patches = [make_patch([(1, 3)], 5.0)]
    _, (a,) = evaluate_patches(m, contexts, special, patches, n_boot=300, boot_seed=1)
    _, (b,) = evaluate_patches(m, contexts, special, patches, n_boot=300, boot_seed=1)
    assert a["delta_loss_lo"] <= a["delta_loss"] <= a["delta_loss_hi"]
    assert a["delta_entropy_lo"] <= a["delta_entropy"] <= a["delta_entropy_hi"]
    assert a["delta_loss_lo"] == b["delta_loss_lo"] and a["delta_loss_hi"] == b["delta_loss_hi"]
    _, (c,) = evaluate_patches(m, contexts, special, patches, n_boot=0)
    assert np.isnan(c["delta_loss_lo"]) and c["delta_loss"] == a["delta_loss"]


# ---- planted ablations ----------------------------------------------------------------------
def _table(d_mlp: int, universal: list[tuple[int, int]]) -> pd.DataFrame:
    rows = [{"layer": lay, "neuron": n, "excess_corr": 0.9 if (lay, n) in universal else 0.01,
             "is_universal": (lay, n) in universal} for lay in range(2) for n in range(d_mlp)]
    return pd.DataFrame(rows)


def _edited(tmp_path, make_gpt2, neurons, scale: float):
    path = make_gpt2(tmp_path / "m", seed=5)
    m = load_model(str(path), with_tokenizer=False)
    with torch.no_grad():
        for lay, n in neurons:
            m.adapter.out_proj(lay).weight[n] *= scale  # GPT-2 Conv1D: row n is w_out
    return m


def _unigram_model(tmp_path, contexts: np.ndarray, neurons) -> object:
    """A random GPT-2 whose ``neurons`` are always on and write one direction u that the
    (untied) unembedding reads as the tokens' log-frequencies: together they make the model
    predict the unigram distribution instead of a uniform one, so ablating them raises loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=512, n_positions=64,
                     tie_word_embeddings=False, activation_function="gelu_new")
    model = GPT2LMHeadModel(cfg).eval()
    freq = np.bincount(contexts[:, 1:].ravel(), minlength=512) + 1.0
    logf = torch.tensor(np.log(freq / freq.sum()), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, generator=g)
    u = (u - u.mean()) / (u - u.mean()).norm()
    with torch.no_grad():
        for lay, n in neurons:
            mlp = model.transformer.h[lay].mlp
            mlp.c_fc.weight[:, n] = 0.0  # always on at GELU(2), whatever the input
            mlp.c_fc.bias[n] = 2.0
            mlp.c_proj.weight[n] = 10.0 * u
        model.lm_head.weight.copy_((logf - logf.mean())[:, None] * u[None, :] / 32 ** 0.5)
    model.save_pretrained(tmp_path / "uni", safe_serialization=True)
    return load_model(str(tmp_path / "uni"), with_tokenizer=False)


def test_zero_effect_ablation_is_not_distinguishable(tmp_path, make_gpt2, model_and_data):
    _, contexts, special = model_and_data
    dead = [(0, 4), (1, 6), (1, 9)]
    m = _edited(tmp_path, make_gpt2, dead, 0.0)  # w_out = 0: ablating them changes nothing
    cfg = AblateConfig(sizes=["all"], random_draws=2, n_bootstrap=200)
    df = ablate_model(m, _table(64, dead), contexts, special, cfg)
    uni = df[df["set"] == "universal"].iloc[0]
    assert uni["delta_loss"] == pytest.approx(0.0, abs=1e-6)
    assert uni["delta_loss_lo"] <= 0 <= uni["delta_loss_hi"]
    assert len(uni["delta_loss_boot"]) == 200 and uni["n_targets"] > 0
    text = headline(df)
    assert "top 3 universal neurons" in text
    assert "not distinguishable from zero at this token count" in text
    assert f"{int(uni['n_targets'])} scored predictions" in text


def test_large_effect_headline_has_intervals(tmp_path, make_gpt2, model_and_data):
    _, contexts, special = model_and_data
    loud = [(0, 4), (1, 6), (1, 9), (1, 20)]
    m = _unigram_model(tmp_path, contexts, loud)
    cfg = AblateConfig(sizes=[1, 2, 4, 8, 16, 32, 64], random_draws=3, n_bootstrap=300)
    df = ablate_model(m, _table(64, loud), contexts, special, cfg)
    uni = df[(df["set"] == "universal") & (df["n_ablated"] == 4)].iloc[0]
    assert uni["delta_loss_lo"] > 0  # distinguishable from zero
    text = headline(df)
    assert "difference" in text and "95% interval" in text and "over contexts and draws" in text
    assert "not distinguishable from zero" not in text
    assert text == headline(df.sample(frac=1.0, random_state=0))  # row order does not matter
    df.to_parquet(tmp_path / "a.parquet", index=False)  # the replicates survive the table
    assert headline(pd.read_parquet(tmp_path / "a.parquet")) == text
    # any target set name: rename it (as the calibrated universal set)
    other = df.assign(set=df["set"].replace({"universal": "universal-calibrated"}))
    assert "top 4 universal-calibrated neurons" in headline(other)
    s = summarize(df)
    for _, r in s.iterrows():
        rows = df[(df["set"] == r["set"]) & (df["size"] == r["size"]) & (df["layer"] == r["layer"])]
        lo, hi = group_interval(rows)
        assert (r["delta_loss_lo"], r["delta_loss_hi"]) == pytest.approx((lo, hi), nan_ok=True)
    one = s[(s["set"] == "universal") & (s["size"] == "4")].iloc[0]
    assert (one["delta_loss_lo"], one["delta_loss_hi"]) == pytest.approx(
        (uni["delta_loss_lo"], uni["delta_loss_hi"]))


def _row(set_, n, dl, boot, draw=0):
    return {"model": "m", "method": "zero", "set": set_, "layer": -1, "size": str(n), "draw": draw,
            "n_requested": n, "n_ablated": n, "delta_loss": dl, "kl": 0.0, "efficiency": dl / n,
            "n_targets": 5000, "delta_loss_boot": boot}


def test_headline_interval_from_replicates():
    rng = np.random.default_rng(0)
    b = 500
    noise = rng.normal(0, 1, b)  # shared by every row: the same resampled contexts
    rows = [_row("universal", 10, 1.0, 1.0 + 0.05 * noise)]
    for n, dl in ((10, 0.2), (20, 0.4), (40, 0.8), (80, 1.6)):
        for d, off in ((0, -0.02), (1, 0.02)):
            rows.append(_row("random", n, dl + off, dl + off + 0.05 * dl * noise, d))
    text = headline(pd.DataFrame(rows))
    assert "about 50 (5x)" in text
    assert "95% interval" in text and "single draws 49 to 51" in text  # 40 + .22 / .8 * 40
    assert "not distinguishable" not in text
    # the universal set no better than random neurons of its size
    same = [_row("universal", 10, 0.21, 0.21 + 0.1 * noise)] + rows[1:]
    assert "not distinguishable at this token count (5000 scored predictions)" in headline(
        pd.DataFrame(same))
