"""The token-feature interface and its built-in library."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unineurons import features as F
from unineurons.errors import UnineuronsError
from unineurons.features import (
    Feature,
    TokenContext,
    Vocabulary,
    evaluate_features,
    get_features,
    load_feature_module,
    register_feature,
    register_token_class,
    token_class_from_file,
)

STRINGS = ["<bos>", " The", "the", "HTML", " 42", "3.14", ",", "\n", " (", ")", '"', "ing",
           " world", "!", "1,000", " I", "A", "..."]
SPECIAL = [0]


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(STRINGS, special_ids=SPECIAL)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the feature registry, so tests can register freely."""
    monkeypatch.setattr(F, "FEATURES", dict(F.FEATURES))
    return F.FEATURES


def members(vocab: Vocabulary, name: str) -> set[str]:
    ids = np.arange(len(vocab))[None, :]
    on = F.FEATURES[name](TokenContext(ids, vocab))[0]
    return {vocab.strings[i] for i in np.nonzero(on)[0]}


@pytest.mark.parametrize("name, expected", [
    ("leading_space", {" The", " 42", " (", " world", " I"}),
    ("capitalised", {" The", "HTML", " I", "A"}),
    ("all_caps", {"HTML"}),
    ("digit", {" 42"}),
    ("number", {" 42", "3.14", "1,000"}),
    ("punctuation", {",", " (", ")", '"', "!", "..."}),
    ("newline", {"\n"}),
    ("open_bracket", {" ("}),
    ("close_bracket", {")"}),
    ("quote", {'"'}),
])
def test_token_classes(vocab, name, expected):
    assert members(vocab, name) == expected


def test_special_tokens_have_no_class(vocab):
    v = Vocabulary(["<|x|>", "A"], special_ids=[0])
    assert not v.lookup(lambda s: True)[0]
    assert v.lookup(lambda s: True)[1]


def test_lookup_is_cached_and_vectorised(vocab):
    calls = []

    def pred(s):
        calls.append(s)
        return s.startswith(" ")

    t1, t2 = vocab.lookup(pred), vocab.lookup(pred)
    assert t1 is t2 and len(calls) == len(vocab)  # one call per vocabulary entry, once


def test_within_word():
    v = Vocabulary(["<bos>", " hel", "lo", " world", "!", "ab", "cd"], special_ids=[0])
    ids = np.array([[0, 1, 2, 3, 4, 5, 6], [2, 2, 5, 4, 1, 2, 3]])
    got = F.FEATURES["within_word"](TokenContext(ids, v))
    expect = np.array([[0, 0, 1, 0, 0, 0, 1], [0, 1, 1, 0, 0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(got, expect)


def test_token_context_prev_and_strings(vocab):
    ids = np.array([[0, 1, 2], [3, 4, 5]])
    ctx = TokenContext(ids, vocab)
    np.testing.assert_array_equal(ctx.prev_ids(), [[0, 0, 1], [3, 3, 4]])
    assert ctx.strings()[1].tolist() == ["HTML", " 42", "3.14"]


def test_evaluate_features_shape(vocab):
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    fs = get_features(["capitalised", "digit", "within_word"])
    out = evaluate_features(fs, TokenContext(ids, vocab))
    assert out.shape == (2, 4, 3) and out.dtype == bool
    np.testing.assert_array_equal(out[..., 0], F.FEATURES["capitalised"](TokenContext(ids, vocab)))
    assert evaluate_features([], TokenContext(ids, vocab)).shape == (2, 4, 0)


def test_token_class_file(tmp_path, vocab):
    p = tmp_path / "mine.txt"
    p.write_text(" The\nthe\n\n!\n", encoding="utf-8")
    f = token_class_from_file(p)
    assert f.name == "mine"
    on = f(TokenContext(np.arange(len(vocab))[None], vocab))[0]
    assert {vocab.strings[i] for i in np.nonzero(on)[0]} == {" The", "the", "!"}
    with pytest.raises(UnineuronsError, match="does not exist"):
        token_class_from_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UnineuronsError, match="lists no tokens"):
        token_class_from_file(tmp_path / "empty.txt")


def test_register_decorators(registry, vocab):
    @register_token_class("is_the", "the word the")
    def is_the(s: str) -> bool:
        return s.strip().lower() == "the"

    @register_feature("after_the")
    def after_the(ctx: TokenContext) -> torch.Tensor:
        """the previous token is the"""
        return torch.from_numpy(ctx.vocab.lookup(is_the)[ctx.prev_ids()])  # tensors accepted

    ids = np.array([[1, 3, 2, 4]])
    ctx = TokenContext(ids, vocab)
    assert registry["is_the"](ctx).tolist() == [[True, False, True, False]]
    assert registry["after_the"](ctx).tolist() == [[True, True, False, True]]
    assert registry["after_the"].description == "the previous token is the"


def test_feature_module(tmp_path, registry):
    p = tmp_path / "myfeats.py"
    p.write_text(
        "from unineurons.features import register_token_class\n"
        "@register_token_class('has_x')\n"
        "def has_x(s):\n    return 'x' in s\n")
    assert load_feature_module(p) == ["has_x"]
    assert "has_x" in registry
    with pytest.raises(UnineuronsError, match="not a .py file"):
        load_feature_module(tmp_path / "missing.py")


def test_bad_shape_and_names(vocab):
    bad = Feature("bad", lambda ctx: np.zeros(3, dtype=bool))
    with pytest.raises(UnineuronsError, match="returned shape"):
        bad(TokenContext(np.zeros((2, 4), dtype=np.int64), vocab))
    with pytest.raises(UnineuronsError, match="unknown feature"):
        get_features(["nope"])
    with pytest.raises(UnineuronsError, match="two features are named"):
        get_features(["digit"], [Feature("digit", lambda c: c.token_ids > 0)])


def test_vocabulary_from_tokenizer(tiny_tokenizer):
    from unineurons.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer))
    v = Vocabulary.from_tokenizer(tok, size=len(tok) + 3)
    assert len(v) == len(tok) + 3
    for i in (5, 100, 300, len(tok) - 1):
        assert v.strings[i] == tok.decode([i], clean_up_tokenization_spaces=False)
    assert v.strings[len(tok)] == ""  # padded ids beyond the tokenizer
    assert set(v.special_ids) >= {tok.bos_token_id, tok.eos_token_id}
