"""The activation stream: every model runs once per batch of contexts.

For each batch of contexts read in store order, every model runs one forward pass with
capture hooks on its MLP output projections (see :mod:`unineurons.models.adapters`), and the
stream yields per model the activations of all layers, flattened to ``[n, L * d_mlp]`` (column
``layer * d_mlp + neuron``) over the *kept* positions. By default the positions holding BOS,
EOS, pad or a newline token are dropped, as in Gurnee et al.

Consumers (accumulators) never see a model twice for the same tokens: correlating K models
costs K forward passes per batch, whatever the number of pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UnineuronsError
from .models.load import LoadedModel

__all__ = ["MaskConfig", "StreamBatch", "activation_stream", "token_mask", "flat_index"]


@dataclass(frozen=True)
class MaskConfig:
    """Which positions the stream drops before any statistic sees them."""

    drop_bos: bool = True  #: the BOS token starting every context (an attention sink, not text)
    drop_eos: bool = True  #: document separators
    drop_pad: bool = True  #: padding
    drop_newline: bool = True  #: tokens that are only whitespace with a newline


def flat_index(layer: int, neuron: int, d_mlp: int) -> int:
    """Column of neuron ``L{layer}.N{neuron}`` in a flattened activation row."""
    return layer * d_mlp + neuron


def token_mask(tokens: torch.Tensor, special: dict, cfg: MaskConfig) -> torch.Tensor:
    """Bool ``[B, T]``: True where the position is kept."""
    drop: list[int] = []
    if cfg.drop_bos and special.get("bos_id") is not None:
        drop.append(int(special["bos_id"]))
    if cfg.drop_eos and special.get("eos_id") is not None:
        drop.append(int(special["eos_id"]))
    if cfg.drop_pad and special.get("pad_id") is not None:
        drop.append(int(special["pad_id"]))
    if cfg.drop_newline:
        drop.extend(int(i) for i in special.get("newline_ids", []))
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if drop:
        keep &= ~torch.isin(tokens, torch.tensor(sorted(set(drop)), dtype=tokens.dtype))
    if cfg.drop_bos:
        keep[:, 0] = False  # column 0 is BOS by construction of the token store
    return keep


@dataclass
class StreamBatch:
    """One batch of the stream. ``n`` = number of kept positions in the batch."""

    start: int  #: index (in the token store) of the first context of this batch
    tokens: torch.Tensor  #: [B, T] int64, the contexts
    mask: torch.Tensor  #: [B, T] bool, kept positions
    rows: torch.Tensor  #: [n] int64, token-store row of each kept position
    positions: torch.Tensor  #: [n] int64, position in its context
    token_ids: torch.Tensor  #: [n] int64, the token at the position
    prev_token_ids: torch.Tensor  #: [n] int64, the token before it
    acts: list[torch.Tensor]  #: per model [n, L * d_mlp], on the compute device
    pre_acts: list[torch.Tensor] | None = None  #: per model [n, L * d_mlp] (pre-nonlinearity)

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])


@torch.inference_mode()
def _run_one(m: LoadedModel, tokens: torch.Tensor, kept: torch.Tensor, pre_activation: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations (and pre-activations) ``[n, L*d_mlp]`` at the flat positions ``kept [n]``
    (``b * T + t``, ascending) of ``tokens [B, T]``."""
    ad = m.adapter
    with ad.capture(pre_activation=pre_activation) as store:
        # the base model (GPT2Model, GPTNeoXModel, LlamaModel) holds every MLP the hooks sit on;
        # skipping the LM head saves its [B, T, vocab] logits (the largest tensor of a forward
        # pass) and the unembedding's FLOPs without changing any activation
        m.model.base_model(input_ids=tokens, use_cache=False)
    d = ad.d_mlp

    def gather(keys: list[int]) -> torch.Tensor:  # [n, len(keys) * d_mlp], block i from keys[i]
        # pop each layer as it is copied: the full-batch capture and the kept rows coexist
        # once (stacking every layer and then masking held three copies at once). The row
        # count and indices come from the host, so on a GPU nothing waits for the device here
        # (a boolean mask would: its result size is data-dependent)
        first = store[keys[0]]
        out = torch.empty(kept.shape[0], len(keys) * d, dtype=first.dtype, device=first.device)
        for i, k in enumerate(keys):
            out[:, i * d:(i + 1) * d] = store.pop(k).reshape(-1, d).index_select(0, kept)
        return out

    acts = gather(list(range(ad.n_layers)))  # [n, L*d_mlp], column layer * d_mlp + neuron
    pre = gather([-1 - layer for layer in range(ad.n_layers)]) if pre_activation else None
    if not torch.isfinite(acts).all():
        raise UnineuronsError(
            f"model {m.name}: non-finite (NaN/inf) activations in this batch of contexts; "
            "the weights are broken or the dtype overflows: try --dtype float32"
        )
    return acts, pre


def activation_stream(
    models: Sequence[LoadedModel],
    contexts: np.ndarray,
    special: dict,
    *,
    batch_size: int = 16,
    start: int = 0,
    mask: MaskConfig = MaskConfig(),
    pre_activation: bool = False,
    device: str | torch.device = "cpu",
) -> Iterator[StreamBatch]:
    """Yield :class:`StreamBatch` es over ``contexts[start:]`` in order.

    ``contexts`` is ``[n_contexts, ctx]`` (e.g. ``TokenStore.contexts(n_tokens)``);
    ``special`` holds ``bos_id``, ``eos_id``, ``pad_id``, ``newline_ids`` (the token store
    manifest's ``tokenizer`` section).
    """
    if batch_size < 1:
        raise UnineuronsError(f"--batch-size must be at least 1, got {batch_size}")
    n_ctx = contexts.shape[0]
    for b0 in range(start, n_ctx, batch_size):
        chunk = np.asarray(contexts[b0:b0 + batch_size]).astype(np.int64)
        tokens = torch.from_numpy(chunk)  # [B, T]
        for m in models:
            if int(tokens.max()) >= m.adapter.vocab_size:
                raise UnineuronsError(
                    f"model {m.name}: token id {int(tokens.max())} is outside its vocabulary of "
                    f"{m.adapter.vocab_size}; the token store was made with another tokenizer"
                )
        keep = token_mask(tokens, special, mask)  # [B, T]
        rows_grid = torch.arange(b0, b0 + tokens.shape[0]).unsqueeze(1).expand_as(tokens)
        pos_grid = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        prev = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
        dev_tokens = tokens.to(device)
        kept = keep.flatten().nonzero().squeeze(1).to(device)  # [n] flat positions
        outs = [_run_one(m, dev_tokens, kept, pre_activation) for m in models]
        acts, pres = [a for a, _ in outs], [p for _, p in outs]
        out = [StreamBatch(
            start=b0, tokens=tokens, mask=keep, rows=rows_grid[keep], positions=pos_grid[keep],
            token_ids=tokens[keep], prev_token_ids=prev[keep], acts=acts,
            pre_acts=pres if pre_activation else None,
        )]
        # yield the batch without keeping a reference in this frame: a consumer that drops it
        # (a fold) frees its activations at once, not when the next batch is made
        del outs, acts, pres
        yield out.pop()
