"""Every supported family: capture = the MLP hidden layer, weights in one orientation, the
norms folded right (issue 12 item 6). Tiny models from transformers config classes, saved and
loaded the way users load them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from unineurons.analyses.attention import _key_module, attention_scores, bos_keys, head_shape, query_weights
from unineurons.analyses.interventions import final_norm_scale
from unineurons.analyses.roles import RoleConfig, entropy_and_attention
from unineurons.analyses.vocab import folded_unembed, in_directions, out_directions
from unineurons.errors import UnineuronsError
from unineurons.models import ARCHITECTURES, load_model
from unineurons.models.adapters import mlp_shape_from_config

L, D, F, V = 2, 32, 64, 97
_IDS = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=2)
_KW = dict(num_hidden_layers=L, hidden_size=D, num_attention_heads=4, intermediate_size=F,
           max_position_embeddings=32, **_IDS)

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=L, n_embd=D, n_head=4, n_inner=F, n_positions=32, **_IDS),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_KW),
    "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **_KW),
    "mistral": lambda: T.MistralConfig(num_key_value_heads=2, **_KW),
    "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **_KW),
    "qwen3": lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=8, **_KW),
    "gemma": lambda: T.GemmaConfig(num_key_value_heads=2, head_dim=8, **_KW),
    "gemma2": lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0,
                                     attn_implementation="eager", **_KW),
    "olmo": lambda: T.OlmoConfig(**_KW),
    "olmo2": lambda: T.Olmo2Config(**_KW),
    "phi3": lambda: T.Phi3Config(**_KW),
    "gptj": lambda: T.GPTJConfig(n_layer=L, n_embd=D, n_head=4, n_inner=F, n_positions=32,
                                 rotary_dim=4, **_IDS),
    "opt": lambda: T.OPTConfig(num_hidden_layers=L, hidden_size=D, num_attention_heads=4, ffn_dim=F,
                               max_position_embeddings=32, word_embed_proj_dim=D, **_IDS),
}


def _save(family: str, path, config=None):
    torch.manual_seed(0)
    cfg = config or CONFIGS[family]()
    m = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():  # biases are zero at init: randomise so a missing bias would show
            p.normal_(0.0, 0.2)
    m.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def loaded(request, tmp_path_factory):
    path = _save(request.param, tmp_path_factory.mktemp(request.param) / "m")
    return request.param, load_model(str(path), with_tokenizer=False)


def _eps(norm) -> float:
    for name in ("eps", "variance_epsilon"):
        if getattr(norm, name, None) is not None:
            return float(getattr(norm, name))
    return 1e-5  # OLMo's weightless LayerNorm


def _normalise(x: torch.Tensor, norm, layernorm: bool) -> torch.Tensor:
    """The norm without its scale and bias, computed from scratch."""
    x = x.double()
    if layernorm:
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True)
                                                           + _eps(norm))
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm))


def _run(lm, ids, modules):
    """Forward ``ids``, recording the input and output of each named module."""
    seen, hooks = {}, []
    for key, mod in modules.items():
        def hook(_mod, args, kwargs, out, key=key):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[key] = (x.detach(), (out[0] if isinstance(out, tuple) else out).detach())
        hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with lm.adapter.capture(pre_activation=True) as store, torch.no_grad():
            logits = lm.model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, dict(store), logits


def test_family_is_recognised_with_its_sizes(loaded):
    family, lm = loaded
    ad = lm.adapter
    assert ad.family == family and (ad.n_layers, ad.d_mlp, ad.d_model, ad.vocab_size) == (L, F, D, V)
    assert mlp_shape_from_config(lm.model.config) == (L, F)
    assert ad.W_in().shape == (L, D, F) and ad.b_in().shape == (L, F)
    assert ad.W_out().shape == (L, F, D) and ad.b_out().shape == (L, D)
    assert ad.W_U().shape == (D, V) and ad.W_E().shape == (V, D)


def test_capture_is_the_mlp_hidden_layer_and_w_out_rebuilds_the_output(loaded):
    family, lm = loaded
    ad = lm.adapter
    ids = torch.randint(3, V, (3, 11))
    mods = {("pre", i): ad.pre_act_proj(i) for i in range(L)}
    mods |= {("out", i): ad.out_proj(i) for i in range(L)}
    seen, store, _ = _run(lm, ids, mods)
    for layer in range(L):
        x = seen[("pre", layer)][0]  # the MLP's input (after its norm), [B, T, D] or [B*T, D]
        pre = x @ ad.W_in_layer(layer) + ad.b_in_layer(layer)
        got_pre = store[-1 - layer]
        assert got_pre.shape == (3, 11, F)
        torch.testing.assert_close(got_pre, pre.reshape(3, 11, F), atol=1e-5, rtol=1e-5)
        hidden = ad.act_fn(layer)(pre)
        up = ad.W_up_layer(layer)
        if up is not None:  # gated: act(gate(x)) * up(x)
            hidden = hidden * (x @ up)
        assert store[layer].shape == (3, 11, F)
        torch.testing.assert_close(store[layer], hidden.reshape(3, 11, F), atol=1e-5, rtol=1e-5)
        out = seen[("out", layer)][1].reshape(3, 11, D)
        torch.testing.assert_close(store[layer] @ ad.W_out_layer(layer) + ad.b_out()[layer], out,
                                   atol=1e-5, rtol=1e-5)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in lm.model.modules())


def test_norms_fold_into_w_in_w_out_and_w_u(loaded):
    """pre-activation = normalise(h) @ (scale * W_in) + ...; the logits = normalise(x_final) @
    W_U_folded + b_U_folded (then Gemma-2's softcap); post-MLP norms scale w_out."""
    family, lm = loaded
    ad, spec = lm.adapter, lm.adapter.spec
    ids = torch.randint(3, V, (2, 9))
    mods = {"final": ad.final_norm()}
    for layer in range(L):
        mods[("pre", layer)] = ad.pre_act_proj(layer)
        if spec.mlp_norm:
            mods[("norm", layer)] = ad.block_norm(layer, "mlp")
        if spec.post_mlp_norm:
            mods[("post", layer)] = ad.block_norm(layer, "post_mlp")
    seen, store, logits = _run(lm, ids, mods)
    for layer in range(L):
        pre = store[-1 - layer].double().reshape(-1, F)
        w_dir = in_directions(lm, layer).double()  # [F, D], scale folded (centred for LayerNorm)
        if spec.mlp_norm:
            norm = ad.block_norm(layer, "mlp")
            h = _normalise(seen[("norm", layer)][0], norm, spec.layernorm).reshape(-1, D)
        else:
            h = seen[("pre", layer)][0].double().reshape(-1, D)
        # the residual-independent part: the norm's bias through W_in, and b_in
        const = pre - h @ (ad.norm_scale(ad.block_norm(layer, "mlp"))[:, None].double()
                           * ad.W_in_layer(layer).double())
        assert torch.allclose(const, const[:1].expand_as(const), atol=1e-4)
        torch.testing.assert_close(pre - const, h @ w_dir.T, atol=1e-4, rtol=1e-4)
        if spec.post_mlp_norm:
            norm = ad.block_norm(layer, "post_mlp")
            mlp_out = store[layer].double() @ ad.W_out_layer(layer).double()
            want = _normalise(mlp_out, norm, False) * ad.norm_scale(norm).double()
            torch.testing.assert_close(seen[("post", layer)][1].double(), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out_directions(lm, layer).double(),
                                       ad.W_out_layer(layer).double() * ad.norm_scale(norm).double())
    x = _normalise(seen["final"][0], ad.final_norm(), spec.layernorm)
    want = x @ ad.W_U_folded().double() + ad.b_U_folded().double()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        want = cap * torch.tanh(want / cap)
    torch.testing.assert_close(logits.double(), want, atol=1e-4, rtol=1e-4)
    # vocabulary composition reads W_U_folded, centred (and over d_model for LayerNorm)
    w = ad.W_U_folded().double()
    w = w - w.mean(1, keepdim=True)
    if spec.layernorm:
        w = w - w.mean(0, keepdim=True)
    torch.testing.assert_close(folded_unembed(lm).double(), w, atol=1e-5, rtol=1e-5)


def test_intervene_replaces_the_activation(loaded):
    _, lm = loaded
    ad = lm.adapter
    ids = torch.randint(3, V, (2, 7))
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        with ad.intervene(lambda layer, a: a * 0, layers=[1]), ad.capture() as store:
            zeroed = lm.model(input_ids=ids).logits
        again = lm.model(input_ids=ids).logits
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(clean, again)
    assert store[1].shape == (2, 7, F) and store[1].abs().sum() == 0


def test_unsupported_family_lists_every_supported_one(tmp_path):
    T.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                 intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnineuronsError, match="'bert' is not supported; supported: " +
                       ", ".join(sorted(ARCHITECTURES))):
        load_model(str(tmp_path / "bert"))
    assert {"qwen2", "qwen3", "gemma", "gemma2", "mistral", "olmo", "olmo2", "phi3", "gptj",
            "opt"} <= set(ARCHITECTURES)


