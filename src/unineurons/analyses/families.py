"""Neuron families: which token feature explains a neuron's activation best.

Gurnee et al. group neurons by the binary token feature with the largest *variance reduction*
(VR, :class:`~unineurons.accumulators.ConditionalMoments`). Five families of features, fixed
before the pass over the tokens:

- ``unigram``: "the current token is t" for the ``top_n`` most frequent tokens t of the
  tokens analysed (counted over the kept positions before the pass);
- ``previous``: the same tokens, at the previous position;
- ``alphabet``: "the token, stripped of leading spaces and lower-cased, starts with letter c";
- ``class``: the token-feature library (:mod:`unineurons.features`) plus user classes;
- ``position``: not a VR: the normalised mutual information between "fires" (pre-activation
  > 0) and the context position (:class:`~unineurons.accumulators.PositionStats`).

A neuron's family is its highest-scoring feature among those whose score reaches their
family's threshold (VR and normalised MI are both shares, of variance and of firing entropy,
in [0, 1]), else ``"none"``. Equal scores go to the earlier family in the list above.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..accumulators import ConditionalMoments, PositionStats
from ..features import Feature, TokenContext, Vocabulary, evaluate_features
from ..stream import MaskConfig, StreamBatch, token_mask

__all__ = ["FAMILIES", "FamilyFeatures", "FamilyStats", "frequent_tokens",
           "build_family_features", "assign_families", "family_duplicates"]

#: Families in tie-break order.
FAMILIES = ("unigram", "previous", "alphabet", "class", "position")
_VR_FAMILIES = FAMILIES[:4]


def frequent_tokens(contexts: np.ndarray, special: dict, top_n: int, vocab_size: int,
                    mask: MaskConfig = MaskConfig(), chunk: int = 4096) -> np.ndarray:
    """The ``top_n`` most frequent token ids over the positions the stream keeps.

    Most frequent first, ties to the smaller id; tokens never seen are not returned.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for r0 in range(0, contexts.shape[0], chunk):
        block = torch.from_numpy(np.asarray(contexts[r0:r0 + chunk]).astype(np.int64))  # [b, T]
        keep = token_mask(block, special, mask)
        counts += np.bincount(block[keep].numpy(), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # count desc, then id asc
    order = order[counts[order] > 0]
    return order[:top_n].astype(np.int64)


def _alphabet_labels(vocab: Vocabulary) -> np.ndarray:
    """``int64 [V]``: index of the ASCII letter a token starts with (stripped, lower), or -1."""
    lut = np.full(len(vocab), -1, dtype=np.int64)
    for i, s in enumerate(vocab.strings):
        c = s.lstrip().lower()[:1]
        if c and c in string.ascii_lowercase:
            lut[i] = ord(c) - ord("a")
    lut[vocab.special_ids] = -1
    return lut


def _token_names(vocab: Vocabulary, ids: np.ndarray, prefix: str) -> list[str]:
    """``prefix=' the'`` per id; ``#id`` appended where two ids decode to the same string."""
    strs = [str(vocab.strings[i]) for i in ids]
    dup = {s for s in strs if strs.count(s) > 1}
    return [f"{prefix}={s!r}" + (f"#{i}" if s in dup else "") for s, i in zip(strs, ids,
                                                                            strict=True)]


@dataclass(frozen=True)
class FamilyFeatures:
    """The fixed feature lists of one analysis, and how to label a batch with them."""

    vocab: Vocabulary
    unigram_ids: np.ndarray  #: [N] token ids, most frequent first
    classes: tuple[Feature, ...]  #: the ``class`` family

    @property
    def unigram_lut(self) -> np.ndarray:
        """``int64 [V]``: feature index of each token id in the unigram list, or -1."""
        lut = np.full(len(self.vocab), -1, dtype=np.int64)
        lut[self.unigram_ids] = np.arange(len(self.unigram_ids))
        return lut

    def names(self) -> dict[str, list[str]]:
        """Feature names per VR family, in accumulator order."""
        return {
            "unigram": _token_names(self.vocab, self.unigram_ids, "token"),
            "previous": _token_names(self.vocab, self.unigram_ids, "prev"),
            "alphabet": [f"starts_with={c}" for c in string.ascii_lowercase],
            "class": [f.name for f in self.classes],
        }

    def token_ids(self) -> dict[str, np.ndarray]:
        """Per VR family, the token id each feature is about (-1 where none)."""
        none = lambda n: np.full(n, -1, dtype=np.int64)  # noqa: E731
        return {"unigram": self.unigram_ids, "previous": self.unigram_ids,
                "alphabet": none(26), "class": none(len(self.classes))}

    def labels(self, batch: StreamBatch, luts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per VR family, the features of the batch's kept tokens: labels ``[n]`` (partitions)
        or bool ``[n, F]`` (the class features)."""
        cls = evaluate_features(self.classes, TokenContext(batch.tokens.numpy(), self.vocab))
        return {
            "unigram": luts["unigram"][batch.token_ids],
            "previous": luts["unigram"][batch.prev_token_ids],
            "alphabet": luts["alphabet"][batch.token_ids],
            "class": torch.from_numpy(cls)[batch.mask],  # [n, F_class]
        }


def build_family_features(contexts: np.ndarray, special: dict, vocab: Vocabulary, top_n: int,
                          classes: list[Feature], mask: MaskConfig = MaskConfig()
                          ) -> FamilyFeatures:
    """Fix the feature lists for ``contexts``: count the frequent tokens first."""
    ids = frequent_tokens(contexts, special, top_n, len(vocab), mask)
    return FamilyFeatures(vocab=vocab, unigram_ids=ids, classes=tuple(classes))


class FamilyStats:
    """The conditional accumulators of one model's neuron subset (``d`` neurons)."""

    def __init__(self, feats: FamilyFeatures, d: int, ctx: int, device: str | torch.device = "cpu"):
        self.feats = feats
        sizes = {"unigram": len(feats.unigram_ids), "previous": len(feats.unigram_ids),
                 "alphabet": 26, "class": len(feats.classes)}
        self.cond = {f: ConditionalMoments(n, d, device=device) for f, n in sizes.items()}
        self.position = PositionStats(ctx, d, device=device)
        self._luts = {"unigram": torch.from_numpy(feats.unigram_lut),
                      "alphabet": torch.from_numpy(_alphabet_labels(feats.vocab))}

    def batch_labels(self, batch: StreamBatch) -> dict[str, torch.Tensor]:
        """Labels of a batch; compute once and share between models."""
        return self.feats.labels(batch, self._luts)

    def update(self, act: torch.Tensor, fires: torch.Tensor, labels: dict[str, torch.Tensor],
               positions: torch.Tensor) -> FamilyStats:
        """``act [n, d]`` activations, ``fires [n, d]`` bool, ``positions [n]``."""
        for fam, acc in self.cond.items():
            acc.update(act, labels[fam])
        self.position.update(fires, positions)
        return self

    def merge(self, other: FamilyStats) -> FamilyStats:
        for fam, acc in self.cond.items():
            acc.merge(other.cond[fam])
        self.position.merge(other.position)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulators' tensors, keys ``{family}.{name}`` and ``position.{name}``."""
        out = {f"{fam}.{k}": v for fam, acc in self.cond.items() for k, v in acc.state_dict().items()}
        return out | {f"position.{k}": v for k, v in self.position.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> FamilyStats:
        for name, acc in [*self.cond.items(), ("position", self.position)]:
            acc.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                 if k.split(".", 1)[0] == name})
        return self

    def scores(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """VR ``[F, d]`` per VR family, and the position result (``nmi``, ``mi``, ``peak``)."""
        vr = {f: acc.result()["vr"].cpu().numpy() for f, acc in self.cond.items()}
        pos = {k: v.cpu().numpy() for k, v in self.position.result().items()
               if k in ("nmi", "mi", "peak")}
        return vr, pos


def assign_families(vr: dict[str, np.ndarray], position: dict[str, np.ndarray],
                    names: dict[str, list[str]], token_ids: dict[str, np.ndarray],
                    vr_threshold: float = 0.5, position_threshold: float = 0.3, top: int = 3
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Families of ``d`` neurons from their feature scores.

    Returns ``(columns, ranked)``: ``columns`` has one row per neuron (in input order) with
    ``family`` (``"none"`` when no feature reaches its threshold), ``family_feature`` (None
    then), ``family_score`` (the best score of any feature, passing or not) and
    ``position_score`` (normalised MI); ``ranked`` has the ``top`` best features per neuron:
    ``idx`` (neuron's input index), ``rank``, ``family``, ``feature``, ``token_id``, ``score``.
    """
    blocks = [vr[f] for f in _VR_FAMILIES] + [position["nmi"][None, :]]
    scores = np.concatenate(blocks, axis=0)  # [F_total, d]
    scores = np.nan_to_num(scores, nan=0.0)
    d = scores.shape[1]
    fam = np.concatenate([np.full(len(vr[f]), i) for i, f in enumerate(_VR_FAMILIES)]
                         + [np.array([len(_VR_FAMILIES)])])
    peaks = np.asarray(position["peak"])
    thresh = np.where(fam < len(_VR_FAMILIES), vr_threshold, position_threshold)  # [F_total]
    feat_names = np.array(sum((names[f] for f in _VR_FAMILIES), []) + ["position"], dtype=object)
    feat_tokens = np.concatenate([token_ids[f] for f in _VR_FAMILIES] + [np.array([-1])])

    # stable sort of -score keeps the family order (and the order inside a family) on ties
    order = np.argsort(-scores, axis=0, kind="stable")  # [F_total, d]
    best = order[0]
    passing = scores >= thresh[:, None]
    # first passing feature in score order: mask non-passing with +inf rank
    rank_of = np.where(np.take_along_axis(passing, order, axis=0), np.arange(len(fam))[:, None],
                       len(fam))
    first = rank_of.min(0)  # [d]
    has = first < len(fam)
    chosen = order[np.minimum(first, len(fam) - 1), np.arange(d)]

    def feature_label(f: np.ndarray, neuron: np.ndarray) -> np.ndarray:
        out = feat_names[f].copy()
        is_pos = fam[f] == len(_VR_FAMILIES)
        out[is_pos] = [f"position_peak={int(peaks[j])}" for j in neuron[is_pos]]
        return out

    cols = pd.DataFrame({
        "family": np.where(has, np.array(FAMILIES, dtype=object)[fam[chosen]], "none"),
        "family_feature": np.where(has, feature_label(chosen, np.arange(d)), None),
        "family_score": scores[best, np.arange(d)],
        "position_score": np.asarray(position["nmi"], dtype=np.float64),
    })
    k = min(top, len(fam))
    top_f = order[:k]  # [k, d]
    neuron = np.tile(np.arange(d), k)
    flat = top_f.reshape(-1)
    ranked = pd.DataFrame({
        "idx": neuron,
        "rank": np.repeat(np.arange(k), d),
        "family": np.array(FAMILIES, dtype=object)[fam[flat]],
        "feature": feature_label(flat, neuron),
        "token_id": feat_tokens[flat],
        "score": scores[flat, neuron],
    }).sort_values(["idx", "rank"], kind="stable").reset_index(drop=True)
    return cols, ranked


def family_duplicates(df: pd.DataFrame) -> pd.Series:
    """For each neuron, how many *other* neurons of the same model share its family feature
    (0 for ``none``; NaN where no family was computed)."""
    key = df["family_feature"].where(df["family"].ne("none") & df["family"].notna())
    size = df.groupby([df["model"], key], dropna=True)["family"].transform("size")
    out = (size - 1).astype("Float64")
    out[df["family"].eq("none")] = 0
    return out
