"""Corpus sources: where the text comes from, as a deterministic stream of documents.

A source string (``SRC`` on the command line) is one of

- ``PATH``: a text file (one document) or a folder of them, recursive, in sorted path order.
  In a folder only files with a text extension (:data:`TEXT_SUFFIXES`) that decode as UTF-8
  are read; hidden files and folders are skipped.
- ``jsonl:PATH``: one JSON object per line with a ``text`` string; ``.zst`` and ``.gz``
  compressed files too. ``PATH`` may be a folder of such files (sorted).
- ``hf:NAME[:SPLIT][?config=C&column=COL&streaming=1]``: a Hugging Face ``datasets``
  dataset: a folder saved with ``save_to_disk``, or a hub id when online (``SPLIT`` defaults
  to ``train``; ``config`` is the dataset's configuration, e.g. ``wikitext-103-raw-v1``;
  ``column`` the text column, ``text`` by default; ``streaming=1`` reads a hub dataset as
  it downloads instead of caching all of it first).
- ``stdlib``: the running interpreter's standard library ``.py`` sources, one document per
  file: the built-in corpus that works offline everywhere.

Usage::

    for doc in open_source("jsonl:pile-shard.jsonl.zst"):
        doc.id, doc.text

Documents with empty text are skipped. Besides the stream, :func:`split_of` and
:func:`order_key` say which split a document belongs to and where a seeded shuffle puts it;
both depend on the text only, so they do not change with the source's layout.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import UnineuronsError
from .progress import progress

__all__ = ["Document", "open_source", "split_of", "order_key", "ShuffledDocuments", "SCHEMES",
           "TEXT_SUFFIXES"]

#: The source forms, as listed in error messages.
SCHEMES = ("PATH (file or folder)", "jsonl:PATH", "hf:NAME[:SPLIT][?config=C&column=COL&streaming=1]",
           "stdlib")

#: File name endings read from a folder source. A single file given directly is read whatever
#: its name, as long as it is UTF-8.
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".org", ".adoc", ".tex", ".html", ".htm",
    ".xml", ".csv", ".tsv", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs",
    ".rb", ".sh", ".sql", ".r", ".jl", ".lua", ".hs", ".ml", ".scala", ".kt", ".swift",
})

_JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.zst", ".json.gz", ".ndjson")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*):(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Document:
    """One document: ``id`` names it within its source (path, ``file:line`` or row)."""

    id: str
    text: str


def open_source(src: str) -> Iterator[Document]:
    """Documents of ``src`` in a fixed order: the same source always yields the same stream.

    The source is checked now (unknown scheme, missing path, unreadable dataset raise
    :class:`UnineuronsError` here); the documents are read lazily as the iterator advances.
    """
    src = str(src).strip()
    if src == "stdlib":
        return _stdlib()
    m = _SCHEME_RE.match(src)
    if m and not Path(src).exists():
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "jsonl":
            return _jsonl(_existing(rest, src))
        if scheme == "hf":
            return _hf(rest, src)
        raise UnineuronsError(
            f"corpus {src}: unknown source scheme {scheme!r}; use one of: {', '.join(SCHEMES)}"
        )
    return _text(_existing(src, src))


def _existing(path: str, src: str) -> Path:
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise UnineuronsError(
            f"corpus {src}: {path or 'path'} does not exist; give an existing file or folder, "
            f"or one of: {', '.join(SCHEMES)}"
        )
    return p


def _walk(root: Path, keep, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under ``root`` (recursive, sorted by relative path) for which ``keep(path)``.

    Hidden entries are tool state (.git, .venv, caches), not corpus text, and are skipped,
    as are folders named in ``skip_dirs``; both are pruned rather than walked.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            p = Path(dirpath, name)
            if not name.startswith(".") and p.is_file() and keep(p):
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text(path: Path) -> Iterator[Document]:
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UnineuronsError(
                f"corpus {path}: not UTF-8 text; give a UTF-8 text file or use jsonl:PATH"
            ) from None
        return iter([Document(path.name, text)] if text else [])
    files = _walk(path, lambda p: p.suffix.lower() in TEXT_SUFFIXES)
    return _read_files(path, files, prefix="")


def _read_files(root: Path, files: list[Path], prefix: str) -> Iterator[Document]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or legacy-encoded file with a text extension: not corpus text
        if text:
            yield Document(prefix + f.relative_to(root).as_posix(), text)


def _stdlib() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Third-party packages are not the standard library (and differ from machine to machine).
    files = _walk(root, lambda p: p.suffix == ".py",
                  skip_dirs=frozenset({"site-packages", "dist-packages", "__pycache__"}))
    return _read_files(root, files, prefix="stdlib/")


def _jsonl(path: Path) -> Iterator[Document]:
    if path.is_dir():
        files = _walk(path, lambda p: p.name.lower().endswith(_JSONL_SUFFIXES))
        if not files:
            raise UnineuronsError(
                f"corpus jsonl:{path}: the folder has no .jsonl, .jsonl.zst or .jsonl.gz files"
            )
        return (doc for f in files for doc in _jsonl_file(f, f.relative_to(path).as_posix()))
    return _jsonl_file(path, path.name)


class _ZstdReader(io.RawIOBase):
    """A .zst file decompressed as a stream that raises at its end when the last frame is
    incomplete: a truncated file is an error, not a shorter (or empty) corpus."""

    def __init__(self, path: Path):
        import zstandard

        self._path, self._f = path, open(path, "rb")  # noqa: SIM115
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._d, self._buf, self._pending = self._new(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._f.read(1 << 16)
            if not chunk:
                if self._pending:  # bytes went into a frame that never ended
                    raise UnineuronsError(
                        f"corpus file {self._path} is truncated (its zstd stream ends inside a "
                        "frame); re-download or re-compress it")
                return 0
            self._pending = True
            out = self._d.decompress(chunk)
            while self._d.eof:  # a frame ended: the rest may start another one
                rest, self._d = self._d.unused_data, self._new()
                self._pending = bool(rest)
                out += self._d.decompress(rest) if rest else b""
            self._buf = out
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".zst"):
        return io.TextIOWrapper(io.BufferedReader(_ZstdReader(path)), encoding="utf-8")
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_file(path: Path, name: str) -> Iterator[Document]:
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UnineuronsError(
                        f"corpus jsonl:{path} line {lineno}: not a JSON object with a 'text' "
                        "string; each line must look like {\"text\": \"...\"}"
                    )
                if text:
                    yield Document(f"{name}:{lineno}", text)
        except UnineuronsError:
            raise
        except Exception as e:  # decoding, truncated or damaged (zstd, gzip) files
            raise UnineuronsError(
                f"corpus jsonl:{path}: cannot be read ({type(e).__name__}: {e}); "
                "it is corrupt or not UTF-8 JSON lines"
            ) from None


_HF_OPTIONS = ("config", "column", "streaming")


def _hf_spec(spec: str, src: str) -> tuple[str, str, dict[str, str]]:
    """``NAME[:SPLIT][?config=C&column=COL&streaming=1]`` -> (name, split, options)."""
    body, _, query = spec.partition("?")
    name, _, split = body.partition(":")
    if not name:
        raise UnineuronsError(f"corpus {src}: no dataset name; write hf:NAME[:SPLIT][?config=C]")
    opts: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in _HF_OPTIONS or not sep or not value:
            raise UnineuronsError(f"corpus {src}: option {item!r} is not one of "
                                  f"{', '.join(k + '=...' for k in _HF_OPTIONS)}")
        opts[key] = value
    if opts.get("streaming", "0") not in ("0", "1", "true", "false"):
        raise UnineuronsError(f"corpus {src}: streaming must be 1 or 0")
    return name, split or "train", opts


def _hf(spec: str, src: str) -> Iterator[Document]:
    name, split, opts = _hf_spec(spec, src)
    column = opts.get("column", "text")
    streaming = opts.get("streaming") in ("1", "true")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise UnineuronsError("corpus hf:...: the `datasets` package is not installed") from None
    local = Path(name).expanduser()
    if not local.exists() and name.startswith((".", "/", "~")):
        # Looks like a path, not a hub id: say so rather than ask the hub for it.
        raise UnineuronsError(
            f"corpus {src}: dataset folder {name} does not exist; save one with "
            "Dataset.save_to_disk or give a hub id"
        )
    try:
        # streaming reads a hub dataset as it downloads (nothing cached on disk first)
        ds = (datasets.load_from_disk(str(local)) if local.is_dir()
              else datasets.load_dataset(name, opts.get("config"), split=split, streaming=streaming))
    except Exception as e:  # datasets raises many types: offline, missing, bad folder
        first = str(e).splitlines()[0] if str(e) else ""
        where = "folder is not a saved dataset" if local.is_dir() else (
            "no such dataset/config/split, or offline and not cached")
        raise UnineuronsError(
            f"corpus {src}: cannot load dataset {name} ({type(e).__name__}: {first}); {where}: "
            "pass a folder saved with Dataset.save_to_disk, or connect and check the id"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UnineuronsError(
                f"corpus {src}: dataset has no split {split!r}; it has {', '.join(ds)}"
            )
        ds = ds[split]
    names = ds.column_names
    if names is not None and column not in names:  # a stream may not know its columns yet
        raise UnineuronsError(
            f"corpus {src}: dataset has no {column!r} column (it has {', '.join(names)}); "
            "choose one with ?column=NAME"
        )
    return _hf_rows(ds.select_columns([column]), f"{name}[{split}]", column)


def _hf_rows(ds, name: str, column: str = "text") -> Iterator[Document]:
    i = 0
    for batch in ds.iter(batch_size=1000):  # batched: row-by-row access is slow in datasets
        for text in batch[column]:
            if isinstance(text, str) and text:
                yield Document(f"{name}#{i}", text)
            i += 1


# --- splits and seeded order: functions of the text only --------------------------------

def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def split_of(text: str, heldout_fraction: float) -> Literal["train", "heldout"]:
    """The split a document belongs to, from a hash of its text.

    Independent of seed, token count and source layout, so train and heldout stores built
    from the same corpus never share a document, and identical texts share a split.
    """
    u = int.from_bytes(hashlib.sha256(b"split\0" + _digest(text)).digest()[:8], "big") / 2**64
    return "heldout" if u < heldout_fraction else "train"


def order_key(text: str, seed: int) -> bytes:
    """Sort key of the seeded shuffle: sorted by it, documents are in a random order per seed."""
    return hashlib.sha256(b"order\0%d\0" % seed + _digest(text)).digest()


class ShuffledDocuments:
    """The documents of one split of ``src``, in the seeded order of :func:`order_key`.

    Iterating yields exactly "every document of the split, sorted by its order key" but
    never holds the whole corpus: each pass over the source keeps only the documents with
    the smallest keys, about ``chars_hint`` characters of them (bottom-k sampling). A
    consumer that reads past them triggers another pass that picks up where the last one
    stopped, with twice the budget. Stop iterating when you have enough.

    The first pass runs on construction (so a bad source fails there, and ``n_documents``,
    the documents in the source, and ``n_in_split``, those in the split, are known at once).
    """

    def __init__(self, src: str, split: Literal["train", "heldout", "all"],
                 heldout_fraction: float, seed: int, chars_hint: int):
        if not 0.0 <= heldout_fraction < 1.0:
            raise UnineuronsError(
                f"heldout fraction {heldout_fraction} is outside [0, 1); use e.g. 0.1"
            )
        self.src, self.split, self.seed = src, split, seed
        self.heldout_fraction = heldout_fraction
        self.chars_hint = max(int(chars_hint), 1)
        self.n_documents = self.n_in_split = 0
        with progress(f"reading {src}", total=None, unit="docs") as bar:
            self._first = self._pass(None, self.chars_hint, bar)

    def __iter__(self) -> Iterator[Document]:
        (kept, complete), budget = self._first, self.chars_hint
        while True:
            for _, _, doc in kept:
                yield doc
            if complete or not kept:
                return
            budget *= 2
            # a later pass re-reads the source, whose size the first pass counted
            with progress(f"reading {self.src} again", total=self.n_documents,
                          unit="docs") as bar:
                kept, complete = self._pass(kept[-1][:2], budget, bar)

    def _pass(self, after: tuple | None, budget: int, bar=None):
        """The smallest-keyed documents after ``after`` that reach ``budget`` characters."""
        heap: list[tuple[int, int, Document]] = []  # (-key, -index, doc): top = largest key
        total, complete, n_docs, n_split = 0, True, 0, 0
        for index, doc in enumerate(open_source(self.src)):
            n_docs += 1
            if bar is not None:
                bar.advance(1)
            if self.split != "all" and split_of(doc.text, self.heldout_fraction) != self.split:
                continue
            n_split += 1
            entry = (int.from_bytes(order_key(doc.text, self.seed), "big"), index)
            if after is not None and entry <= after:
                continue  # yielded by an earlier pass
            heapq.heappush(heap, (-entry[0], -index, doc))
            total += len(doc.text)
            # Drop the largest keys while the rest still reach the budget.
            while total - len(heap[0][2].text) >= budget:
                total -= len(heapq.heappop(heap)[2].text)
                complete = False
        self.n_documents, self.n_in_split = n_docs, n_split
        kept = sorted((-k, -i, d) for k, i, d in heap)
        return kept, complete