def test_opt_350m_layout_is_refused(tmp_path):
    cfg = T.OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                      max_position_embeddings=32, word_embed_proj_dim=16,
                      do_layer_norm_before=False, **_IDS)
    path = _save("opt", tmp_path / "opt350", cfg)
    with pytest.raises(UnineuronsError, match="opt-350m"):
        load_model(str(path), with_tokenizer=False)


def test_attention_layout_reads_the_queries_and_keys(loaded):
    """query_weights / bos_keys against the attention modules' own outputs; every family
    gets scores (finite z for a later head), except query/key-normalised ones (NaN, no rows)."""
    family, lm = loaded
    ad, spec = lm.adapter, lm.adapter.spec
    ctx = np.random.default_rng(0).integers(3, V, size=(4, 6))
    per, rows = attention_scores(lm, ctx, n_random=50, z_threshold=0.0, seed=0)
    assert len(per) == L * F
    if spec.qk_norm:
        assert per.attn_max_z.isna().all() and rows.empty and (per.attn_max_head == -1).all()
        return
    assert set(per.attn_max_head_layer[per.layer == 0]) == {1}
    assert per.attn_max_z[per.layer == 0].notna().all() and len(rows) > 0
    h, kv, dh = head_shape(lm)
    key_mod = _key_module(lm, 1)
    seen = {}
    hook = key_mod.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.as_tensor(ctx))
    finally:
        hook.remove()
    x, out = seen["x"].double(), seen["out"].double()  # the normed attention input, its projection
    bias0 = key_mod(torch.zeros(1, D)).double()[0]
    q = torch.einsum("btd,hdk->bthk", x, query_weights(lm, 1).double())  # [B, T, h, dh]
    if spec.attn_layout == "q_k_proj":
        q_mod = ad.attn(1).q_proj
        want = (q_mod(seen["x"]).double() - q_mod(torch.zeros(1, D)).double()[0])
    else:
        n_q = D if spec.attn_layout == "gpt2" else h * dh
        if spec.attn_layout == "neox":
            want = (out - bias0).reshape(*out.shape[:2], h, 3, dh)[..., 0, :]
        else:
            want = (out - bias0)[..., :n_q]
    torch.testing.assert_close(q.reshape(*q.shape[:2], -1), want.reshape(*q.shape[:2], -1),
                               atol=1e-5, rtol=1e-5)
    keys = bos_keys(lm, ctx)  # [L, h, dh]: the key at position 0 (rotary is the identity there)
    if spec.attn_layout == "q_k_proj":
        k0 = out[:, 0].mean(0).reshape(kv, dh).repeat_interleave(h // kv, 0)
    elif spec.attn_layout == "qkv_fused":
        k0 = out[:, 0, h * dh:(h + kv) * dh].mean(0).reshape(kv, dh).repeat_interleave(h // kv, 0)
    elif spec.attn_layout == "gpt2":
        k0 = out[:, 0, D:2 * D].mean(0).reshape(h, dh)
    else:
        k0 = out[:, 0].mean(0).reshape(h, 3, dh)[:, 1]
    torch.testing.assert_close(keys[1].double(), k0, atol=1e-5, rtol=1e-5)


def test_entropy_and_attention_run_and_final_norm_scale(loaded):
    """The analyze stage's weight analyses run on every family; the final-norm scale the
    interventions report is the norm's own 1/std (LayerNorm, OLMo's included) or 1/rms."""
    family, lm = loaded
    ad = lm.adapter
    ctx = np.random.default_rng(1).integers(3, V, size=(4, 8))
    ctx[:, 0] = 0
    cfg = RoleConfig(entropy_null_dims=1, entropy_min_null_frac=0.0, entropy_max_candidates=1,
                     entropy_n_random=1, entropy_n_contexts=2, entropy_values=(0.0,),
                     attn_n_random=20, attn_z=0.5)
    cols, ent, _ = entropy_and_attention(lm, ctx, {"bos_id": 0, "eos_id": 1, "pad_id": 2},
                                         None, cfg)
    assert len(cols) == L * F and len(ent) > 0 and np.isfinite(ent.delta_loss).all()
    x = torch.randn(5, D) * 3 + 1
    norm = ad.final_norm()
    got = final_norm_scale(norm, x, ad.spec.layernorm)
    centred = x - x.mean(-1, keepdim=True) if ad.spec.layernorm else x
    want = (_normalise(x, norm, ad.spec.layernorm) / centred.double())[:, 0]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_plan_reads_every_family_config(loaded):
    """`unineurons correlate --estimate` sizes a model from its config alone: the names of
    layers / MLP width differ per family (n_layer, ffn_dim, intermediate_size...)."""
    from unineurons.correlate.estimate import shape_from_config

    _, lm = loaded
    s = shape_from_config(lm.spec.location)
    assert (s.n_layers, s.d_mlp, s.d_model, s.vocab_size) == (L, F, D, V)
    assert s.n_params == sum(p.numel() for p in lm.model.parameters())
