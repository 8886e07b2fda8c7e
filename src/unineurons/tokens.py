"""The token store: a corpus split, tokenized once, as fixed-length contexts on disk.

A store is a folder with ``tokens.npy`` (``[n_contexts, ctx]``, uint16 when every token id
fits, else uint32; memory-mapped when read) and ``manifest.json`` (documented in
docs/tables.md). Every row is BOS followed by ``ctx - 1`` tokens of one continuous stream
``doc EOS doc EOS ...``; documents come in a seeded random order and belong to the train or
heldout split by a hash of their text, so the two splits never share a document. Usage::

    unineurons tokens build --source stdlib --tokenizer tok/ --ctx 512 --n-tokens 1000000 \\
        --out store/
    store = TokenStore.open("store/")
    batch = store.contexts(n_tokens=65536)          # (n, ctx) rows in store order

The same inputs give a byte-identical ``tokens.npy``.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .corpus import ShuffledDocuments
from .errors import UnineuronsError
from .io import check_free_disk, read_json, sha256_file, write_json
from .lock import sweep_stale_staging
from .models.load import load_tokenizer, vocab_fingerprint
from .progress import progress
from .tokenizer import check_out_dir, staged_dir

__all__ = ["TokenStore", "build_token_store", "FORMAT_VERSION", "newline_token_ids"]

#: Bumped when the layout or a key's meaning changes; newer stores are refused, not misread.
FORMAT_VERSION = 1

#: An English byte-level BPE averages about 4 characters per token. Underestimating only
#: costs one more read of the corpus (see ShuffledDocuments), never correctness.
_CHARS_PER_TOKEN = 4
_BATCH_CHARS = 1 << 20  # text per encode_batch call: big enough for Rust's parallelism

_MANIFEST_KEYS = ("format_version", "kind", "source", "tokenizer", "ctx", "n_contexts",
                  "n_tokens", "split", "seed", "heldout_fraction", "dtype", "sha256",
                  "n_documents", "created_by")


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens that decode to whitespace containing a newline (the paper drops them)."""
    ids = sorted(tokenizer.get_vocab().values())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # one Rust call instead of a Python loop over the vocabulary
        strings = backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    else:
        strings = [tokenizer.decode([i], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False) for i in ids]
    return [i for i, s in zip(ids, strings, strict=True) if s.isspace() and "\n" in s]


