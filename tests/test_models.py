"""Architecture adapters: capture = the MLP hidden layer, weights in one orientation."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from unineurons.errors import UnineuronsError
from unineurons.models import load_model, parse_model_spec, parse_neuron
from unineurons.models.adapters import neuron_name

FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=97,
                                               n_positions=32, bos_token_id=0, eos_token_id=1)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1)),
}


@pytest.fixture(params=sorted(FAMILIES))
def saved(request, tmp_path):
    torch.manual_seed(0)
    m = FAMILIES[request.param]()
    for p in m.parameters():  # biases are zero at init: randomise so a missing bias would show
        torch.nn.init.normal_(p, std=0.2)
    m.save_pretrained(tmp_path / request.param, safe_serialization=True)
    return request.param, tmp_path / request.param


def test_capture_is_the_mlp_hidden_layer_and_w_out_rebuilds_the_output(saved):
    family, path = saved
    lm = load_model(str(path), with_tokenizer=False)
    ad = lm.adapter
    assert ad.family == family and ad.n_layers == 2 and ad.d_mlp == 64 and ad.d_model == 32
    W_in, b_in, W_out, b_out = ad.W_in(), ad.b_in(), ad.W_out(), ad.b_out()
    assert W_in.shape == (2, 32, 64) and b_in.shape == (2, 64)
    assert W_out.shape == (2, 64, 32) and b_out.shape == (2, 32)
    assert ad.W_U().shape == (32, 97) and ad.W_E().shape == (97, 32)
    ids = torch.randint(0, 97, (3, 11))
    mlp_in, mlp_out = {}, {}
    hooks = []
    def record(mod, args, out, layer):
        mlp_in[layer], mlp_out[layer] = args[0], out  # returns None: observe, do not replace

    for layer in range(2):
        hooks.append(ad.mlp(layer).register_forward_hook(
            lambda mod, args, out, layer=layer: record(mod, args, out, layer)))
    try:
        with ad.capture(pre_activation=True) as store, torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for layer in range(2):
        x = mlp_in[layer]  # [B, T, d_model]
        pre = x @ W_in[layer] + b_in[layer]  # [B, T, d_mlp]
        torch.testing.assert_close(store[-1 - layer], pre, atol=1e-5, rtol=1e-5)
        hidden = ad.act_fn(layer)(pre)
        if family == "llama":  # gated: act(gate(x)) * up(x)
            hidden = hidden * ad.in_proj(layer)(x)
        torch.testing.assert_close(store[layer], hidden, atol=1e-5, rtol=1e-5)
        out = mlp_out[layer][0] if isinstance(mlp_out[layer], tuple) else mlp_out[layer]
        torch.testing.assert_close(store[layer] @ W_out[layer] + b_out[layer], out, atol=1e-5, rtol=1e-5)
    assert not any(m._forward_pre_hooks for m in lm.model.modules())  # hooks removed


def test_intervene_replaces_the_activation(saved):
    _, path = saved
    lm = load_model(str(path), with_tokenizer=False)
    ad = lm.adapter
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        with ad.intervene(lambda layer, a: a * 0, layers=[1]), ad.capture() as store:
            zeroed = lm.model(input_ids=ids).logits
        again = lm.model(input_ids=ids).logits
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(clean, again)
    assert store[1].abs().sum() == 0  # registered after intervene: sees what c_proj receives


def test_unknown_architecture_is_named(tmp_path):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnineuronsError, match=r"'bert' is not supported; supported: .*gpt2, gpt_neox, .*llama"):
        load_model(str(tmp_path / "bert"))


def test_missing_folder_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(UnineuronsError, match="does not exist"):
        parse_model_spec(str(tmp_path / "nope"))
    spec = parse_model_spec("stanford-crfm/alias-gpt2-small-x21@checkpoint-80000")
    assert (spec.location, spec.revision, spec.local) == ("stanford-crfm/alias-gpt2-small-x21",
                                                          "checkpoint-80000", False)
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads HF_HUB_OFFLINE at import: patch the constant, not the variable
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UnineuronsError, match="stanford-crfm/alias-gpt2-small-x21@checkpoint-80000"):
        load_model("stanford-crfm/alias-gpt2-small-x21@checkpoint-80000")


def test_pickle_only_checkpoints_are_refused(tmp_path):
    m = FAMILIES["gpt2"]()
    m.config.save_pretrained(tmp_path / "bin")
    torch.save(m.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(UnineuronsError, match="safetensors"):  # in strict mode (issue 12)
        load_model(str(tmp_path / "bin"), safetensors_only=True)


def test_neuron_addresses_round_trip():
    assert neuron_name(3, 1021) == "L3.N1021"
    assert parse_neuron("L3.N1021") == (3, 1021)
    for bad in ("3.1021", "L3N1021", "L3.Nx", ""):
        with pytest.raises(UnineuronsError, match="L\\{layer\\}.N\\{index\\}"):
            parse_neuron(bad)
