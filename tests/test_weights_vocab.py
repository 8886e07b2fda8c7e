"""Weight statistics, vocabulary cosines and attention query directions against direct
recomputations (numpy/scipy, HF's own modules), for every supported family (tiny random models
with non-trivial norm scales and biases)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from unineurons.analyses.attention import attention_scores, bos_keys, head_shape, query_directions
from unineurons.analyses.vocab import (
    folded_unembed,
    iter_vocab_cosines,
    vocab_cosines,
    vocab_moments,
    vocab_table,
)
from unineurons.analyses.weights import WEIGHT_COLUMNS, weight_columns
from unineurons.models.load import load_model

FAMILIES = ["gpt2", "gpt_neox", "llama"]
V, D, D_MLP = 96, 32, 48


def _config(family: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=D, n_head=2, n_inner=D_MLP, vocab_size=V,
                          n_positions=32, bos_token_id=0, eos_token_id=1)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=D_MLP, vocab_size=V, max_position_embeddings=32,
                             bos_token_id=0, eos_token_id=1)
    return LlamaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=D_MLP, vocab_size=V,
                       max_position_embeddings=32, bos_token_id=0, eos_token_id=1)


def build_model(family: str, path, seed: int = 0):
    """A tiny random model of ``family`` whose norm scales, norm biases and linear biases are
    all non-trivial (so folding and centring are exercised), saved and loaded back."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                if name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return load_model(str(path))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    return build_model(request.param, tmp_path_factory.mktemp(request.param))