def _encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoding without special tokens (BOS/EOS are placed by the store itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: parallel, and no "sequence longer than the model"
        # warnings for long documents, which the store chops anyway. encode_batch_fast skips
        # the character offsets we do not use (~25% faster).
        enc = getattr(backend, "encode_batch_fast", backend.encode_batch)
        # A document that contains the text "<|endoftext|>" is text, not a document boundary:
        # only the store places special tokens, so BOS/EOS positions mean what they say.
        backend.encode_special_tokens = True
        return lambda texts: [e.ids for e in enc(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def _fill(arr: np.ndarray, docs: Iterable, encode: Callable, eos: int, bar: Any) -> tuple[int, int]:
    """Write the stream ``doc EOS doc EOS ...`` into ``arr[:, 1:]`` row by row until full.

    Returns (stream tokens written, documents that contributed at least one token).
    """
    need = arr.shape[0] * (arr.shape[1] - 1)
    pos = n_docs = 0
    docs = iter(docs)
    while pos < need:
        # Batches shrink near the end so a small store does not tokenize a megabyte.
        limit = min(_BATCH_CHARS, (need - pos) * _CHARS_PER_TOKEN + 4096)
        batch, size = [], 0
        for doc in docs:
            batch.append(doc.text)
            size += len(doc.text)
            if size >= limit:
                break
        if not batch:
            break  # the split ran out
        for ids in encode(batch):
            n_docs += 1
            ids = np.asarray(ids + [eos], dtype=arr.dtype)[: need - pos]
            _write_stream(arr, pos, ids)
            pos += len(ids)
            bar.advance(len(ids))
            if pos == need:
                break
    return pos, n_docs


def build_token_store(source: str, tokenizer: str | os.PathLike, ctx: int, n_tokens: int,
                      out: str | os.PathLike, split: str = "train", seed: int = 0,
                      heldout_fraction: float = 0.1) -> TokenStore:
    """Tokenize ``ceil(n_tokens / ctx)`` contexts of one split of ``source`` into ``out``.

    A corpus split with fewer tokens gives as many full contexts as it has; one with less
    than a single context is an error. Only as many documents as needed are tokenized.
    ``out`` is replaced as a whole at the end (nothing is left behind on failure) and must
    be new, empty or an existing token store.
    """
    if ctx < 2:
        raise UnineuronsError(f"--ctx {ctx} is too small: a context is BOS plus at least one token")
    if n_tokens < 1:
        raise UnineuronsError(f"--n-tokens {n_tokens} must be positive")
    if split not in ("train", "heldout"):
        raise UnineuronsError(f"split {split!r} is not one of: train, heldout")
    if str(tokenizer).startswith((".", "/", "~")) and not Path(tokenizer).expanduser().exists():
        raise UnineuronsError(
            f"tokenizer {tokenizer} does not exist; train one with `unineurons tokenizer train` "
            "or give a hub id such as gpt2"
        )
    tok_local = Path(tokenizer).expanduser().is_dir()
    tok = load_tokenizer(str(tokenizer))
    eos = tok.eos_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos  # GPT-2 style: BOS = EOS
    if eos is None:
        raise UnineuronsError(
            f"tokenizer {tokenizer} has no EOS token, which the store puts between documents; "
            "use a tokenizer with eos_token set"
        )
    max_id = max(tok.get_vocab().values())
    dtype = np.dtype(np.uint16 if max_id <= np.iinfo(np.uint16).max else np.uint32)
    n_contexts = math.ceil(n_tokens / ctx)
    body = ctx - 1
    need = n_contexts * body  # stream tokens wanted: each row is BOS + body
    check_out_dir(out, "tokens")
    sweep_stale_staging(out)  # hidden folders of a build that was killed (or crashed)
    check_free_disk(Path(out).parent, n_contexts * ctx * dtype.itemsize + (1 << 20), "token store")
    docs = ShuffledDocuments(str(source), split, heldout_fraction, seed,
                             chars_hint=need * _CHARS_PER_TOKEN)
    encode = _encoder(tok)

    with staged_dir(out, "tokens") as tmp:
        arr = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype,
                                        shape=(n_contexts, ctx))
        _reserve(tmp / "tokens.npy")
        arr[:, 0] = bos
        with progress(f"tokenizing {source} ({split})", total=need, unit="tokens") as bar:
            pos, n_docs = _fill(arr, docs, encode, eos, bar)
        if pos < need:
            rows = pos // body
            if n_docs == 0 and docs.n_documents == 0:
                raise UnineuronsError(f"corpus {source} is empty; give a source with text")
            if n_docs == 0:
                raise UnineuronsError(
                    f"corpus {source} has no documents in split {split} (of "
                    f"{docs.n_documents}); use a bigger corpus or change --heldout-fraction"
                )
            if rows == 0:
                raise UnineuronsError(
                    f"corpus {source} has only {pos} tokens in split {split}, fewer than one "
                    f"context of {ctx}; use a bigger corpus or a smaller --ctx"
                )
            arr = _truncate(arr, tmp / "tokens.npy", rows)
            n_contexts = rows
        arr.flush()
        del arr  # close the memmap before hashing and renaming
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "tokens",
            "source": str(source),
            "tokenizer": {
                # a local folder is kept absolute: the store is read from other folders too
                "path": str(Path(tokenizer).expanduser().absolute()) if tok_local else str(tokenizer),
                "local": tok_local,
                "vocab_size": len(tok),
                "vocab_sha256": vocab_fingerprint(tok),
                "bos_id": bos,
                "eos_id": eos,
                "pad_id": tok.pad_token_id,
                "newline_ids": newline_token_ids(tok),
            },
            "ctx": ctx,
            "n_contexts": n_contexts,
            "n_tokens": n_contexts * ctx,
            "split": split,
            "seed": seed,
            "heldout_fraction": heldout_fraction,
            "dtype": dtype.name,
            "sha256": sha256_file(tmp / "tokens.npy", desc="hashing tokens.npy"),
            "n_documents": n_docs,
            "created_by": f"unineurons {__version__}",
        }
        write_json(tmp / "manifest.json", manifest)
    return TokenStore.open(out, verify=False)


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of the (sparse) memory-mapped file ``path`` now: a disk that
    fills up is then an error here, not a bus error half-way through writing the map."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UnineuronsError(f"token store {path.parent}: no space left on the disk for "
                                  f"{os.fstat(fd).st_size / 1e9:,.2f} GB of tokens; free some "
                                  "space or write elsewhere") from None
        # file systems without fallocate (EOPNOTSUPP): write as before
    finally:
        os.close(fd)


