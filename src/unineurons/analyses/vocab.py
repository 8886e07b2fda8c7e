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

__all__ = ["Side", "is_layernorm", "block_norm", "norm_scale", "in_weight", "out_weight",
           "folded_unembed", "folded_embed",
           "out_directions", "in_directions", "iter_vocab_cosines", "vocab_cosines",
           "vocab_moments", "vocab_table", "DEFAULT_MAX_BYTES"]

Side = Literal["out", "in"]

#: Per-block memory budget of the cosine computations.
DEFAULT_MAX_BYTES = 512 * 2**20

#: The norm in front of each block's MLP and attention, per family (attribute of the block).
_MLP_NORM = {"gpt2": "ln_2", "gpt_neox": "post_attention_layernorm",
             "llama": "post_attention_layernorm"}
_ATTN_NORM = {"gpt2": "ln_1", "gpt_neox": "input_layernorm", "llama": "input_layernorm"}


def is_layernorm(m: LoadedModel) -> bool:
    """True when the model's norms subtract the mean (LayerNorm), False for RMSNorm."""
    return isinstance(m.adapter.final_norm(), nn.LayerNorm)


def block_norm(m: LoadedModel, layer: int, which: Literal["mlp", "attn"]) -> nn.Module:
    """The norm module in front of block ``layer``'s MLP (``"mlp"``) or attention (``"attn"``)."""
    table = _MLP_NORM if which == "mlp" else _ATTN_NORM
    return getattr(m.adapter.blocks[layer], table[m.adapter.family])


def _device(m: LoadedModel) -> torch.device:
    return next(m.model.parameters()).device


def norm_scale(norm: nn.Module, d: int, device: torch.device) -> torch.Tensor:
    """``[d]`` float32: the norm's elementwise scale (ones when it has none)."""
    w = getattr(norm, "weight", None)
    if w is None:
        return torch.ones(d, device=device)
    return w.detach().float().to(device)


