"""Forward passes that restart at a layer: a patch at layer ``l`` changes nothing below ``l``.

An intervention fixes neurons of layer ``l`` (:mod:`unineurons.analyses.interventions`); the
blocks ``0 .. l-1`` compute exactly what they compute in the clean forward of the same tokens.
So the clean forward records the residual stream entering block ``l`` once per batch
(:func:`record_block_inputs`), and every patched forward of that batch runs under
:func:`restart_at`: blocks below ``l`` return their input untouched (no attention, no MLP),
and block ``l`` reads the recorded residual instead. Blocks ``l ..`` then run as usual, then
the final norm and the unembedding. The model's own ``forward`` still runs, so the attention
mask, position ids and rotary embeddings (GPT-NeoX, Llama) are made exactly as in a full
forward: nothing of the model's code is re-implemented, and the result equals the full
patched forward (``tests/test_partial_forward.py``: GPT-2, GPT-NeoX, Llama).

Cost of a patched forward: the embedding plus ``L - l`` blocks plus the head, instead of ``L``
blocks plus the head: for a last-layer neuron of a 30-layer model, one block and the head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import Adapter

__all__ = ["BlockInputs", "record_block_inputs", "restart_at"]


class BlockInputs(dict):
    """``layer -> [B, T, d_model]``: the residual stream entering block ``layer`` in one clean
    forward, plus ``tail``: what a block returns besides its hidden states (a tuple's other
    items; ``None`` when blocks return a bare tensor, as in transformers 5)."""

    tail: tuple | None = None


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_block_inputs(adapter: Adapter, layers: Sequence[int]) -> Iterator[BlockInputs]:
    """Within the block, a forward of the model records the input of each block in ``layers``
    (``[B, T, d_model]``, detached) and the shape of a block's output. Hooks are removed in
    ``finally``."""
    store = BlockInputs()
    handles = []

    def out_hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        store.tail = tuple(out[1:]) if isinstance(out, tuple) else None

    try:
        for layer in sorted(set(layers)):
            def pre(_mod, args, kwargs, layer=layer):
                store[layer] = _hidden_arg(args, kwargs).detach()
            handles.append(adapter.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(adapter.blocks[0].register_forward_hook(out_hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def _passthrough(tail: tuple | None):
    def forward(hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        h = hidden_states if hidden_states is not None else kwargs["hidden_states"]
        return h if tail is None else (h, *tail)
    return forward


@contextmanager
def restart_at(adapter: Adapter, layer: int, inputs: BlockInputs) -> Iterator[None]:
    """Within the block, a forward of the model on the tokens ``inputs`` was recorded on skips
    blocks ``0 .. layer-1`` and feeds block ``layer`` the recorded residual ``inputs[layer]``.

    ``layer`` 0, or a layer ``inputs`` does not hold, is a full forward (nothing changes).
    Only valid while nothing below ``layer`` differs from the recorded forward: the tokens,
    weights and every intervention below ``layer`` must be the same.
    """
    if layer <= 0 or layer not in inputs:
        yield
        return
    cached = inputs[layer]
    with ExitStack() as stack:
        for i in range(layer):
            blk = adapter.blocks[i]
            blk.forward = _passthrough(inputs.tail)  # instance attribute: shadows the class's
            stack.callback(delattr, blk, "forward")

        def pre(_mod, args, kwargs):
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        h = adapter.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
        stack.callback(h.remove)
        yield
