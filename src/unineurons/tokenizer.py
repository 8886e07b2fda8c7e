"""Train a byte-level BPE tokenizer on a corpus source.

The result is a folder that ``transformers.AutoTokenizer.from_pretrained(DIR)`` loads, with
BOS ``<|bos|>``, EOS ``<|endoftext|>`` and pad ``<|pad|>`` set, plus ``training.json`` saying
how it was made. Usage::

    unineurons tokenizer train --source stdlib --vocab-size 8192 --out tok/

Training reads at most ``max_chars`` characters of the *train* split (see
:func:`unineurons.corpus.split_of`), taken in seeded order so they sample the whole corpus
rather than its first files; the same input gives the same tokenizer.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .corpus import ShuffledDocuments
from .errors import UnineuronsError
from .io import prepare_out_dir, write_json
from .progress import progress

__all__ = ["train_tokenizer", "SPECIAL_TOKENS", "staged_dir", "check_out_dir", "token_bytes",
           "vocab_strings", "token_strings", "join_pieces"]

#: Special tokens of a unineurons tokenizer, by their transformers attribute name. They get
#: ids 0, 1, 2 (trainer order) so every tokenizer we train agrees on them.
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}

_N_BYTES = 256


def check_out_dir(out: str | os.PathLike, kind: str) -> Path:
    """Raise unless ``out`` is missing, empty, or a unineurons folder of ``kind``; no writes.

    Called before long work so that a bad ``--out`` fails in seconds, not after training.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        prepare_out_dir(out, kind)  # raises unless it is ours and of this kind
    return out


