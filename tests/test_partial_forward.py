"""Forward from a layer (models/partial.py) equals the full forward, for every family."""

from __future__ import annotations

import numpy as np
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

from unineurons.analyses import interventions
from unineurons.analyses.interventions import _patch_fn, make_patch, patch_metrics
from unineurons.models.adapters import get_adapter
from unineurons.models.load import LoadedModel, parse_model_spec
from unineurons.models.partial import record_block_inputs, restart_at

L, V = 4, 97
FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=32, n_head=2, n_inner=64, vocab_size=V,
                                               n_positions=32, bos_token_id=0, eos_token_id=1)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=L, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=V,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, rotary_pct=0.5)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=L, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=V, max_position_embeddings=32, bos_token_id=0, eos_token_id=1)),
}


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def lm(request, tmp_path_factory) -> LoadedModel:
    torch.manual_seed(0)
    m = FAMILIES[request.param]().eval()
    for p in m.parameters():  # zero biases at init would hide a skipped bias
        torch.nn.init.normal_(p, std=0.2)
    spec = parse_model_spec(str(tmp_path_factory.mktemp(request.param)))
    return LoadedModel(spec=spec, model=m, adapter=get_adapter(m), tokenizer=None, weights_sha256="x")


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(2, V, (3, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("patched", [[1], [L - 1], [2, L - 1], [0]])
@torch.inference_mode()
def test_restart_equals_full_patched_forward(lm, patched):
    ad, tokens = lm.adapter, _tokens(0)
    patch = make_patch([(layer, 5 + layer) for layer in patched], [3.0 + layer for layer in patched])
    start = min(patch)
    with record_block_inputs(ad, [start]) as inputs:
        clean = lm.model(input_ids=tokens, use_cache=False).logits
    with ad.intervene(_patch_fn(patch), layers=sorted(patch)):
        full = lm.model(input_ids=tokens, use_cache=False).logits
    calls = []
    hooks = [ad.mlp(i).register_forward_hook(lambda *_a, i=i: calls.append(i)) for i in range(L)]
    try:
        with ad.intervene(_patch_fn(patch), layers=sorted(patch)), restart_at(ad, start, inputs):
            part = lm.model(input_ids=tokens, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(start, L))  # the blocks below the patch did not run
    assert (full - clean).abs().max() > 1e-3  # the patch matters
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    # afterwards the model is whole again
    torch.testing.assert_close(lm.model(input_ids=tokens, use_cache=False).logits, clean)
    assert all("forward" not in vars(b) for b in ad.blocks)


@torch.inference_mode()
def test_restart_reads_the_recorded_residual(lm):
    """The restarted forward uses the recorded residual, not the lower blocks: recorded on
    other tokens, the result is that of the other tokens' prefix (here: differs)."""
    ad = lm.adapter
    with record_block_inputs(ad, [2]) as other:
        lm.model(input_ids=_tokens(1), use_cache=False)
    full = lm.model(input_ids=_tokens(0), use_cache=False).logits
    with restart_at(ad, 2, other):
        wrong = lm.model(input_ids=_tokens(0), use_cache=False).logits
    assert (wrong - full).abs().max() > 1e-3


def test_patch_metrics_match_without_restart(lm, monkeypatch):
    """Entropy confirmation, intervene and ablate all go through patch_metrics: its numbers
    with restarts equal those of full forwards (restart_at disabled)."""
    contexts = np.stack([_tokens(s).numpy()[0] for s in range(5)])
    special = {"bos_id": 0, "eos_id": 1, "pad_id": None}
    patches = [make_patch([(L - 1, 3)], [2.0]), make_patch([(1, 7), (3, 2)], [0.0, -1.0]),
               make_patch([(0, 1)], [4.0]), {}]
    clean, accs = patch_metrics(lm, contexts, special, patches, batch_size=2)
    monkeypatch.setattr(interventions, "restart_at", lambda *a: _null())
    clean_ref, accs_ref = patch_metrics(lm, contexts, special, patches, batch_size=2)
    for a, b in zip([clean, *accs], [clean_ref, *accs_ref], strict=True):
        ra, rb = a.result(), b.result()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k


def _null():
    from contextlib import nullcontext

    return nullcontext()
