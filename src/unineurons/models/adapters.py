"""Architecture adapters: where each model family keeps its MLP, in one vocabulary.

A neuron's activation is defined the same way for every family: **the input of the MLP's
output projection** (GPT-2 ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``, Llama
``mlp.down_proj``). Capture and intervention are both forward pre-hooks on that one module,
so what we measure is exactly what we ablate.

Weights come out in one orientation whatever the checkpoint stores (GPT-2's ``Conv1D`` keeps
``[in, out]``, ``nn.Linear`` keeps ``[out, in]``)::

    W_in  [L, d_model, d_mlp]     b_in  [L, d_mlp]
    W_out [L, d_mlp, d_model]     b_out [L, d_model]
    W_E   [vocab, d_model]        W_U   [d_model, vocab]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnineuronsError

__all__ = ["ArchSpec", "Adapter", "ARCHITECTURES", "get_adapter", "parse_neuron", "neuron_name"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family (dotted, relative to the HF model)."""

    blocks: str  #: the ModuleList of transformer blocks
    mlp: str  #: the MLP inside a block
    in_proj: str  #: the MLP's input projection (GPT-2 c_fc; Llama up_proj)
    out_proj: str  #: the MLP's output projection: its input is the neuron activation
    act: str  #: the nonlinearity module or function attribute inside the MLP
    final_norm: str  #: the LayerNorm / RMSNorm before the unembedding
    attn: str  #: the attention module inside a block
    gate_proj: str | None = None  #: gated MLPs (Llama): act(gate(x)) * up(x)
    conv1d: bool = False  #: GPT-2 Conv1D stores weights as [in, out]


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        blocks="transformer.h", mlp="mlp", in_proj="c_fc", out_proj="c_proj", act="act",
        final_norm="transformer.ln_f", attn="attn", conv1d=True,
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers", mlp="mlp", in_proj="dense_h_to_4h", out_proj="dense_4h_to_h",
        act="act", final_norm="gpt_neox.final_layer_norm", attn="attention",
    ),
    "llama": ArchSpec(
        blocks="model.layers", mlp="mlp", in_proj="up_proj", out_proj="down_proj",
        act="act_fn", final_norm="model.norm", attn="self_attn", gate_proj="gate_proj",
    ),
}


def neuron_name(layer: int, index: int) -> str:
    """The canonical address of a neuron: ``L{layer}.N{index}``."""
    return f"L{layer}.N{index}"


def parse_neuron(address: str) -> tuple[int, int]:
    """Parse ``L{layer}.N{index}`` into ``(layer, index)``."""
    try:
        lpart, npart = address.strip().split(".")
        if not (lpart[0] in "lL" and npart[0] in "nN"):
            raise ValueError
        return int(lpart[1:]), int(npart[1:])
    except (ValueError, IndexError):
        raise UnineuronsError(
            f"neuron address {address!r} is not of the form L{{layer}}.N{{index}}, e.g. L3.N1021"
        ) from None


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _linear_weight(mod: nn.Module, conv1d: bool) -> torch.Tensor:
    """Weight as [in, out] whatever the storage."""
    w = mod.weight
    return w if conv1d else w.T


