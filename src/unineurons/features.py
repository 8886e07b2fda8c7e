"""Binary token features: the pluggable interface and the built-in library.

A *feature* says, for every position of a batch of contexts, whether something holds there:
a function ``TokenContext -> bool [B, T]``. The context carries the token ids and the
:class:`Vocabulary` (the decoded string of every id), so a feature can look at the token, its
neighbours or its text. Features that only look at the token itself are *token classes*: a
predicate on the decoded string, evaluated once per vocabulary entry into a lookup table
``[vocab] -> bool`` and then indexed by the token ids (vectorised, no per-token Python).

Adding features::

    from unineurons.features import register_token_class, register_feature

    @register_token_class("weekday", "a day of the week")
    def weekday(s: str) -> bool:
        return s.strip().lower() in {"monday", "tuesday", ...}

    def is_the(s: str) -> bool:
        return s == " the"

    @register_feature("after_the", "the previous token is ' the'")
    def after_the(ctx: TokenContext) -> np.ndarray:
        return ctx.vocab.lookup(is_the)[ctx.prev_ids()]  # [B, T]

or list tokens in a text file (:func:`token_class_from_file`). The CLI loads files with
``--token-class FILE`` and Python modules defining registered features with
``--feature-module FILE.py``.

Special tokens (BOS, EOS, pad) never have a token-class feature.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UnineuronsError

__all__ = ["Vocabulary", "TokenContext", "Feature", "FeatureFn", "FEATURES", "register_feature",
           "register_token_class", "token_class", "token_class_from_file", "load_feature_module",
           "get_features", "evaluate_features"]


class Vocabulary:
    """The string of every token id, and cached per-token lookup tables.

    ``strings[i]`` is token ``i``'s own text (:func:`unineurons.tokenizer.vocab_strings`: a
    SentencePiece ``▁in`` is `` in``, so ``leading_space`` holds for it). With ``pieces`` (each
    id's bytes, :func:`unineurons.tokenizer.token_bytes`), :meth:`sequence_strings` gives
    strings whose concatenation is a sequence's text even where a character is split over
    tokens (byte fallback, byte-level BPE).
    """

    def __init__(self, strings: Sequence[str], special_ids: Sequence[int] = (),
                 pieces: Sequence[bytes] | None = None):
        self.strings = np.array(list(strings), dtype=object)  # [V]
        self.special_ids = sorted({int(i) for i in special_ids if i is not None and
                                   0 <= int(i) < len(self.strings)})
        self._tables: dict[Any, np.ndarray] = {}
        self.pieces = None if pieces is None else list(pieces) + [b""] * (len(self.strings)
                                                                         - len(pieces))
        #: bool [V]: tokens whose bytes are not whole UTF-8 characters on their own
        self.partial = np.zeros(len(self.strings), dtype=bool)
        if self.pieces is not None:
            for i, b in enumerate(self.pieces):
                try:
                    b.decode("utf-8")
                except UnicodeDecodeError:
                    self.partial[i] = True

    def __len__(self) -> int:
        return len(self.strings)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, size: int | None = None,
                       special_ids: Sequence[int] = ()) -> Vocabulary:
        """Every id of ``tokenizer`` (:func:`unineurons.tokenizer.token_bytes`); ids past the
        tokenizer (a model's padded embedding) are the empty string."""
        from .tokenizer import token_bytes, vocab_strings

        n_tok = len(tokenizer)
        size = n_tok if size is None else size
        strings = vocab_strings(tokenizer, range(min(size, n_tok)))
        strings += [""] * (size - len(strings))
        specials = list(special_ids) + list(getattr(tokenizer, "all_special_ids", []) or [])
        return cls(strings, specials, pieces=token_bytes(tokenizer)[:size])

    def lookup(self, predicate: Callable[[str], bool]) -> np.ndarray:
        """``bool [V]``: ``predicate`` on every decoded token, False for special tokens.

        Computed once per predicate object and cached: pass the same function every batch
        (a module-level function, not a fresh lambda)."""
        table = self._tables.get(predicate)
        if table is None:
            table = np.fromiter((bool(predicate(s)) for s in self.strings), dtype=bool,
                                count=len(self.strings))
            table[self.special_ids] = False
            self._tables[predicate] = table
        return table

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Each id's own string (:attr:`strings`) for ``ids`` (any shape), as an object array
        of the same shape."""
        return self.strings[np.asarray(ids, dtype=np.int64)]

    def sequence_strings(self, ids: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
        """Object array of strings for flat ``ids`` holding sequences that start at
        ``offsets`` (``[n + 1]``; one sequence when None), such that each sequence's strings
        concatenate to its text (:func:`unineurons.tokenizer.join_pieces`). Equal to
        :meth:`decode` except in sequences with a token that is part of a character."""
        from .tokenizer import join_pieces

        ids = np.asarray(ids, dtype=np.int64)
        out = self.decode(ids).copy()
        if self.pieces is None or not self.partial[ids].any():
            return out
        offsets = np.array([0, len(ids)]) if offsets is None else np.asarray(offsets)
        c = np.concatenate([[0], np.cumsum(self.partial[ids])])
        bad = np.nonzero(c[offsets[1:]] - c[offsets[:-1]])[0]  # sequences with a partial token
        for j in bad:
            a, b = int(offsets[j]), int(offsets[j + 1])
            out[a:b] = join_pieces([self.pieces[i] for i in ids[a:b]])
        return out


@dataclass(frozen=True)
class TokenContext:
    """What a feature sees: a batch of contexts and the vocabulary to read them."""

    token_ids: np.ndarray  #: [B, T] int64
    vocab: Vocabulary

    def prev_ids(self) -> np.ndarray:
        """[B, T]: the token before each position (the first position repeats itself)."""
        t = self.token_ids
        return np.concatenate([t[:, :1], t[:, :-1]], axis=1)

    def strings(self) -> np.ndarray:
        """[B, T] object array of token strings; each row concatenates to the context's text
        (:meth:`Vocabulary.sequence_strings`)."""
        t = self.token_ids
        flat = self.vocab.sequence_strings(t.reshape(-1), np.arange(t.shape[0] + 1) * t.shape[1])
        return flat.reshape(t.shape)


FeatureFn = Callable[[TokenContext], "np.ndarray | torch.Tensor"]


@dataclass(frozen=True)
class Feature:
    """A named binary feature of token positions."""

    name: str
    fn: FeatureFn = field(repr=False)
    description: str = ""

    def __call__(self, ctx: TokenContext) -> np.ndarray:
        """``bool [B, T]``; a feature returning another shape is a bug in the feature."""
        out = self.fn(ctx)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        out = np.asarray(out).astype(bool, copy=False)
        if out.shape != ctx.token_ids.shape:
            raise UnineuronsError(
                f"feature {self.name!r} returned shape {out.shape}, expected the token shape "
                f"{ctx.token_ids.shape}; fix the feature function"
            )
        return out


def token_class(name: str, predicate: Callable[[str], bool], description: str = "") -> Feature:
    """A feature that holds where the current token's decoded string satisfies ``predicate``."""
    return Feature(name, lambda ctx: ctx.vocab.lookup(predicate)[ctx.token_ids], description)


#: name -> Feature: the library every analysis uses unless told otherwise.
FEATURES: dict[str, Feature] = {}


def register_feature(name: str, description: str = ""):
    """Decorator: register ``fn(ctx) -> bool [B, T]`` as feature ``name``."""

    def deco(fn: FeatureFn) -> FeatureFn:
        FEATURES[name] = Feature(name, fn, description or (fn.__doc__ or "").strip())
        return fn

    return deco


def register_token_class(name: str, description: str = ""):
    """Decorator: register a predicate on the decoded token string as feature ``name``."""

    def deco(pred: Callable[[str], bool]) -> Callable[[str], bool]:
        FEATURES[name] = token_class(name, pred, description or (pred.__doc__ or "").strip())
        return pred

    return deco


def token_class_from_file(path: str | Path, name: str | None = None) -> Feature:
    """A token class listing its members, one decoded token per line, matched exactly.

    Only the line break is removed, so leading spaces count (``" the"`` and ``"the"`` are
    different tokens); empty lines are ignored. The feature is named after the file's stem.
    """
    p = Path(path)
    if not p.is_file():
        raise UnineuronsError(f"token class file {p} does not exist; give a text file listing "
                              "one token per line")
    from .io import read_text

    members = frozenset(line for line in read_text(p, "token class file").splitlines() if line)
    if not members:
        raise UnineuronsError(f"token class file {p} lists no tokens; put one token per line")
    return token_class(name or p.stem, members.__contains__, f"tokens listed in {p.name}")


def load_feature_module(path: str | Path) -> list[str]:
    """Import a Python file whose registration decorators add features; returns their names."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".py":
        raise UnineuronsError(f"feature module {p} is not a .py file; give the path of a Python "
                              "file that uses @register_feature / @register_token_class")
    before = set(FEATURES)
    spec = importlib.util.spec_from_file_location(f"unineurons_user_features_{p.stem}", p)
    if spec is None or spec.loader is None:
        raise UnineuronsError(f"feature module {p} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    from .errors import USER_CODE

    USER_CODE.add(str(spec.origin))  # its exceptions are the user's errors (see unineurons.cli)
    spec.loader.exec_module(module)
    return sorted(set(FEATURES) - before)


def get_features(names: Sequence[str] | None = None, extra: Sequence[Feature] = ()
                 ) -> list[Feature]:
    """The registered features named (all of them when ``names`` is None), then ``extra``."""
    if names is None:
        chosen = list(FEATURES.values())
    else:
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            raise UnineuronsError(f"unknown feature(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(sorted(FEATURES))}")
        chosen = [FEATURES[n] for n in names]
    out = chosen + list(extra)
    seen: set[str] = set()
    for f in out:
        if f.name in seen:
            raise UnineuronsError(f"two features are named {f.name!r}; rename one")
        seen.add(f.name)
    return out


def evaluate_features(features: Sequence[Feature], ctx: TokenContext) -> np.ndarray:
    """``bool [B, T, F]``: every feature on every position."""
    if not features:
        return np.zeros(ctx.token_ids.shape + (0,), dtype=bool)
    return np.stack([f(ctx) for f in features], axis=-1)


# ---- the built-in library ------------------------------------------------------------------
_OPEN = set("([{<")
_CLOSE = set(")]}>")
_QUOTES = set("\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb")
_NUMBER = re.compile(r"[+\-]?(\d[\d,_]*(\.\d*)?|\.\d+)([eE][+\-]?\d+)?")


def _core(s: str) -> str:
    return s.strip()


@register_token_class("leading_space", "the token starts with a space")
def _leading_space(s: str) -> bool:
    return s.startswith(" ")


@register_token_class("capitalised", "the first character (after leading spaces) is an "
                      "upper-case letter")
def _capitalised(s: str) -> bool:
    c = _core(s)
    return bool(c) and c[0].isupper()


@register_token_class("all_caps", "at least two letters, all upper case")
def _all_caps(s: str) -> bool:
    c = _core(s)
    return sum(ch.isalpha() for ch in c) >= 2 and c.isupper()


@register_token_class("digit", "only decimal digits (after stripping spaces)")
def _digit(s: str) -> bool:
    c = _core(s)
    return bool(c) and c.isdecimal()


@register_token_class("number", "a number such as 3, 1,000, 2.5, .5, -7, 1e5 (after stripping)")
def _number(s: str) -> bool:
    return _NUMBER.fullmatch(_core(s)) is not None


@register_token_class("punctuation", "only punctuation characters (Unicode category P*)")
def _punctuation(s: str) -> bool:
    c = _core(s)
    return bool(c) and all(unicodedata.category(ch).startswith("P") for ch in c)


@register_token_class("newline", "contains a line break")
def _newline(s: str) -> bool:
    return "\n" in s or "\r" in s


@register_token_class("open_bracket", "only opening brackets: ( [ { <")
def _open_bracket(s: str) -> bool:
    c = _core(s)
    return bool(c) and set(c) <= _OPEN


@register_token_class("close_bracket", "only closing brackets: ) ] } >")
def _close_bracket(s: str) -> bool:
    c = _core(s)
    return bool(c) and set(c) <= _CLOSE


@register_token_class("quote", "only quote characters: \" ' ` and typographic quotes")
def _quote(s: str) -> bool:
    c = _core(s)
    return bool(c) and set(c) <= _QUOTES


def _starts_word_char(s: str) -> bool:
    return bool(s) and s[0].isalnum()


def _ends_word_char(s: str) -> bool:
    return bool(s) and s[-1].isalnum()


@register_feature("within_word", "the token continues a word: no leading space, starts with a "
                  "letter or digit, and the previous token ends with one")
def _within_word(ctx: TokenContext) -> np.ndarray:
    starts = ctx.vocab.lookup(_starts_word_char)[ctx.token_ids]  # [B, T]
    after = ctx.vocab.lookup(_ends_word_char)[ctx.prev_ids()]  # [B, T]
    out = starts & after
    out[:, 0] = False  # the first position has no previous token
    return out