def _centre_d(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last axis (d_model)."""
    return x - x.mean(-1, keepdim=True)


def out_weight(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]`` float32, this layer only (GPT-2's Conv1D stores [in, out])."""
    ad = m.adapter
    w = ad.out_proj(layer).weight.detach()
    return (w if ad.spec.conv1d else w.T).float()


def in_weight(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]`` float32: rows are the neurons' (gate) input weights."""
    ad = m.adapter
    w = ad.pre_act_proj(layer).weight.detach()
    return (w.T if ad.spec.conv1d else w).float()


@torch.no_grad()
def folded_unembed(m: LoadedModel) -> torch.Tensor:
    """``[d_model, vocab]`` float32: ``diag(gamma_f) W_U``, centred over the vocabulary and, for
    LayerNorm families, over ``d_model`` (see the module docstring)."""
    ad = m.adapter
    dev = _device(m)
    w_u = ad.W_U_raw().detach().float().to(dev)  # [d_model, V]
    w_u = norm_scale(ad.final_norm(), ad.d_model, dev)[:, None] * w_u  # [d_model, V]
    w_u = w_u - w_u.mean(1, keepdim=True)  # centre over the vocabulary
    if is_layernorm(m):
        w_u = w_u - w_u.mean(0, keepdim=True)  # centre over d_model
    return w_u


@torch.no_grad()
def folded_embed(m: LoadedModel) -> torch.Tensor:
    """``[vocab, d_model]`` float32: the embedding, centred over ``d_model`` for LayerNorm."""
    w_e = m.adapter.W_E().detach().float().to(_device(m))  # [V, d_model]
    return _centre_d(w_e) if is_layernorm(m) else w_e


@torch.no_grad()
def out_directions(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]``: each neuron's ``w_out`` as the final norm sees it (centred over
    ``d_model`` for LayerNorm families, unchanged for RMSNorm)."""
    w = out_weight(m, layer)
    return _centre_d(w) if is_layernorm(m) else w


@torch.no_grad()
def in_directions(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[d_mlp, d_model]``: each neuron's input weight with its MLP norm's scale folded in
    (``gamma * w_in``), centred over ``d_model`` for LayerNorm families."""
    w = in_weight(m, layer)  # [d_mlp, d_model]
    gamma = norm_scale(block_norm(m, layer, "mlp"), m.adapter.d_model, w.device)  # [d_model]
    w = w * gamma[None, :]
    return _centre_d(w) if is_layernorm(m) else w


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` scaled to unit norm along ``dim``; an all-zero vector stays zero (cosine 0)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-30)


def _targets(m: LoadedModel, side: Side) -> torch.Tensor:
    """``[d_model, vocab]`` unit columns the neurons are compared with."""
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
    """Yield ``(layer, idx [nb], cos [nb, vocab])`` blocks of neuron-token cosines.

    ``side="out"``: cos(w_out, W_U' columns); ``side="in"``: cos(gamma * w_in, W_E rows)
    (module docstring). ``neurons`` restricts every layer to those indices. A block holds at
    most ``max_bytes / (vocab * bytes_per_entry)`` neurons; callers that make float64 copies
    of a block raise ``bytes_per_entry`` accordingly.
    """
    ad = m.adapter
    tgt = _targets(m, side)  # [d_model, V] unit columns
    nb = max(1, int(max_bytes // (ad.vocab_size * bytes_per_entry)))
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
    for layer, idx, cos in iter_vocab_cosines(m, side, bytes_per_entry=48, max_bytes=max_bytes):
        res = Moments(len(idx), device=cos.device).update(cos.T).result()  # over the vocab
        for k in out:
            out[k][layer, idx.numpy()] = res[k].cpu().numpy()
    return out


def _decoder(tokenizer: Any | None):
    """token id -> decoded string (None without a tokenizer), cached per id."""
    cache: dict[int, str | None] = {}

    def decode(i: int) -> str | None:
        if i not in cache:
            cache[i] = None if tokenizer is None else tokenizer.decode([i])
        return cache[i]

    return decode


@torch.no_grad()
def vocab_table(m: LoadedModel, tokenizer: Any | None = None,
                neurons: Sequence[tuple[int, int]] | None = None, k: int = 20,
                max_bytes: int = DEFAULT_MAX_BYTES) -> pd.DataFrame:
    """The ``k`` tokens with the highest and lowest cosine per neuron and side (``vocab.parquet``).

    Columns: ``model, layer, neuron, side ('out'|'in'), direction ('top'|'bottom'), rank (1 =
    most extreme), token_id, token (decoded with ``tokenizer``, else ``m.tokenizer``; None
    without either), cosine``. ``neurons`` None means every neuron of the model.
    """
    ad = m.adapter
    tok = tokenizer if tokenizer is not None else m.tokenizer
    k = min(k, ad.vocab_size)
    if neurons is None:
        by_layer = {layer: list(range(ad.d_mlp)) for layer in range(ad.n_layers)}
    else:
        by_layer = {}
        for layer, n in neurons:
            by_layer.setdefault(int(layer), []).append(int(n))
    cols: dict[str, list[np.ndarray]] = {c: [] for c in
                                         ("layer", "neuron", "side", "direction", "rank",
                                          "token_id", "cosine")}
    for side in ("out", "in"):
        for layer, ids in sorted(by_layer.items()):
            for _, idx, cos in iter_vocab_cosines(m, side, [layer], sorted(set(ids)),
                                                  max_bytes=max_bytes):
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
    df = pd.DataFrame({c: np.concatenate(v) if v else np.array([]) for c, v in cols.items()})
    decode = _decoder(tok)
    df.insert(0, "model", m.name)
    strings = {int(i): decode(int(i)) for i in np.unique(df["token_id"].to_numpy())}
    df.insert(df.columns.get_loc("token_id") + 1, "token", df["token_id"].map(strings))
    return df.astype({"layer": "int64", "neuron": "int64", "rank": "int64", "token_id": "int64",
                      "cosine": "float32"})
