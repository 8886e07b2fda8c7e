"""Single-neuron interventions and the shared evaluation loop, against direct references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr
from scipy.stats import rankdata

from unineurons.accumulators.base import check_accumulator
from unineurons.analyses.interventions import (
    METRICS,
    LMMetrics,
    evaluate_patches,
    final_norm_scale,
    intervene_neurons,
    make_patch,
    random_late_neurons,
    target_mask,
)
from unineurons.errors import UnineuronsError
from unineurons.models.load import load_model
from unineurons.tokens import TokenStore

N_TOK = 512  # 8 contexts of 64


def make_gpt2(path: Path, seed: int = 0, n_layer: int = 2) -> Path:
    """A random GPT-2 (d_model 32, d_mlp 64, vocab 512) saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_inner=64, vocab_size=512,
                     n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_model(str(make_gpt2(tmp_path_factory.mktemp("m") / "gpt2")), with_tokenizer=False)


@pytest.fixture(scope="module")
def data(tiny_store):
    store = TokenStore.open(tiny_store)
    return np.asarray(store.contexts(N_TOK)), store.manifest["tokenizer"]


def reference_metrics(m, contexts: np.ndarray, special: dict, fix=None) -> dict[str, float]:
    """Metrics from one full forward over all contexts, computed directly in float64.

    ``fix``: {layer: {index: value}} activations replaced through a hand-written hook.
    """
    tokens = torch.from_numpy(contexts.astype(np.int64))
    seen = {}
    handles = [m.adapter.final_norm().register_forward_pre_hook(
        lambda _m, a: seen.__setitem__("x", a[0]))]
    for layer, vals in (fix or {}).items():
        def hook(_mod, args, vals=vals):
            x = args[0].clone()
            for i, v in vals.items():
                x[:, :, i] = v
            return (x,)
        handles.append(m.adapter.out_proj(layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = m.model(input_ids=tokens).logits.double()  # [B, T, V]
    finally:
        for h in handles:
            h.remove()
    skip = [special["bos_id"], special["eos_id"], special["pad_id"]]
    valid = ~np.isin(contexts[:, 1:], skip)  # [B, T-1]
    lg = logits[:, :-1].numpy()[valid]  # [n, V]
    tgt = contexts[:, 1:][valid]
    logp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - lg.max(1, keepdims=True)
    ranks = np.array([rankdata(-row, method="min")[t] for row, t in zip(logp, tgt, strict=True)])
    x = seen["x"][:, :-1].double().numpy()[valid]  # [n, d_model]
    norm = m.adapter.final_norm()
    if isinstance(norm, torch.nn.LayerNorm):
        second, eps = x.var(1), norm.eps
    else:  # RMSNorm
        second, eps = (x ** 2).mean(1), norm.variance_epsilon
    return {"loss": float(F.cross_entropy(torch.from_numpy(lg), torch.from_numpy(tgt).long())),
            "entropy": float(-(np.exp(logp) * logp).sum(1).mean()),
            "top1_acc": float((lg.argmax(1) == tgt).mean()),
            "true_rank_mean": float(ranks.mean()), "true_rank_median": float(np.median(ranks)),
            "final_norm_scale": float((1 / np.sqrt(second + eps)).mean()),
            "n_targets": float(valid.sum()), "logp": logp}


# ---- the accumulator ------------------------------------------------------------------------
def test_lm_metrics_is_an_accumulator():
    check_accumulator("LMMetrics")


def test_lm_metrics_against_scipy():
    rng = np.random.default_rng(1)
    n, v = 41, 7
    logits = rng.normal(size=(n, v)) * 2
    clean_logits = rng.normal(size=(n, v)) * 2
    tgt = rng.integers(0, v, n)
    scale = rng.random(n)
    lp = torch.log_softmax(torch.tensor(logits), -1)
    clp = torch.log_softmax(torch.tensor(clean_logits), -1)
    r = LMMetrics(v).update(lp[:20], torch.tensor(tgt[:20]), torch.tensor(scale[:20]), clp[:20]) \
        .update(lp[20:], torch.tensor(tgt[20:]), torch.tensor(scale[20:]), clp[20:]).result()
    p, pc = np.exp(lp.numpy()), np.exp(clp.numpy())
    ranks = np.array([rankdata(-row, method="min")[t] for row, t in zip(logits, tgt, strict=True)])
    assert list(r) == METRICS
    np.testing.assert_allclose(r["loss"], -lp.numpy()[np.arange(n), tgt].mean(), rtol=1e-6)
    np.testing.assert_allclose(r["entropy"], -(p * np.log(p)).sum(1).mean(), rtol=1e-6)
    np.testing.assert_allclose(r["kl"], rel_entr(pc, p).sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(r["final_norm_scale"], scale.mean(), rtol=1e-12)
    assert r["top1_acc"] == pytest.approx((logits.argmax(1) == tgt).mean())
    assert r["true_rank_mean"] == pytest.approx(ranks.mean())
    assert r["true_rank_median"] == np.median(ranks)
    odd = LMMetrics(v).update(lp[:-1], torch.tensor(tgt[:-1]), torch.tensor(scale[:-1]),
                              clp[:-1]).result()
    assert odd["true_rank_median"] == np.median(ranks[:-1])
    assert r["n_targets"] == n  # n is odd here; the even count is checked below
    chunked = LMMetrics(v)
    chunked.CHUNK = 4  # rows folded in chunks give the same sums
    chunked.update(lp, torch.tensor(tgt), torch.tensor(scale), clp)
    assert chunked.result() == pytest.approx(r, rel=1e-12)
    empty = LMMetrics(v).result()
    assert empty["n_targets"] == 0 and np.isnan(empty["loss"])


def test_lm_metrics_fused_sums_match_the_masked_formula():
    """Entropy and KL come from fused product sums (vecdot); they equal the masked
    ``where(p > 0, p * log p, 0).sum`` form, also on rows holding -inf log-probabilities
    (exactly-zero probabilities contribute nothing; a token clean gives mass and the patched
    model none makes KL infinite)."""
    g = torch.Generator().manual_seed(0)
    n, v = 12, 300
    lg, cl = torch.randn(n, v, generator=g) * 4, torch.randn(n, v, generator=g) * 4
    lg[2, 3] = cl[2, 3] = -float("inf")  # zero in both: contributes nothing
    lg[5, 0] = -float("inf")  # zero only where patched: KL = inf
    cl[7, 1] = -float("inf")  # zero only in clean
    lp, clp = torch.log_softmax(lg, -1), torch.log_softmax(cl, -1)
    tgt, scale = torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g)
    acc = LMMetrics(v).update(lp, tgt, scale, clp, torch.arange(n))
    p, pc = lp.exp(), clp.exp()
    ent = -torch.where(p > 0, p * lp, 0.0).sum(-1)
    kl = torch.where(pc > 0, pc * (clp - lp), 0.0).sum(-1)
    assert torch.isinf(kl[5]) and torch.isfinite(kl[[0, 2, 7]]).all()
    got = acc.contexts.state_dict()
    assert got["ctx_id"].tolist() == list(range(n))
    table = got["ctx_sums"]  # [contexts, CONTEXT_COLUMNS]: one row per context here
    np.testing.assert_array_equal(table[:, 2].numpy(), ent.double().numpy())
    np.testing.assert_array_equal(table[:, 3].numpy(), kl.double().numpy())


# ---- masks, norms, patches ------------------------------------------------------------------
def test_target_mask_skips_special_targets_and_pad_inputs():
    special = {"bos_id": 0, "eos_id": 1, "pad_id": 2, "newline_ids": [9]}
    tokens = torch.tensor([[0, 5, 1, 6, 9, 2, 7]])
    # targets: 5 1 6 9 2 7 -> EOS and pad skipped, newline kept; 7 follows a pad input
    assert target_mask(tokens, special).tolist() == [[True, False, True, True, False, False]]
    none = {"bos_id": None, "eos_id": None, "pad_id": None}
    assert target_mask(tokens, none).all()


def test_final_norm_scale_layernorm_and_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 5, 16) * 4 + 1
    ln = torch.nn.LayerNorm(16, eps=1e-5)
    ref = 1 / np.sqrt(x.double().numpy().var(-1) + 1e-5)
    np.testing.assert_allclose(final_norm_scale(ln, x).numpy(), ref, rtol=1e-5)
    # the scale is what LayerNorm multiplies the centred input by (weight 1, bias 0)
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(ln(x), centred * final_norm_scale(ln, x)[..., None])
    rms = LlamaRMSNorm(16, eps=1e-6)
    ref = 1 / np.sqrt((x.double().numpy() ** 2).mean(-1) + 1e-6)
    np.testing.assert_allclose(final_norm_scale(rms, x).numpy(), ref, rtol=1e-5)
    torch.testing.assert_close(rms(x), x * final_norm_scale(rms, x)[..., None])


def test_make_patch_groups_by_layer():
    p = make_patch([(1, 4), (0, 2), (1, 0)], [1.5, -2.0, 3.0])
    assert sorted(p) == [0, 1]
    assert p[1][0].tolist() == [4, 0] and p[1][1].tolist() == [1.5, 3.0]
    assert p[0][0].tolist() == [2] and p[0][1].tolist() == [-2.0]
    assert make_patch([(0, 1), (0, 3)], 0.0)[0][1].tolist() == [0.0, 0.0]


# ---- the evaluation loop on a real (tiny) model ---------------------------------------------
def test_clean_metrics_match_direct_computation(gpt2, data):
    contexts, special = data
    ref = reference_metrics(gpt2, contexts, special)
    clean, (same,) = evaluate_patches(gpt2, contexts, special, [{}], batch_size=3)
    for k in ("loss", "entropy", "top1_acc", "true_rank_mean", "final_norm_scale"):
        np.testing.assert_allclose(clean[k], ref[k], rtol=2e-5, err_msg=k)
    assert clean["true_rank_median"] == ref["true_rank_median"]
    assert clean["n_targets"] == ref["n_targets"] > contexts.size / 2
    # KL of the clean model to itself is exactly 0; an empty patch is the clean model
    assert clean["kl"] == 0.0 and same["kl"] == 0.0
    assert same["delta_loss"] == 0.0 and same["delta_entropy"] == 0.0


def test_fixed_neuron_matches_hand_written_hook(gpt2, data):
    contexts, special = data
    ref_clean = reference_metrics(gpt2, contexts, special)
    ref = reference_metrics(gpt2, contexts, special, fix={1: {7: 3.0}, 0: {2: -1.0}})
    _, (res,) = evaluate_patches(gpt2, contexts, special,
                                 [make_patch([(1, 7), (0, 2)], [3.0, -1.0])], batch_size=4)
    kl = rel_entr(np.exp(ref_clean["logp"]), np.exp(ref["logp"])).sum(1).mean()
    np.testing.assert_allclose(res["loss"], ref["loss"], rtol=2e-5)
    np.testing.assert_allclose(res["delta_loss"], ref["loss"] - ref_clean["loss"], atol=5e-6)
    assert abs(res["delta_loss"]) > 1e-3
    np.testing.assert_allclose(res["kl"], kl, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(res["final_norm_scale"], ref["final_norm_scale"], rtol=2e-5)
    assert res["kl"] > 1e-6  # the intervention did something


def test_llama_family(tmp_path, data):
    """Gated MLP (down_proj input) and RMSNorm: the same loop, the same references."""
    from transformers import LlamaConfig, LlamaForCausalLM

    contexts, special = data
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama", safe_serialization=True)
    m = load_model(str(tmp_path / "llama"), with_tokenizer=False)
    ctx = contexts[:3]
    ref = reference_metrics(m, ctx, special, fix={1: {3: 4.0}})
    clean, (res,) = evaluate_patches(m, ctx, special, [make_patch([(1, 3)], 4.0)])
    for k in ("loss", "entropy", "true_rank_mean", "final_norm_scale"):
        np.testing.assert_allclose(res[k], ref[k], rtol=2e-5, err_msg=k)
    assert res["kl"] > 0 and clean["kl"] == 0


def test_zeroing_a_neuron_with_zero_w_out_changes_nothing(tmp_path, data):
    contexts, special = data
    m = load_model(str(make_gpt2(tmp_path / "g", seed=3)), with_tokenizer=False)
    with torch.no_grad():
        m.adapter.out_proj(1).weight[5, :] = 0  # Conv1D [d_mlp, d_model]: neuron 5's w_out
    assert torch.all(m.adapter.W_out()[1, 5] == 0)
    clean, (z, other) = evaluate_patches(
        m, contexts, special, [make_patch([(1, 5)], 0.0), make_patch([(1, 6)], 0.0)])
    assert z["loss"] == clean["loss"] and z["kl"] == pytest.approx(0.0, abs=1e-9)
    assert abs(other["delta_loss"]) > 1e-6  # a neuron with a w_out does change the loss


def test_zero_ablating_a_whole_layer_leaves_only_the_bias(gpt2, data):
    contexts, special = data
    ad = gpt2.adapter
    out = {}
    h = ad.mlp(0).register_forward_hook(lambda _m, _a, o: out.__setitem__("y", o))
    patch = make_patch([(0, i) for i in range(ad.d_mlp)], 0.0)[0]
    try:
        with torch.no_grad(), ad.intervene(lambda _l, a: torch.zeros_like(a), layers=[0]):
            gpt2.model(input_ids=torch.from_numpy(contexts[:2].astype(np.int64)))
    finally:
        h.remove()
    assert torch.equal(out["y"], ad.b_out()[0].expand_as(out["y"]))
    assert patch[0].tolist() == list(range(ad.d_mlp))


def test_patch_outside_the_model_is_a_user_error(gpt2, data):
    contexts, special = data
    with pytest.raises(UnineuronsError, match=r"L1\.N64 does not exist"):
        evaluate_patches(gpt2, contexts, special, [make_patch([(1, 64)], 0.0)])
    with pytest.raises(UnineuronsError, match=r"L2\.N0 does not exist"):
        evaluate_patches(gpt2, contexts, special, [make_patch([(2, 0)], 0.0)])


# ---- single-neuron interventions ------------------------------------------------------------
def test_random_late_neurons():
    a = random_late_neurons(3, 16, 5, seed=7, exclude=[(2, 0), (2, 1), (0, 3)])
    assert a == random_late_neurons(3, 16, 5, seed=7, exclude=[(2, 0), (2, 1), (0, 3)])
    assert len(set(a)) == 5 and all(layer == 2 for layer, _ in a)
    assert not {(2, 0), (2, 1)} & set(a)
    assert a != random_late_neurons(3, 16, 5, seed=8, exclude=[(2, 0), (2, 1)])
    assert len(random_late_neurons(1, 4, 10, seed=0, exclude=[(0, 0)])) == 3


def test_intervene_neurons_rows(gpt2, data):
    contexts, special = data
    df = intervene_neurons(gpt2, contexts[:4], special, [(0, 3), (1, 9)], [-1.0, 2.0],
                           kinds=["target", "random"], batch_size=2)
    assert len(df) == 4
    assert list(df[["address", "kind", "value"]].itertuples(index=False, name=None)) == [
        ("L0.N3", "target", -1.0), ("L0.N3", "target", 2.0),
        ("L1.N9", "random", -1.0), ("L1.N9", "random", 2.0)]
    for col in ("model", "layer", "neuron", "loss", "entropy", "true_rank_mean",
                "true_rank_median", "final_norm_scale", "delta_loss", "delta_entropy"):
        assert col in df.columns
    assert (df["model"] == gpt2.name).all()
    ref = reference_metrics(gpt2, contexts[:4], special, fix={1: {9: 2.0}})
    row = df.iloc[3]
    np.testing.assert_allclose(row["loss"], ref["loss"], rtol=2e-5)
    np.testing.assert_allclose(row["entropy"], ref["entropy"], rtol=2e-5)
    assert row["true_rank_median"] == ref["true_rank_median"]
