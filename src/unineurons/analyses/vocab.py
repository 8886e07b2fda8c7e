"""Vocabulary composition: how a neuron's weights line up with the unembedding and embedding.

**Output side.** Each neuron's output weight ``w_out`` is compared, by cosine, with every
column of the unembedding prepared the way TransformerLens's ``fold_ln`` +
``center_writing_weights`` + ``center_unembed`` prepare a model:

* the final norm's scale is folded in: ``W_U' = diag(gamma_f) W_U``  ``[d_model, vocab]``
  (the final LayerNorm's bias only adds one fixed logit per token, whatever the neuron does);
* ``W_U'`` is centred over the vocabulary (its mean column is subtracted): softmax ignores a
  logit shift shared by every token;
* LayerNorm families (GPT-2, GPT-NeoX) are also centred over ``d_model``, both ``w_out`` and the
  columns of ``W_U'``: LayerNorm subtracts the residual's mean, so only the centred parts reach
  the logits. RMSNorm (Llama) does not subtract the mean, so nothing is centred over
  ``d_model`` there.

**Input side.** ``w_in`` (for gated MLPs the gate projection, whose output goes through the
nonlinearity) with the scale of the norm in front of the MLP folded in, i.e. the residual
direction the neuron reads, compared with every embedding row. For LayerNorm families both are
centred over ``d_model`` (TransformerLens centres the embedding as a writing weight and the
folded ``W_in`` as a reading weight); nothing is centred over the vocabulary, as no softmax
follows the embedding.

**Real tokens only.** Padded vocabularies (Pythia: 50,304 embedding rows for 50,277 tokens)
have rows that are no token. Every statistic and list here uses ids ``0 .. n_vocab - 1``
only, ``n_vocab = min(len(tokenizer), rows)`` (:func:`real_vocab_size`): the padding columns
enter neither the centring over the vocabulary, nor the moments, nor the top/bottom lists.

**Families.** The norms come from the adapter: Gemma's scale is ``1 + w``, OLMo's LayerNorm
has no weight (scale 1), OLMo-2 has no norm in front of the MLP (scale 1), and Gemma-2 /
OLMo-2 normalise the MLP's output: ``w_out`` is read with that norm's scale folded in
(:func:`residual_out_weight`). Gemma-2's final-logit softcap is monotone and not folded.

The full cosine matrix of GPT-2 small is 36,864 x 50,257 floats (7.4 GB), so everything here
works in blocks of neurons under a byte budget (``max_bytes``, 512 MB by default).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..accumulators.moments import Moments
from ..models.load import LoadedModel
from ..progress import progress

__all__ = ["Side", "is_layernorm", "block_norm", "norm_scale", "in_weight", "out_weight",
           "residual_out_weight", "real_vocab_size",
           "folded_unembed", "folded_embed",
           "out_directions", "in_directions", "iter_vocab_cosines", "vocab_cosines",
           "vocab_moments", "vocab_table", "DEFAULT_MAX_BYTES"]

Side = Literal["out", "in"]

#: Per-block memory budget of the cosine computations.
DEFAULT_MAX_BYTES = 512 * 2**20


def is_layernorm(m: LoadedModel) -> bool:
    """True when the model's norms subtract the mean (LayerNorm, OLMo's too), False for RMSNorm."""
    return m.adapter.spec.layernorm


def block_norm(m: LoadedModel, layer: int, which: Literal["mlp", "attn"]) -> nn.Module | None:
    """The norm module in front of block ``layer``'s MLP (``"mlp"``) or attention
    (``"attn"``); None where the family has none (OLMo-2)."""
    return m.adapter.block_norm(layer, which)


def _usable(tokenizer: Any | None) -> bool:
    """A tokenizer with more than its special tokens (transformers builds special-tokens-only
    tokenizers from folders that have no tokenizer files)."""
    try:
        return len(tokenizer) > len(set(getattr(tokenizer, "all_special_ids", []) or []))
    except TypeError:  # None, or a bare decoder object: no size
        return False


def real_vocab_size(m: LoadedModel, tokenizer: Any | None = None) -> int:
    """The number of real tokens: ``min(len(tokenizer), unembedding columns)``, recorded on
    the adapter (``Adapter.set_n_vocab``).

    The tokenizer is ``tokenizer``, else the count already recorded on the adapter (analyze
    records the token store's tokenizer), else ``m.tokenizer``. Without a tokenizer (or with
    one that holds only special tokens) every row counts. Ids at or past it are padding rows
    of the matrices, never tokens.
    """
    ad = m.adapter
    if _usable(tokenizer):
        return ad.set_n_vocab(len(tokenizer))
    if ad.n_vocab is not None:
        return ad.n_vocab
    if _usable(m.tokenizer):
        return ad.set_n_vocab(len(m.tokenizer))
    return ad.vocab_size


def _device(m: LoadedModel) -> torch.device:
    return next(m.model.parameters()).device


def norm_scale(norm: nn.Module | None, d: int, device: torch.device) -> torch.Tensor:
    """``[d]`` float32: the norm's ``weight`` (ones when it has none). Without Gemma's
    ``1 + w`` offset: :meth:`Adapter.norm_scale <unineurons.models.adapters.Adapter.norm_scale>`
    knows the family."""
    w = getattr(norm, "weight", None)
    if w is None:
        return torch.ones(d, device=device)
    return w.detach().float().to(device)


def _centre_d(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last axis (d_model)."""
    return x - x.mean(-1, keepdim=True)