def _write_stream(arr: np.ndarray, pos: int, ids: np.ndarray) -> None:
    """Write ``ids`` at stream position ``pos``: row ``pos // (ctx-1)``, after the BOS column."""
    body = arr.shape[1] - 1
    i = 0
    while i < len(ids):
        row, col = divmod(pos + i, body)
        take = min(body - col, len(ids) - i)
        arr[row, 1 + col: 1 + col + take] = ids[i: i + take]
        i += take


def _truncate(arr: np.memmap, path: Path, rows: int) -> np.memmap:
    """Keep the first ``rows`` rows of the memmap at ``path`` (rewritten in place)."""
    part = path.with_name(path.name + ".part")
    short = np.lib.format.open_memmap(part, mode="w+", dtype=arr.dtype, shape=(rows, arr.shape[1]))
    short[:] = arr[:rows]
    short.flush()
    del arr
    os.replace(part, path)
    return short


class TokenStore:
    """A token store opened for reading; ``tokens`` is a read-only memmap ``[n_contexts, ctx]``."""

    def __init__(self, path: Path, manifest: dict, tokens: np.ndarray):
        self.path, self.manifest, self.tokens = path, manifest, tokens
        self.ctx: int = manifest["ctx"]
        self.n_contexts: int = manifest["n_contexts"]

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> TokenStore:
        """Open the store at ``path``; with ``verify`` also check ``tokens.npy``'s sha256.

        Raises :class:`UnineuronsError` for a missing folder or file, a bad or newer
        manifest, a file whose shape or dtype disagrees with the manifest, or a hash mismatch.
        """
        path = Path(path).expanduser().absolute()  # recorded by runs: valid from any folder
        rebuild = "rebuild it with `unineurons tokens build`"
        if not path.is_dir():
            raise UnineuronsError(f"token store {path} does not exist; build it with "
                                  "`unineurons tokens build`, or pass its new place with --tokens")
        m = read_json(path / "manifest.json", "token store manifest")
        if not isinstance(m, dict) or m.get("kind") != "tokens":
            raise UnineuronsError(f"token store {path}: manifest.json is not a token store "
                                  f"manifest; {rebuild}")
        version = m.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnineuronsError(
                f"token store {path} has format version {version!r}, newer than this unineurons "
                f"reads ({FORMAT_VERSION}); upgrade unineurons or rebuild the store"
            )
        missing = [k for k in _MANIFEST_KEYS if k not in m]
        if missing:
            raise UnineuronsError(f"token store {path}: manifest.json lacks {', '.join(missing)}; "
                                  f"{rebuild}")
        file = path / "tokens.npy"
        if not file.is_file():
            raise UnineuronsError(f"token store {path} has no tokens.npy; {rebuild}")
        if verify and sha256_file(file, desc=f"verifying {file}") != m["sha256"]:
            raise UnineuronsError(f"token store {path} is corrupt (sha256 mismatch): {rebuild}")
        try:
            tokens = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UnineuronsError(f"token store {path}: tokens.npy is unreadable ({e}); "
                                  f"{rebuild}") from None
        expected = (m["n_contexts"], m["ctx"])
        if tokens.shape != expected or tokens.dtype.name != m["dtype"]:
            raise UnineuronsError(
                f"token store {path}: tokens.npy is {tokens.dtype.name}{list(tokens.shape)} but "
                f"the manifest says {m['dtype']}{list(expected)}; {rebuild}"
            )
        return cls(path, m, tokens)

    def n_contexts_for(self, n_tokens: int | None) -> int:
        """Contexts that hold ``n_tokens`` tokens: ``ceil(n_tokens / ctx)``; None = all of them."""
        if n_tokens is None:
            return self.n_contexts
        if n_tokens < 1:
            raise UnineuronsError(f"--n-tokens {n_tokens} must be positive")
        n = math.ceil(n_tokens / self.ctx)
        if n > self.n_contexts:
            raise UnineuronsError(
                f"token store {self.path} holds {self.n_contexts * self.ctx} tokens "
                f"({self.n_contexts} contexts of {self.ctx}), fewer than the {n_tokens} asked "
                "for; ask for fewer tokens or rebuild the store with a larger --n-tokens"
            )
        return n

    def contexts(self, n_tokens: int | None = None, start: int = 0) -> np.ndarray:
        """Rows ``[start, n_contexts_for(n_tokens))`` of ``tokens``, in store order (a view)."""
        stop = self.n_contexts_for(n_tokens)
        if not 0 <= start <= stop:
            raise UnineuronsError(
                f"token store {self.path}: start row {start} is outside [0, {stop}]"
            )
        return self.tokens[start:stop]

    @property
    def _tok(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def tokenizer_path(self) -> str:
        """The store's tokenizer, to load: its folder (absolute; a relative path of an older
        store is looked up from here and from the store's parents) or its hub id.

        Raises :class:`UnineuronsError` when it was a local folder that no longer exists: it
        is never taken for a hub id then."""
        from .checks import resolve_path
        from .relocate import moved_tokenizer

        given = moved_tokenizer()  # --tokenizer DIR: used when its vocabulary is the store's
        if given is not None:
            self._check_tokenizer(given)
            return given
        recorded = str(self._tok["path"])
        found = resolve_path(recorded, self.path)
        if found is not None and found.is_dir():
            return str(found)
        p = Path(recorded)
        was_local = self._tok.get("local", p.is_absolute() or recorded.startswith((".", "~"))
                                  or recorded.count("/") > 1)
        if was_local:
            raise UnineuronsError(
                f"token store {self.path}: its tokenizer folder {recorded} no longer exists (moved "
                "or deleted); put it back, or pass --tokenizer DIR (the folder it is in now; its "
                "vocabulary is checked)"
            )
        return recorded  # a hub id such as gpt2

    def _check_tokenizer(self, folder: str) -> None:
        """Refuse a tokenizer folder given for this store whose vocabulary is not the one the
        store was built with (its token ids would mean other words)."""
        from .models.load import load_tokenizer, vocab_fingerprint

        want = self._tok.get("vocab_sha256")
        if want is not None and vocab_fingerprint(load_tokenizer(folder)) != want:
            raise UnineuronsError(
                f"option --tokenizer {folder}: not the tokenizer token store {self.path} was built "
                f"with (another vocabulary); pass the folder its tokenizer ({self._tok['path']}) "
                "was moved to"
            )

    @property
    def vocab_sha256(self) -> str:
        """The tokenizer's :func:`~unineurons.models.load.vocab_fingerprint`."""
        return self._tok["vocab_sha256"]

    @property
    def vocab_size(self) -> int:
        return self._tok["vocab_size"]

    @property
    def bos_id(self) -> int:
        return self._tok["bos_id"]

    @property
    def eos_id(self) -> int:
        return self._tok["eos_id"]

    @property
    def pad_id(self) -> int | None:
        return self._tok["pad_id"]

    @property
    def newline_ids(self) -> list[int]:
        return list(self._tok["newline_ids"])

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, {self.n_contexts} x {self.ctx}, "
                f"split={self.manifest['split']!r})")