class Adapter:
    """One model seen through its family's :class:`ArchSpec`.

    Knows the sizes, the hook points and the weights in the canonical orientation.
    """

    def __init__(self, model: nn.Module, family: str):
        self.model = model
        self.family = family
        self.spec = ARCHITECTURES[family]
        self.blocks = _get(model, self.spec.blocks)
        self.n_layers = len(self.blocks)
        first = self.out_proj(0)
        w = _linear_weight(first, self.spec.conv1d)  # [d_mlp, d_model]
        self.d_mlp, self.d_model = int(w.shape[0]), int(w.shape[1])
        self.vocab_size = int(self.W_U_raw().shape[1])

    # ---- module access -------------------------------------------------------------------
    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.spec.mlp)

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.spec.out_proj)

    def in_proj(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.spec.in_proj)

    def pre_act_proj(self, layer: int) -> nn.Module:
        """The projection whose output goes through the nonlinearity (the pre-activation)."""
        name = self.spec.gate_proj or self.spec.in_proj
        return getattr(self.mlp(layer), name)

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.spec.attn)

    def act_fn(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(self.mlp(layer), self.spec.act)

    def hook_point(self, layer: int) -> str:
        """The HF module path whose input is the activation of layer ``layer``'s neurons."""
        return f"{self.spec.blocks}.{layer}.{self.spec.mlp}.{self.spec.out_proj}"

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    # ---- weights, canonical orientation --------------------------------------------------
    @torch.no_grad()
    def W_in(self) -> torch.Tensor:
        """[L, d_model, d_mlp]: for gated MLPs the gate projection (its output is the pre-activation)."""
        return torch.stack(
            [_linear_weight(self.pre_act_proj(layer), self.spec.conv1d) for layer in range(self.n_layers)]
        )

    @torch.no_grad()
    def b_in(self) -> torch.Tensor:
        """[L, d_mlp]; zeros where the projection has no bias."""
        out = []
        for layer in range(self.n_layers):
            b = getattr(self.pre_act_proj(layer), "bias", None)
            out.append(b if b is not None else torch.zeros(self.d_mlp))
        return torch.stack(out)

    @torch.no_grad()
    def W_out(self) -> torch.Tensor:
        """[L, d_mlp, d_model]."""
        return torch.stack(
            [_linear_weight(self.out_proj(layer), self.spec.conv1d) for layer in range(self.n_layers)]
        )

    @torch.no_grad()
    def b_out(self) -> torch.Tensor:
        """[L, d_model]; zeros where the projection has no bias."""
        out = []
        for layer in range(self.n_layers):
            b = getattr(self.out_proj(layer), "bias", None)
            out.append(b if b is not None else torch.zeros(self.d_model))
        return torch.stack(out)

    @torch.no_grad()
    def W_E(self) -> torch.Tensor:
        """[vocab, d_model]."""
        return self.model.get_input_embeddings().weight

    @torch.no_grad()
    def W_U_raw(self) -> torch.Tensor:
        """[d_model, vocab], without the final norm folded in."""
        # HF's accessor, not a path: GPT-NeoX's head moved from embed_out to lm_head in v5
        return self.model.get_output_embeddings().weight.T

    @torch.no_grad()
    def W_U(self) -> torch.Tensor:
        """[d_model, vocab]."""
        return self.W_U_raw()

    # ---- hooks ---------------------------------------------------------------------------
    @contextmanager
    def capture(self, layers: list[int] | None = None, pre_activation: bool = False
                ) -> Iterator[dict[int, torch.Tensor]]:
        """Record activations ``[B, T, d_mlp]`` per layer while the block is active.

        With ``pre_activation`` the dict also gets ``-1 - layer`` keys holding the value
        before the nonlinearity. Hooks are removed in ``finally``.
        """
        layers = list(range(self.n_layers)) if layers is None else layers
        store: dict[int, torch.Tensor] = {}
        handles = []
        try:
            for layer in layers:
                def pre_hook(_mod, args, layer=layer):
                    store[layer] = args[0].detach()
                handles.append(self.out_proj(layer).register_forward_pre_hook(pre_hook))
                if pre_activation:
                    def fwd_hook(_mod, _args, out, layer=layer):
                        store[-1 - layer] = out.detach()
                    handles.append(self.pre_act_proj(layer).register_forward_hook(fwd_hook))
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def intervene(self, fn: Callable[[int, torch.Tensor], torch.Tensor],
                  layers: list[int] | None = None) -> Iterator[None]:
        """Replace each layer's activation ``[B, T, d_mlp]`` by ``fn(layer, act)``."""
        layers = list(range(self.n_layers)) if layers is None else layers
        handles = []
        try:
            for layer in layers:
                def pre_hook(_mod, args, layer=layer):
                    return (fn(layer, args[0]),) + tuple(args[1:])
                handles.append(self.out_proj(layer).register_forward_pre_hook(pre_hook))
            yield
        finally:
            for h in handles:
                h.remove()


def get_adapter(model: nn.Module, name: str = "model") -> Adapter:
    """The adapter for ``model``'s family, or a clear error listing the supported ones."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in ARCHITECTURES:
        raise UnineuronsError(
            f"{name}: architecture {family!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return Adapter(model, family)