@contextmanager
def staged_dir(out: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``out`` when the block succeeds.

    ``out`` must be missing, empty, or a unineurons folder of ``kind`` (the rules of
    :func:`unineurons.io.prepare_out_dir`); it is checked before any work. On an exception
    the temporary folder is removed and ``out`` is left as it was: no partial output.
    """
    out = check_out_dir(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        prepare_out_dir(tmp, kind)  # the marker travels with the folder
        yield tmp
        # Two renames: a reader never sees a folder that mixes old and new files.
        old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old") if out.exists() else None
        if old is not None:
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(source: str, vocab_size: int, out: str | os.PathLike, *,
                    max_chars: int = 20_000_000, heldout_fraction: float = 0.1) -> Path:
    """Train byte-level BPE on ``source`` and save it to ``out``; return ``out``.

    Uses at most ``max_chars`` characters of the documents in the train split at
    ``heldout_fraction`` (so a heldout token store built at that fraction holds text the
    tokenizer never saw). Deterministic: the same arguments give the same ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < _N_BYTES + len(specials):
        raise UnineuronsError(
            f"vocab size {vocab_size} is too small: byte-level BPE needs the 256 bytes and "
            f"{len(specials)} special tokens; use at least {_N_BYTES + len(specials)}"
        )
    if max_chars < 1:
        raise UnineuronsError(f"--max-chars {max_chars} must be positive")
    check_out_dir(out, "tokenizer")
    docs = ShuffledDocuments(source, "train", heldout_fraction, seed=0, chars_hint=max_chars)
    stats = {"chars": 0, "documents": 0}

    def texts() -> Iterator[str]:
        for doc in docs:
            text = doc.text[: max_chars - stats["chars"]]  # cut exactly at the cap
            stats["chars"] += len(text)
            stats["documents"] += 1
            yield text
            if stats["chars"] >= max_chars:
                return

    # Materialised (max_chars bounds it) so that an empty or unreadable corpus fails with our
    # error before the trainer starts, and the trainer gets an exact length.
    corpus = list(texts())
    if not corpus:
        where = "is empty" if docs.n_documents == 0 else "has no documents in the train split"
        raise UnineuronsError(f"corpus {source} {where}; give a source with text")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
    )
    # the trainer reports nothing while it runs: the bar times it and gives characters/s
    with progress(f"training BPE ({vocab_size} tokens)", total=stats["chars"],
                  unit="chars") as bar:
        tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
        bar.advance(stats["chars"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    with staged_dir(out, "tokenizer") as tmp:
        fast.save_pretrained(str(tmp))
        write_json(tmp / "training.json", {
            "source": str(source), "vocab_size": vocab_size, "trained_vocab_size": len(fast),
            "max_chars": max_chars, "chars": stats["chars"], "documents": stats["documents"],
            "heldout_fraction": heldout_fraction, "special_tokens": SPECIAL_TOKENS,
            "created_by": f"unineurons {__version__}",
        })
    return Path(out)


# ---- token strings ---------------------------------------------------------------------------
# One rule for every tokenizer: a token's text is the bytes it adds to the decoded text, and a
# sequence's token strings are those bytes decoded incrementally as UTF-8. A character made of
# several tokens' bytes (byte-level BPE, SentencePiece byte fallback) belongs to the token that
# completes it; the tokens before it get "". So concatenating a context's token strings gives
# its text, whatever the scheme. The text keeps SentencePiece's leading "▁" as a space on every
# token, the first one included: decoders strip the space the tokenizer prepended to a text,
# but a context or window starts anywhere in a document, and "▁in" is the word " in".

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder_json(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    dec = getattr(backend, "decoder", None)
    if dec is None:
        return ""
    try:
        return dec.__getstate__().decode()  # the decoder's own JSON, without the vocabulary
    except (AttributeError, TypeError, ValueError):
        return ""


def _decode_batch(tokenizer: Any, seqs: list[list[int]]) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # one Rust call
        return backend.decode_batch(seqs, skip_special_tokens=False)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for s in seqs]


def _anchored_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id decoded after a fixed anchor token, the anchor's text removed: a decoder's
    start-of-text rules (strip the prepended space) hit the anchor, not the token."""
    anchor_ids = tokenizer.encode("a", add_special_tokens=False) or [0]
    a = int(anchor_ids[-1])
    prefix = _decode_batch(tokenizer, [[a]])[0]
    both = _decode_batch(tokenizer, [[a, i] for i in ids])
    alone = _decode_batch(tokenizer, [[i] for i in ids])
    return [b[len(prefix):] if b.startswith(prefix) else s for b, s in zip(both, alone, strict=True)]


def _compute_token_bytes(tokenizer: Any) -> list[bytes]:
    n = len(tokenizer)
    ids = list(range(n))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None)
                                             or {}).items()}
    dec = json.loads(_decoder_json(tokenizer) or "{}")
    kinds = set(re.findall(r'"type":\s*"(\w+)"', json.dumps(dec)))
    out: list[bytes | None] = [None] * n
    if "ByteLevel" in kinds:  # GPT-2, GPT-NeoX, SmolLM, Qwen: pieces spell bytes
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        inv = {c: b for b, c in bytes_to_unicode().items()}
        for i, p in enumerate(pieces):
            if i in added or p is None:
                continue
            with contextlib.suppress(KeyError):  # not in the byte alphabet: decoder's text
                out[i] = bytes(inv[c] for c in p)
    if "ByteFallback" in kinds:  # SentencePiece: <0xNN> is one raw byte
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.fullmatch(p or "")
            if m and i not in added:
                out[i] = bytes([int(m.group(1), 16)])
    for i, content in added.items():
        if 0 <= i < n:
            out[i] = content.encode("utf-8")
    rest = [i for i in ids if out[i] is None]
    if rest:  # everything else: the decoder's own text for the token (▁ -> space, ## ...)
        for i, s in zip(rest, _anchored_strings(tokenizer, rest), strict=True):
            out[i] = s.encode("utf-8")
    return out  # type: ignore[return-value]


def token_bytes(tokenizer: Any) -> list[bytes]:
    """``[len(tokenizer)]``: the bytes each token id adds to the decoded text.

    Byte-level BPE pieces map back through the GPT-2 byte alphabet, SentencePiece byte-fallback
    pieces ``<0xNN>`` are their byte, added / special tokens their content (``<|endoftext|>``
    stays text), and any other token the decoder's text for it after an anchor token (so a
    SentencePiece ``▁in`` is `` in``). Cached per tokenizer object.
    """
    with contextlib.suppress(KeyError, TypeError):
        return _CACHE[tokenizer]
    out = _compute_token_bytes(tokenizer)
    with contextlib.suppress(TypeError):  # not weak-referenceable: no cache
        _CACHE[tokenizer] = out
    return out


def join_pieces(pieces: Sequence[bytes]) -> list[str]:
    """Token strings of one sequence from its tokens' bytes: decoded incrementally as UTF-8,
    each character on the token that completes it ("" for the tokens before it), invalid or
    unfinished bytes as U+FFFD. ``"".join(result) == b"".join(pieces).decode("utf-8",
    "replace")``."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(p) for p in pieces]
    tail = dec.decode(b"", final=True)
    if tail:
        out[-1] += tail
    return out


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """``[len(ids)]`` strings of a token sequence (a context or a window) whose concatenation
    is its text (module rule above: SentencePiece's ``▁`` is a space on every token, special
    tokens are their text, ids past the tokenizer, a model's padding rows, are ""). The one
    helper every table, feature and report uses for token text."""
    table = token_bytes(tokenizer)
    n = len(table)
    return join_pieces([table[i] if 0 <= i < n else b"" for i in map(int, ids)])


def vocab_strings(tokenizer: Any, ids: Sequence[int] | None = None) -> list[str]:
    """Each token's own string, out of context (``vocab.parquet``, token-class features): its
    bytes as UTF-8, so a token that is part of a multi-byte character reads U+FFFD. ``ids``
    defaults to the whole tokenizer; ids past it (padding rows) are ""."""
    table = token_bytes(tokenizer)
    ids = range(len(table)) if ids is None else ids
    return [table[i].decode("utf-8", "replace") if 0 <= i < len(table) else ""
            for i in map(int, ids)]
