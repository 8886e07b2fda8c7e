"""BPE tokenizer training: a loadable folder, special tokens, determinism, errors."""

from __future__ import annotations

import json

import pytest

from unineurons.errors import UnineuronsError
from unineurons.io import MARKER
from unineurons.tokenizer import SPECIAL_TOKENS, train_tokenizer


def test_autotokenizer_loads_it_with_special_tokens(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == tuple(SPECIAL_TOKENS.values())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "def f(x):\n    return x  # ünïcode ✓ 漢字"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless, no unknown tokens
    assert len(ids) < len(text.encode())  # merges were learned
    info = json.loads((tiny_tokenizer / "training.json").read_text())
    assert info["chars"] == info["max_chars"] == 300_000 and info["vocab_size"] == 512
    assert json.loads((tiny_tokenizer / MARKER).read_text())["kind"] == "tokenizer"


def test_training_is_deterministic_and_replaces_its_folder(tiny_corpus, tmp_path):
    a = train_tokenizer(tiny_corpus, 300, tmp_path / "a", max_chars=50_000)
    b = train_tokenizer(tiny_corpus, 300, tmp_path / "b", max_chars=50_000)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # Retraining into an existing tokenizer folder replaces it as a whole.
    train_tokenizer(tiny_corpus, 320, a, max_chars=50_000)
    assert json.loads((a / "training.json").read_text())["vocab_size"] == 320
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folders left


def test_errors(tmp_path, tiny_corpus):
    with pytest.raises(UnineuronsError, match="too small"):
        train_tokenizer(tiny_corpus, 100, tmp_path / "t")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnineuronsError, match="is empty"):
        train_tokenizer(str(tmp_path / "empty"), 300, tmp_path / "t")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("user data")
    with pytest.raises(UnineuronsError, match="not made by unineurons"):
        train_tokenizer(tiny_corpus, 300, theirs, max_chars=10_000)
    assert (theirs / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "t").exists()
