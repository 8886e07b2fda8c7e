"""Padded vocabularies (issue 12 item 3): a NeoX whose embedding has more rows than its
tokenizer has tokens (Pythia: 50,304 for 50,277). The padding rows are no tokens: they never
enter vocab.parquet's lists nor the vocabulary moments, whatever their values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from unineurons.analyses.vocab import real_vocab_size, vocab_moments, vocab_table
from unineurons.analyses.weights import weight_columns
from unineurons.models import load_model

N_TOK, ROWS, D, F = 100, 128, 16, 32


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, N_TOK)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _set_padding(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        model.get_input_embeddings().weight[N_TOK:] = value
        model.get_output_embeddings().weight[N_TOK:] = value


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    path = tmp_path_factory.mktemp("pythia") / "m"
    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=D, num_attention_heads=2,
                                         intermediate_size=F, vocab_size=ROWS,
                                         max_position_embeddings=16, tie_word_embeddings=False))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    # padding rows with big values along a direction many neurons share: they would win
    _set_padding(m, 0.0)
    with torch.no_grad():
        m.get_output_embeddings().weight[N_TOK:] = 50 * torch.randn(ROWS - N_TOK, D)
        m.get_input_embeddings().weight[N_TOK:] = 50 * torch.randn(ROWS - N_TOK, D)
    m.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return load_model(str(path))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, d] x [V, d] -> [n, V] cosines."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _reference(lm, side: str) -> dict[str, np.ndarray]:
    """numpy on the unpadded columns only: TransformerLens-style folding and centring."""
    model = lm.model
    out = {k: np.zeros((2, F)) for k in ("mean", "var", "skew", "kurt")}
    for layer in range(2):
        blk = model.gpt_neox.layers[layer]
        if side == "out":
            gamma = model.gpt_neox.final_layer_norm.weight.detach().double().numpy()
            w_u = model.lm_head.weight.detach().double().numpy()[:N_TOK] * gamma  # [V, d]
            w_u = w_u - w_u.mean(0, keepdims=True)  # over the vocabulary
            w_u = w_u - w_u.mean(1, keepdims=True)  # over d_model
            w = blk.mlp.dense_4h_to_h.weight.detach().double().numpy().T  # [F, d]
            cos = _cos(w - w.mean(1, keepdims=True), w_u)
        else:
            w_e = model.gpt_neox.embed_in.weight.detach().double().numpy()[:N_TOK]
            w_e = w_e - w_e.mean(1, keepdims=True)
            gamma = blk.post_attention_layernorm.weight.detach().double().numpy()
            w = blk.mlp.dense_h_to_4h.weight.detach().double().numpy() * gamma  # [F, d]
            cos = _cos(w - w.mean(1, keepdims=True), w_e)
        out["mean"][layer] = cos.mean(1)
        out["var"][layer] = cos.var(1)
        out["skew"][layer] = stats.skew(cos, axis=1)
        out["kurt"][layer] = stats.kurtosis(cos, axis=1, fisher=False)
    return out


def test_real_vocabulary_is_the_tokenizer(padded):
    assert padded.adapter.vocab_size == ROWS and len(padded.tokenizer) == N_TOK
    assert real_vocab_size(padded) == N_TOK and padded.adapter.n_vocab == N_TOK
    # a tokenizer larger than the matrices never counts rows that do not exist
    assert padded.adapter.set_n_vocab(ROWS + 7) == ROWS
    padded.adapter.set_n_vocab(N_TOK)


@pytest.mark.parametrize("side", ["out", "in"])
def test_moments_use_real_tokens_only(padded, side):
    got = vocab_moments(padded, side)
    want = _reference(padded, side)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    cols = weight_columns(padded)
    prefix = "vocab_" if side == "out" else "in_vocab_"
    np.testing.assert_allclose(cols[prefix + "kurt"].to_numpy().reshape(2, F), want["kurt"],
                               rtol=1e-4)


def test_padding_rows_never_in_the_lists_nor_the_moments(padded):
    df = vocab_table(padded, k=20)
    assert len(df) == 2 * 2 * 2 * F * 20 and df.token_id.max() < N_TOK
    assert df.token.notna().all() and (df.token.str.len() > 0).all()
    before = {s: vocab_moments(padded, s) for s in ("out", "in")}
    saved = (padded.model.get_input_embeddings().weight.detach().clone(),
             padded.model.get_output_embeddings().weight.detach().clone())
    try:
        _set_padding(padded.model, -1000.0)  # other padding values: the same statistics
        for s in ("out", "in"):
            for k, v in vocab_moments(padded, s).items():
                np.testing.assert_allclose(v, before[s][k], rtol=1e-5, atol=1e-7)
    finally:
        with torch.no_grad():
            padded.model.get_input_embeddings().weight.copy_(saved[0])
            padded.model.get_output_embeddings().weight.copy_(saved[1])
    try:  # the control: counting the padding rows as tokens puts them in the lists
        padded.adapter.set_n_vocab(ROWS)
        pads = vocab_table(padded, k=20).query("token_id >= @N_TOK")
        assert len(pads) > F and (pads["rank"] == 1).any()
        assert not np.allclose(vocab_moments(padded, "out")["kurt"], before["out"]["kurt"])
    finally:
        padded.adapter.set_n_vocab(N_TOK)


def test_analyze_cli_on_a_padded_model(tiny_tokenizer, tiny_store, tmp_path):
    """`unineurons analyze` on a padded NeoX: vocab.parquet holds real token ids only, the
    moments in neurons.parquet are over them, and the manifest records n_vocab."""
    import json
    import shutil

    import pandas as pd
    from conftest import TINY_CTX, TINY_VOCAB

    from unineurons.cli import main

    path = tmp_path / "pythia"
    torch.manual_seed(1)
    m = GPTNeoXForCausalLM(GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=D, num_attention_heads=2, intermediate_size=F,
        vocab_size=TINY_VOCAB + 64, max_position_embeddings=TINY_CTX, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1))
    with torch.no_grad():
        m.get_output_embeddings().weight[TINY_VOCAB:] = 50 * torch.randn(64, D)
        m.get_input_embeddings().weight[TINY_VOCAB:] = 50 * torch.randn(64, D)
    m.save_pretrained(path)
    for f in Path(tiny_tokenizer).iterdir():
        shutil.copy(f, path / f.name)
    out = tmp_path / "run"
    try:
        main(["analyze", "--model", str(path), "--tokens", str(tiny_store), "--out", str(out),
              "--n-tokens", "1024", "--top-k", "2", "--unigram-top-n", "8", "--vocab-k", "5",
              "--role", "entropy_max_candidates=0", "--role", "entropy_n_random=0"])
    except SystemExit as e:
        assert not e.code
    man = json.loads((out / "manifest.json").read_text())
    assert man["analyze"]["n_vocab"] == {str(path): TINY_VOCAB}
    vocab = pd.read_parquet(out / "vocab.parquet")
    assert len(vocab) > 0 and vocab.token_id.max() < TINY_VOCAB
    lm = load_model(str(path), with_tokenizer=False)
    lm.adapter.set_n_vocab(TINY_VOCAB)
    want = vocab_moments(lm, "out")["kurt"]  # checked against numpy above
    neurons = pd.read_parquet(out / "neurons.parquet").sort_values(["layer", "neuron"])
    np.testing.assert_allclose(neurons.vocab_kurt.to_numpy().reshape(2, F), want, rtol=1e-5)