def out_weight(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]`` float32, this layer only (GPT-2's Conv1D stores [in, out])."""
    return m.adapter.W_out_layer(layer).detach().float()


def residual_out_weight(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]`` float32: each neuron's direction in the residual stream; ``w_out``
    times the scale of a norm on the MLP's output (Gemma-2, OLMo-2), else ``w_out``. That
    norm divides by one RMS shared by all neurons, so the direction is exact."""
    w = out_weight(m, layer)
    post = m.adapter.block_norm(layer, "post_mlp")
    return w if post is None else w * m.adapter.norm_scale(post).to(w.device)[None, :]


def in_weight(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]`` float32: rows are the neurons' (gate) input weights."""
    return m.adapter.W_in_layer(layer).detach().T.float()


@torch.no_grad()
def folded_unembed(m: LoadedModel) -> torch.Tensor:
    """``[d_model, n_vocab]`` float32: ``diag(gamma_f) W_U`` over the real tokens only
    (:func:`real_vocab_size`), centred over them and, for LayerNorm families, over
    ``d_model`` (see the module docstring)."""
    ad = m.adapter
    w_u = ad.W_U_folded().detach().float().to(_device(m))[:, :real_vocab_size(m)]  # [d_model, V]
    w_u = w_u - w_u.mean(1, keepdim=True)  # centre over the vocabulary
    if is_layernorm(m):
        w_u = w_u - w_u.mean(0, keepdim=True)  # centre over d_model
    return w_u


@torch.no_grad()
def folded_embed(m: LoadedModel) -> torch.Tensor:
    """``[n_vocab, d_model]`` float32: the real tokens' embedding rows, centred over
    ``d_model`` for LayerNorm."""
    w_e = m.adapter.W_E().detach().float().to(_device(m))[:real_vocab_size(m)]  # [V, d_model]
    return _centre_d(w_e) if is_layernorm(m) else w_e


@torch.no_grad()
def out_directions(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]``: each neuron's residual direction (:func:`residual_out_weight`) as
    the final norm sees it (centred over ``d_model`` for LayerNorm families)."""
    w = residual_out_weight(m, layer)
    return _centre_d(w) if is_layernorm(m) else w


@torch.no_grad()
def in_directions(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]``: each neuron's input weight with its MLP norm's scale folded in
    (``gamma * w_in``; Gemma ``(1 + w) * w_in``; no norm: ``w_in``), centred over ``d_model``
    for LayerNorm families."""
    w = in_weight(m, layer)  # [d_mlp, d_model]
    gamma = m.adapter.norm_scale(block_norm(m, layer, "mlp")).to(w.device)  # [d_model]
    w = w * gamma[None, :]
    return _centre_d(w) if is_layernorm(m) else w


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` scaled to unit norm along ``dim``; an all-zero vector stays zero (cosine 0)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-30)


def _targets(m: LoadedModel, side: Side) -> torch.Tensor:
    """``[d_model, n_vocab]`` unit columns the neurons are compared with."""
    if side == "out":
        return _unit(folded_unembed(m), 0)
    if side == "in":
        return _unit(folded_embed(m), 1).T
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def _directions(m: LoadedModel, side: Side, layer: int) -> torch.Tensor:
    return out_directions(m, layer) if side == "out" else in_directions(m, layer)


@torch.no_grad()
def iter_vocab_cosines(m: LoadedModel, side: Side = "out", layers: Sequence[int] | None = None,
                       neurons: Sequence[int] | None = None, *,
                       bytes_per_entry: int = 4, max_bytes: int = DEFAULT_MAX_BYTES
                       ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(layer, idx [nb], cos [nb, n_vocab])`` blocks of neuron-token cosines, over the
    real tokens (:func:`real_vocab_size`).

    ``side="out"``: cos(w_out, W_U' columns); ``side="in"``: cos(gamma * w_in, W_E rows)
    (module docstring). ``neurons`` restricts every layer to those indices. A block holds at
    most ``max_bytes / (vocab * bytes_per_entry)`` neurons; callers that make float64 copies
    of a block raise ``bytes_per_entry`` accordingly.
    """
    ad = m.adapter
    tgt = _targets(m, side)  # [d_model, n_vocab] unit columns, real tokens only
    nb = max(1, int(max_bytes // (tgt.shape[1] * bytes_per_entry)))
    for layer in (range(ad.n_layers) if layers is None else layers):
        idx = torch.arange(ad.d_mlp) if neurons is None else torch.as_tensor(neurons).long()
        dirs = _unit(_directions(m, side, layer), 1)  # [d_mlp, d_model]
        for s in range(0, len(idx), nb):
            i = idx[s:s + nb]
            yield layer, i, dirs[i.to(dirs.device)] @ tgt  # [nb, V]


def vocab_cosines(m: LoadedModel, layer: int | None = None, side: Side = "out") -> torch.Tensor:
    """``[n_neurons, vocab]`` float32 cosines of one layer's neurons (``layer``) or of all
    neurons (row ``layer * d_mlp + neuron``); see :func:`iter_vocab_cosines`.

    One layer of GPT-2 small is 0.6 GB; all layers (7.4 GB) is for small models only: large
    models should go through :func:`iter_vocab_cosines` or :func:`vocab_moments`.
    """
    layers = None if layer is None else [layer]
    return torch.cat([c for _, _, c in iter_vocab_cosines(m, side, layers)], dim=0)


@torch.no_grad()
def vocab_moments(m: LoadedModel, side: Side = "out", max_bytes: int = DEFAULT_MAX_BYTES
                  ) -> dict[str, np.ndarray]:
    """Per neuron ``mean, var, skew, kurt`` of its cosines over the vocabulary, each
    ``[n_layers, d_mlp]`` float64: population variance, biased skew, non-excess kurtosis
    (Gaussian = 3), as :class:`~unineurons.accumulators.moments.Moments` defines them."""
    ad = m.adapter
    out = {k: np.full((ad.n_layers, ad.d_mlp), np.nan) for k in ("mean", "var", "skew", "kurt")}
    # Moments works in float64 with ~6 temporaries of the block's size
    with progress(f"vocabulary moments ({side}) of {m.name}", ad.n_layers * ad.d_mlp,
                  unit="neurons") as bar:
        for layer, idx, cos in iter_vocab_cosines(m, side, bytes_per_entry=48,
                                                  max_bytes=max_bytes):
            res = Moments(len(idx), device=cos.device).update(cos.T).result()  # over the vocab
            for k in out:
                out[k][layer, idx.numpy()] = res[k].cpu().numpy()
            bar.advance(len(idx))
    return out


def _sided_cosines(m: LoadedModel, by_layer: dict[int, list[int]], max_bytes: int
                   ) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """``(side, layer, idx, cos)`` blocks of :func:`iter_vocab_cosines` for both sides and
    the neurons of ``by_layer`` (layer -> neuron indices)."""
    for side in ("out", "in"):
        for layer, ids in sorted(by_layer.items()):
            for _, idx, cos in iter_vocab_cosines(m, side, [layer], sorted(set(ids)),
                                                  max_bytes=max_bytes):
                yield side, layer, idx, cos


@torch.no_grad()
def vocab_table(m: LoadedModel, tokenizer: Any | None = None,
                neurons: Sequence[tuple[int, int]] | None = None, k: int = 20,
                max_bytes: int = DEFAULT_MAX_BYTES) -> pd.DataFrame:
    """The ``k`` tokens with the highest and lowest cosine per neuron and side (``vocab.parquet``).

    Columns: ``model, layer, neuron, side ('out'|'in'), direction ('top'|'bottom'), rank (1 =
    most extreme), token_id, token (the token's string by
    :func:`unineurons.tokenizer.vocab_strings` of ``tokenizer``, else ``m.tokenizer``: a
    SentencePiece ``▁in`` reads `` in``; None without either), cosine``. Only real token ids
    appear (:func:`real_vocab_size`). ``neurons`` None means every neuron of the model.
    """
    from ..tokenizer import vocab_strings

    ad = m.adapter
    tok = tokenizer if tokenizer is not None else m.tokenizer
    k = min(k, real_vocab_size(m, tokenizer))
    if neurons is None:
        by_layer = {layer: list(range(ad.d_mlp)) for layer in range(ad.n_layers)}
    else:
        by_layer = {}
        for layer, n in neurons:
            by_layer.setdefault(int(layer), []).append(int(n))
    cols: dict[str, list[np.ndarray]] = {c: [] for c in
                                         ("layer", "neuron", "side", "direction", "rank",
                                          "token_id", "cosine")}
    n_neurons = sum(len(set(ids)) for ids in by_layer.values())
    with progress(f"top tokens of {m.name}", 2 * n_neurons, unit="neurons") as bar:
        for side, layer, idx, cos in _sided_cosines(m, by_layer, max_bytes):
            for direction, sign in (("top", 1.0), ("bottom", -1.0)):
                val, tid = torch.topk(cos * sign, k, dim=1)  # [nb, k], largest first
                nb = len(idx)
                cols["layer"].append(np.full(nb * k, layer, dtype=np.int64))
                cols["neuron"].append(np.repeat(idx.numpy(), k))
                cols["side"].append(np.full(nb * k, side, dtype=object))
                cols["direction"].append(np.full(nb * k, direction, dtype=object))
                cols["rank"].append(np.tile(np.arange(1, k + 1, dtype=np.int64), nb))
                cols["token_id"].append(tid.reshape(-1).cpu().numpy().astype(np.int64))
                cols["cosine"].append((val * sign).reshape(-1).cpu().numpy()
                                      .astype(np.float32))
            bar.advance(len(idx))
    df = pd.DataFrame({c: np.concatenate(v) if v else np.array([]) for c, v in cols.items()})
    df.insert(0, "model", m.name)
    uniq = [int(i) for i in np.unique(df["token_id"].to_numpy())]
    if tok is None:
        texts: list[str | None] = [None] * len(uniq)
    elif hasattr(tok, "convert_ids_to_tokens"):
        texts = list(vocab_strings(tok, uniq))
    else:  # a bare object with decode([id]): its own strings
        texts = [tok.decode([i]) for i in uniq]
    strings = dict(zip(uniq, texts, strict=True))
    df.insert(df.columns.get_loc("token_id") + 1, "token", df["token_id"].map(strings))
    return df.astype({"layer": "int64", "neuron": "int64", "rank": "int64", "token_id": "int64",
                      "cosine": "float32"})