# ---- a direct numpy recomputation from the state dict ----------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def reference_weights(m) -> dict:
    """Per family, from the raw state dict: W_in/W_out as [L, d_mlp, d_model], b_in, the MLP
    norm scale per layer, W_U [d_model, V], W_E [V, d_model], final norm scale, LayerNorm?"""
    sd = m.model.state_dict()
    fam = m.adapter.family
    if fam == "gpt2":
        blk = "transformer.h.{}."
        w_in = [_np(sd[blk.format(i) + "mlp.c_fc.weight"]).T for i in range(2)]  # Conv1D [in, out]
        w_out = [_np(sd[blk.format(i) + "mlp.c_proj.weight"]) for i in range(2)]
        b_in = [_np(sd[blk.format(i) + "mlp.c_fc.bias"]) for i in range(2)]
        g_mlp = [_np(sd[blk.format(i) + "ln_2.weight"]) for i in range(2)]
        w_e, g_f = _np(sd["transformer.wte.weight"]), _np(sd["transformer.ln_f.weight"])
        w_u = _np(sd["lm_head.weight"]).T
        ln = True
    elif fam == "gpt_neox":
        blk = "gpt_neox.layers.{}."
        w_in = [_np(sd[blk.format(i) + "mlp.dense_h_to_4h.weight"]) for i in range(2)]
        w_out = [_np(sd[blk.format(i) + "mlp.dense_4h_to_h.weight"]).T for i in range(2)]
        b_in = [_np(sd[blk.format(i) + "mlp.dense_h_to_4h.bias"]) for i in range(2)]
        g_mlp = [_np(sd[blk.format(i) + "post_attention_layernorm.weight"]) for i in range(2)]
        w_e, g_f = _np(sd["gpt_neox.embed_in.weight"]), _np(sd["gpt_neox.final_layer_norm.weight"])
        w_u = _np(m.model.get_output_embeddings().weight).T
        ln = True
    else:
        blk = "model.layers.{}."
        w_in = [_np(sd[blk.format(i) + "mlp.gate_proj.weight"]) for i in range(2)]
        w_out = [_np(sd[blk.format(i) + "mlp.down_proj.weight"]).T for i in range(2)]
        b_in = [np.zeros(D_MLP) for _ in range(2)]  # Llama's MLP has no bias
        g_mlp = [_np(sd[blk.format(i) + "post_attention_layernorm.weight"]) for i in range(2)]
        w_e, g_f = _np(sd["model.embed_tokens.weight"]), _np(sd["model.norm.weight"])
        w_u = _np(m.model.get_output_embeddings().weight).T
        ln = False
    return {"w_in": np.stack(w_in), "w_out": np.stack(w_out), "b_in": np.stack(b_in),
            "g_mlp": np.stack(g_mlp), "w_e": w_e, "w_u": w_u, "g_f": g_f, "ln": ln}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of a [n, d] against rows of b [V, d]."""
    return (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]


def reference_cosines(r: dict, layer: int, side: str) -> np.ndarray:
    """[d_mlp, V] cosines following the documented recipe step by step."""
    if side == "out":
        w_u = r["g_f"][:, None] * r["w_u"]  # fold the final norm scale
        w_u = w_u - w_u.mean(axis=1, keepdims=True)  # centre over the vocabulary
        w = r["w_out"][layer]
        if r["ln"]:  # LayerNorm removes the mean over d_model
            w_u = w_u - w_u.mean(axis=0, keepdims=True)
            w = w - w.mean(axis=1, keepdims=True)
        return _cos(w, w_u.T)
    w = r["w_in"][layer] * r["g_mlp"][layer][None, :]  # fold the MLP norm scale
    w_e = r["w_e"]
    if r["ln"]:
        w, w_e = w - w.mean(1, keepdims=True), w_e - w_e.mean(1, keepdims=True)
    return _cos(w, w_e)


# ---- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["out", "in"])
def test_vocab_cosines_match_numpy(tiny, side):
    r = reference_weights(tiny)
    for layer in range(2):
        got = vocab_cosines(tiny, layer, side=side).numpy()
        np.testing.assert_allclose(got, reference_cosines(r, layer, side), atol=2e-6, rtol=0)
    every = vocab_cosines(tiny, None, side=side).numpy()  # row layer * d_mlp + neuron
    assert every.shape == (2 * D_MLP, V)
    np.testing.assert_allclose(every[D_MLP + 5], reference_cosines(r, 1, side)[5], atol=2e-6)


def test_weight_columns_match_numpy(tiny):
    r = reference_weights(tiny)
    df = weight_columns(tiny)
    assert list(df.columns) == ["model", "layer", "neuron", *WEIGHT_COLUMNS]
    assert len(df) == 2 * D_MLP and (df["model"] == tiny.name).all()
    assert (df["layer"].to_numpy() == np.repeat([0, 1], D_MLP)).all()
    assert (df["neuron"].to_numpy() == np.tile(np.arange(D_MLP), 2)).all()
    n_in = np.linalg.norm(r["w_in"], axis=2).reshape(-1)
    n_out = np.linalg.norm(r["w_out"], axis=2).reshape(-1)
    np.testing.assert_allclose(df["w_in_norm"], n_in, rtol=1e-6)
    np.testing.assert_allclose(df["w_out_norm"], n_out, rtol=1e-6)
    np.testing.assert_allclose(df["b_in"], r["b_in"].reshape(-1), atol=1e-7)
    cos = (r["w_in"] * r["w_out"]).sum(2).reshape(-1) / (n_in * n_out)
    np.testing.assert_allclose(df["in_out_cos"], cos, atol=1e-6)
    np.testing.assert_allclose(df["l2_penalty"], n_in**2 + n_out**2, rtol=1e-6)
    for side, prefix in (("out", "vocab_"), ("in", "in_vocab_")):
        c = np.concatenate([reference_cosines(r, layer, side) for layer in range(2)])  # [n, V]
        np.testing.assert_allclose(df[prefix + "mean"], c.mean(1), atol=1e-6)
        np.testing.assert_allclose(df[prefix + "var"], c.var(1), rtol=1e-4)
        np.testing.assert_allclose(df[prefix + "skew"], stats.skew(c, axis=1), atol=2e-4)
        np.testing.assert_allclose(df[prefix + "kurt"], stats.kurtosis(c, axis=1, fisher=False),
                                   atol=2e-4)


def test_blocks_do_not_change_results(tiny):
    """A budget of a few neurons per block gives the one-block answer (up to float32 matmul
    rounding, which depends on the block shape)."""
    small = 7 * V * 48  # 7 neurons per block in vocab_moments, 84 in the cosine iterator
    whole = vocab_moments(tiny, "out")
    parts = vocab_moments(tiny, "out", max_bytes=small)
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], rtol=1e-5, atol=1e-6)
    blocks = list(iter_vocab_cosines(tiny, "in", [1], max_bytes=3 * V * 4))
    assert [len(i) for _, i, _ in blocks] == [3] * (D_MLP // 3)
    np.testing.assert_allclose(torch.cat([c for _, _, c in blocks]).numpy(),
                               vocab_cosines(tiny, 1, side="in").numpy(), atol=1e-6, rtol=0)


def test_cosines_ignore_what_the_model_ignores(tiny):
    """Softmax ignores a logit shift shared by all tokens; LayerNorm ignores the residual's
    mean. Adding either to the weights must leave the cosines unchanged, and only then."""
    before = vocab_cosines(tiny, 0).clone()
    head = tiny.model.get_output_embeddings().weight  # [V, d]
    w_out = tiny.adapter.out_proj(0).weight  # Conv1D [d_mlp, d] or Linear [d, d_mlp]
    with torch.no_grad():
        shift = 0.05 * torch.randn(D)  # the size of the weights: float32 centring stays exact
        head += shift[None, :]  # every token's unembedding column moves by the same vector
        torch.testing.assert_close(vocab_cosines(tiny, 0), before, atol=2e-6, rtol=0)
        head -= shift[None, :]
        ones = torch.ones_like(w_out)
        w_out += 0.3 * ones  # a constant over d_model in every neuron's w_out
        after = vocab_cosines(tiny, 0)
        w_out -= 0.3 * ones
    if tiny.adapter.family == "llama":  # RMSNorm keeps the mean: the cosines must move
        assert (after - before).abs().max() > 1e-2
    else:
        torch.testing.assert_close(after, before, atol=2e-6, rtol=0)


def test_folded_unembed_is_centred(tiny):
    w_u = folded_unembed(tiny).double()
    assert w_u.mean(1).abs().max() < 1e-6  # over the vocabulary
    if tiny.adapter.family != "llama":
        assert w_u.mean(0).abs().max() < 1e-6  # over d_model


class _FakeTokenizer:
    def decode(self, ids):
        return f"<{ids[0]}>"


def test_vocab_table_top_and_bottom(tiny):
    neurons = [(1, 3), (0, 10)]
    df = vocab_table(tiny, _FakeTokenizer(), neurons, k=4)
    assert list(df.columns) == ["model", "layer", "neuron", "side", "direction", "rank",
                                "token_id", "token", "cosine"]
    assert len(df) == 2 * 2 * 2 * 4
    r = reference_weights(tiny)
    for side in ("out", "in"):
        ref = reference_cosines(r, 1, side)[3]
        sel = df[(df.layer == 1) & (df.neuron == 3) & (df.side == side)]
        top = sel[sel.direction == "top"].sort_values("rank")
        bottom = sel[sel.direction == "bottom"].sort_values("rank")
        assert top["token_id"].tolist() == np.argsort(-ref)[:4].tolist()
        assert bottom["token_id"].tolist() == np.argsort(ref)[:4].tolist()
        np.testing.assert_allclose(top["cosine"], np.sort(ref)[::-1][:4], atol=2e-6)
        np.testing.assert_allclose(bottom["cosine"], np.sort(ref)[:4], atol=2e-6)
        assert top["token"].tolist() == [f"<{i}>" for i in top["token_id"]]
    no_tok = vocab_table(dataclasses.replace(tiny, tokenizer=None), None, [(0, 0)], k=2)
    assert no_tok["token"].isna().all() and len(no_tok) == 8


# ---- attention query directions ------------------------------------------------------------
def reference_query_directions(m, contexts: np.ndarray, layer: int) -> torch.Tensor:
    """``[n_heads, d_model]`` straight from the HF modules: the BOS hidden state from
    ``output_hidden_states``, the block's own norm and projections, and W_Q as the Jacobian of
    the head's query with respect to the normed input (so no index bookkeeping is shared with
    the code under test)."""
    fam = m.adapter.family
    model = m.model
    d = m.adapter.d_model
    tokens = torch.from_numpy(contexts.astype(np.int64))
    with torch.no_grad():
        hs = model(input_ids=tokens, output_hidden_states=True).hidden_states[layer][:, 0]
    if fam == "gpt2":
        block = model.transformer.h[layer]
        norm, attn = block.ln_1, block.attn
        h = attn.num_heads

        def qk(x):
            q, k, _ = attn.c_attn(x).split(d, dim=-1)
            return q.view(h, -1), k.view(h, -1)
    elif fam == "gpt_neox":
        block = model.gpt_neox.layers[layer]
        norm, attn = block.input_layernorm, block.attention
        h = model.config.num_attention_heads

        def qk(x):
            q, k, _ = attn.query_key_value(x).view(h, -1).chunk(3, dim=-1)
            return q, k
    else:
        block = model.model.layers[layer]
        norm, attn = block.input_layernorm, block.self_attn
        h, kv = model.config.num_attention_heads, model.config.num_key_value_heads

        def qk(x):
            k = attn.k_proj(x).view(kv, -1)
            return attn.q_proj(x).view(h, -1), k.repeat_interleave(h // kv, dim=0)
    with torch.no_grad():
        k_bos = torch.stack([qk(norm(x))[1] for x in hs]).mean(0)  # [h, dh]
    x0 = norm(hs[0]).detach()
    jac = torch.autograd.functional.jacobian(lambda x: qk(x)[0], x0)  # [h, dh, d]
    q_dir = torch.einsum("hkd,hk->hd", jac, k_bos) * k_bos.shape[1] ** -0.5
    q_dir = q_dir * norm.weight.detach()[None, :]  # the norm's scale, folded
    if isinstance(norm, torch.nn.LayerNorm):
        q_dir = q_dir - q_dir.mean(1, keepdim=True)
    return q_dir.detach()


def test_attention_scores_match_reference(tiny):
    """Query directions and scores against HF's own modules (GPT-2's split c_attn, GPT-NeoX's
    per-head interleaved qkv, Llama's grouped-query heads)."""
    m = tiny
    ctx = np.random.default_rng(0).integers(3, V, size=(3, 12))
    ctx[:, 0] = 0
    n_heads = head_shape(m)[0]
    got = query_directions(m, bos_keys(m, ctx, n_contexts=3))  # [L, h, d]
    for layer in range(2):
        torch.testing.assert_close(got[layer], reference_query_directions(m, ctx, layer),
                                   atol=1e-5, rtol=1e-4)
    per, rows = attention_scores(m, ctx, n_random=200, z_threshold=1e-12, seed=1)
    assert len(per) == 2 * D_MLP and len(rows) == D_MLP * n_heads  # layer-0 neuron x later head
    w = m.adapter.W_out()[0].double()  # [d_mlp, d]
    ref = (w / w.norm(dim=1, keepdim=True)) @ reference_query_directions(m, ctx, 1).double().T
    got_score = rows.pivot(index="neuron", columns="head", values="score").to_numpy()
    np.testing.assert_allclose(got_score, ref.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(rows.z, (rows.score - rows.baseline_mean) / rows.baseline_std,
                               rtol=1e-9)
    last = per[per.layer == 1]  # no later head
    assert last.attn_max_z.isna().all() and (last.attn_max_head == -1).all()
    assert (last.attn_n_heads == 0).all()
