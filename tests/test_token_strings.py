"""Token strings concatenate to the text, for SentencePiece (Llama-2 / Mistral style, byte
fallback) and byte-level BPE alike, and every feature and table uses them (issue 12 item 4).
The tokenizers are built offline with the `tokenizers` library."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unineurons.features import FEATURES, TokenContext, Vocabulary
from unineurons.tokenizer import join_pieces, token_bytes, token_strings, vocab_strings

CORPUS = ["elif hasattr(x, name): the cat sat in the hat", "in the beginning was the word",
          "def main():\n    return the value in it", "the thin thing is in the inn"] * 5
TEXTS = ["elif hasattr(x, 'in'): print(the)", "The cost is 5€ in total, café",
         "  two spaces\nand a newline in it", "€€ é"]


def _sentencepiece(style: str) -> PreTrainedTokenizerFast:
    """A BPE with byte fallback: '€' and 'é' are not in its alphabet, so they become <0xNN>
    tokens. ``llama``: Llama-2's normalizer + Replace/ByteFallback/Fuse/Strip decoder;
    ``metaspace``: the Metaspace pre-tokenizer and decoder (newer Mistral / Llama files)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if style == "llama":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    for b in range(256):  # SentencePiece keeps its byte pieces in the model vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in state["model"]["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    if style == "llama":
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="first")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 / NeoX / SmolLM style: byte-level BPE; '€' stays three byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["llama", "metaspace", "byte_level"])
def tok(request):
    return request.param, (_byte_level() if request.param == "byte_level"
                           else _sentencepiece(request.param))


def _ids(t, text: str) -> list[int]:
    return t.encode(text, add_special_tokens=False)


def test_concatenation_is_the_text(tok):
    style, t = tok
    for text in TEXTS:
        ids = _ids(t, text)
        strings = token_strings(t, ids)
        joined = "".join(strings)
        # SentencePiece prepends a space to a text; its token keeps it (the decoder strips it)
        # (Metaspace "first" does not add one to a text that starts with a space)
        want = (text if style == "byte_level" or (style == "metaspace" and text[0] == " ")
                else " " + text)
        assert joined == want, (style, text, strings)
        hf = t.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert hf == (joined if style == "byte_level" else joined[1:])


def test_word_initial_tokens_keep_their_space(tok):
    style, t = tok
    ids = _ids(t, "elif hasattr(x, name): in the")
    strings = token_strings(t, ids)
    assert "".join(strings).lstrip(" ") == "elif hasattr(x, name): in the"
    pieces = t.convert_ids_to_tokens(ids)
    for i, (p, s) in enumerate(zip(pieces, strings, strict=True)):
        if style != "byte_level":  # a piece spelt with ▁ is a word-initial token: its space shows
            assert s.startswith(" ") == p.startswith("▁"), (p, s)
            assert vocab_strings(t, [ids[i]]) == [p.replace("▁", " ")]
    assert strings[-1].startswith(" ") or strings[-2].startswith(" ")  # "the" starts a word
    vocab = Vocabulary.from_tokenizer(t)
    ctx = TokenContext(np.asarray([ids]), vocab)
    lead = FEATURES["leading_space"](ctx)[0]
    within = FEATURES["within_word"](ctx)[0]
    for i, s in enumerate(strings):
        assert lead[i] == s.startswith(" ")
        if s.startswith(" "):
            assert not within[i]  # a word-initial token does not continue a word
    assert lead.sum() >= 3  # word-initial tokens exist in every scheme


def test_a_character_split_over_tokens_goes_to_the_token_completing_it(tok):
    style, t = tok
    ids = _ids(t, "5€")
    raw = token_bytes(t)
    euro = "€".encode()
    tail = [raw[i] for i in ids][-3:]
    assert tail == [euro[:1], euro[1:2], euro[2:]]  # three single-byte tokens
    strings = token_strings(t, ids)
    assert strings[-3:] == ["", "", "€"]
    assert vocab_strings(t, ids[-3:]) == ["\ufffd"] * 3  # out of context: not a character
    # a window cut inside the character: orphan bytes read U+FFFD, still one per token rule
    assert "".join(token_strings(t, ids[-2:])) == euro[1:].decode("utf-8", "replace")
    assert "".join(token_strings(t, ids[:-1])) == (b"".join(raw[i] for i in ids[:-1])
                                                   .decode("utf-8", "replace"))


def test_vocabulary_windows_concatenate_like_token_strings(tok):
    _, t = tok
    vocab = Vocabulary.from_tokenizer(t, size=len(t) + 5)  # a padded model: 5 rows past it
    ids = _ids(t, TEXTS[1]) + [len(t) + 2]
    assert vocab.strings[len(t) + 2] == "" and vocab.partial.sum() > 0
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=4, replace=False))
    offsets = np.concatenate([[0], cuts, [len(ids)]])
    got = vocab.sequence_strings(np.asarray(ids), offsets)
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        assert list(got[a:b]) == token_strings(t, ids[a:b])
    ctx = TokenContext(np.asarray([ids[:8], ids[-8:]]), vocab)
    for row, s in zip(ctx.token_ids, ctx.strings(), strict=True):
        assert list(s) == token_strings(t, row)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=4), min_size=1, max_size=12))
def test_join_pieces_is_incremental_utf8(pieces):
    out = join_pieces(pieces)
    assert len(out) == len(pieces)
    assert "".join(out) == b"".join(pieces).decode("utf-8", "replace")
    full = "".join(out)
    for i in range(len(pieces) - 1):  # incremental: what a prefix of tokens shows is final
        assert full.startswith("".join(out[:i + 1]))
        try:  # a prefix ending on a character boundary shows exactly its text
            text = b"".join(pieces[:i + 1]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert "".join(out[:i + 1]) == text


def test_vocab_table_shows_the_space(tmp_path):
    """vocab.parquet's token column reads ' the' for '▁the', not 'the'."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unineurons.analyses.vocab import vocab_table
    from unineurons.models import load_model

    t = _sentencepiece("llama")
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=len(t),
                                     max_position_embeddings=16))
    m.save_pretrained(tmp_path / "m")
    t.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    df = vocab_table(lm, k=len(t))  # every token appears in every list
    words = {i: p for p, i in t.get_vocab().items() if p.startswith("▁") and len(p) > 2}
    assert len(words) > 5
    for i, p in words.items():  # e.g. ▁the reads " the"
        assert set(df.loc[df.token_id == i, "token"]) == {p.replace("▁", " ")}


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abcehilnst ,\n€é字😀")), min_size=1,
                    max_size=30))
def test_any_text_round_trips(tok, text):
    """Whatever the text (multi-byte characters split into byte tokens included), its token
    strings concatenate to it, and the tokenizer's own decode agrees."""
    style, t = tok
    ids = _ids(t, text)
    joined = "".join(token_strings(t, ids))
    if style == "byte_level":
        assert joined == text
    else:  # the prepended SentencePiece space, if the tokenizer added one
        assert joined in (text, " " + text)
        assert joined[1:] == t.decode(ids, skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
