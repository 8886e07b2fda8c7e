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

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .corpus import ShuffledDocuments
from .errors import UnineuronsError
from .io import prepare_out_dir, write_json
from .progress import progress

__all__ = ["train_tokenizer", "SPECIAL_TOKENS", "staged_dir", "check_out_dir"]

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
    with progress(f"training BPE ({vocab_size} tokens)", total=None, unit="runs"):
        tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
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
