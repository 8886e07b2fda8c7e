"""Shared fixtures: a tiny corpus, tokenizer and token stores, built once per test session.

- ``tiny_corpus``: a source string ``jsonl:PATH``, ~900 short documents of Python source.
- ``tiny_tokenizer``: a byte-level BPE tokenizer folder, vocab 512, trained on it.
- ``make_gpt2``: a function ``(path, seed, n_layer=2) -> path`` saving a random GPT-2 (width
  32, 2 heads, MLP 64, vocab 512, ctx 64) with the tiny tokenizer.
- ``tiny_store`` / ``tiny_heldout_store``: token store folders (ctx 64; 8192 train tokens =
  128 contexts, 2048 heldout tokens = 32 contexts), seed 0, heldout fraction 0.1.

The others are ``Path``s; open a store with ``TokenStore.open(path)``. Treat them as read-only:
they are shared by every test in the session.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

# No test reaches the network: the hub libraries are offline before anything imports them, so
# the CLI's reachability probe (checks.offline_if_unreachable) never runs; the tests of the
# probe and of the hub cache set the environment themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from unineurons.progress import set_quiet

TINY_CTX = 64
TINY_VOCAB = 512
_PACKAGES = ("json", "email", "collections", "importlib", "concurrent", "urllib", "html",
             "wsgiref", "zoneinfo", "tomllib", "sqlite3")


@pytest.fixture(scope="session", autouse=True)
def _quiet_progress():
    """No progress bars in test output."""
    set_quiet(True)
    yield
    set_quiet(False)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """Source string ``jsonl:PATH``: ~900 documents of ~1-2k characters (~1 MB in all).

    The documents are runs of paragraphs of a few standard-library packages: real text with
    code and newlines, short enough that every small store spans several documents.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("tiny_corpus") / "corpus.jsonl"
    files = sorted(p for pkg in _PACKAGES if (root / pkg).is_dir()
                   for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    with out.open("w", encoding="utf-8") as f:
        for path in files:
            doc = ""
            for block in path.read_text(encoding="utf-8").split("\n\n"):
                doc += block + "\n\n"
                if len(doc) >= 1000:
                    f.write(json.dumps({"text": doc}) + "\n")
                    doc = ""
            if doc.strip():
                f.write(json.dumps({"text": doc}) + "\n")
    return f"jsonl:{out}"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    """Byte-level BPE tokenizer folder (vocab 512; BOS 0, EOS 1, pad 2)."""
    from unineurons.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny") / "tokenizer"
    return train_tokenizer(tiny_corpus, TINY_VOCAB, out, max_chars=300_000)


@pytest.fixture(scope="session")
def tiny_store(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """Train-split token store: 128 contexts of 64 tokens."""
    from unineurons.tokens import build_token_store

    out = tmp_path_factory.mktemp("tiny") / "store_train"
    build_token_store(tiny_corpus, str(tiny_tokenizer), TINY_CTX, 8192, out)
    return out


@pytest.fixture(scope="session")
def tiny_heldout_store(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """Heldout-split token store (no document shared with ``tiny_store``): 32 contexts of 64."""
    from unineurons.tokens import build_token_store

    out = tmp_path_factory.mktemp("tiny") / "store_heldout"
    build_token_store(tiny_corpus, str(tiny_tokenizer), TINY_CTX, 2048, out,
                      split="heldout")
    return out


@pytest.fixture(scope="session")
def make_gpt2(tiny_tokenizer):
    """Save a seeded random 2-layer GPT-2 (d_mlp 64) with the tiny tokenizer at ``path``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    def make(path: Path, seed: int, n_layer: int = 2) -> Path:
        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_inner=64, vocab_size=TINY_VOCAB,
                         n_positions=TINY_CTX, activation_function="gelu_new")
        GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
        AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(path)
        return path

    return make
