"""Architecture adapters: where each model family keeps its MLP, in one vocabulary.

A neuron's activation is defined the same way for every family: **the input of the MLP's
output projection** (GPT-2 ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``, Llama
``mlp.down_proj``, GPT-J ``mlp.fc_out``, OPT ``fc2``; for Phi-3's fused ``gate_up_proj`` the
input of ``down_proj``, i.e. ``up * act(gate)``). Capture and intervention are both forward
pre-hooks on that one module, so what we measure is exactly what we ablate.

Supported families (:data:`ARCHITECTURES`, keyed by ``config.model_type``): gpt2, gpt_neox,
gptj, opt (LayerNorm; OLMo's weightless LayerNorm too: olmo) and llama, mistral, qwen2,
qwen3, gemma, gemma2, olmo2, phi3 (RMSNorm; Gemma's scales by ``1 + w``).

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

__all__ = ["ArchSpec", "Adapter", "ARCHITECTURES", "get_adapter", "parse_neuron", "neuron_name",
           "mlp_shape_from_config"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths and conventions of one model family (dotted, relative to the HF model).

    Block-level norms (``mlp_norm``, ``attn_norm``, ``post_mlp_norm``) are attributes of the
    block; None means the family has no such norm (OLMo-2 normalises after the MLP, not
    before it).
    """

    blocks: str  #: the ModuleList of transformer blocks
    mlp: str  #: the MLP inside a block; "" when the MLP's modules sit on the block (OPT)
    in_proj: str  #: the MLP's input projection (GPT-2 c_fc; Llama up_proj; Phi-3 gate_up_proj)
    out_proj: str  #: the MLP's output projection: its input is the neuron activation
    act: str  #: the nonlinearity module or function attribute inside the MLP
    final_norm: str  #: the LayerNorm / RMSNorm before the unembedding
    attn: str  #: the attention module inside a block
    mlp_norm: str | None  #: the norm in front of the MLP (block attribute)
    attn_norm: str | None  #: the norm in front of the attention (block attribute)
    gate_proj: str | None = None  #: gated MLPs (Llama): act(gate(x)) * up(x)
    fused_gate_up: bool = False  #: Phi-3: in_proj outputs [gate | up], gate first
    conv1d: bool = False  #: GPT-2 Conv1D stores weights as [in, out]
    layernorm: bool = False  #: norms subtract the mean (LayerNorm) rather than RMSNorm
    norm_offset: float = 0.0  #: a norm scales by ``norm_offset + weight`` (Gemma: 1 + w)
    post_mlp_norm: str | None = None  #: a norm applied to the MLP's output (Gemma-2, OLMo-2)
    flat_tokens: bool = False  #: the MLP sees ``[B*T, d_model]`` (OPT reshapes)
    attn_layout: str = "q_k_proj"  #: gpt2 | neox | q_k_proj | qkv_fused (attention analysis)
    qk_norm: bool = False  #: queries / keys are normalised after projection (Qwen-3, OLMo-2)


def _llama_like(**kw) -> ArchSpec:
    """Llama's layout: model.layers.N.{self_attn, mlp.{gate,up,down}_proj}, model.norm."""
    base = dict(blocks="model.layers", mlp="mlp", in_proj="up_proj", out_proj="down_proj",
                act="act_fn", final_norm="model.norm", attn="self_attn",
                mlp_norm="post_attention_layernorm", attn_norm="input_layernorm",
                gate_proj="gate_proj")
    return ArchSpec(**{**base, **kw})


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        blocks="transformer.h", mlp="mlp", in_proj="c_fc", out_proj="c_proj", act="act",
        final_norm="transformer.ln_f", attn="attn", mlp_norm="ln_2", attn_norm="ln_1",
        conv1d=True, layernorm=True, attn_layout="gpt2",
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers", mlp="mlp", in_proj="dense_h_to_4h", out_proj="dense_4h_to_h",
        act="act", final_norm="gpt_neox.final_layer_norm", attn="attention",
        mlp_norm="post_attention_layernorm", attn_norm="input_layernorm", layernorm=True,
        attn_layout="neox",
    ),
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(qk_norm=True),
    "gemma": _llama_like(norm_offset=1.0),
    # Gemma-2 normalises the MLP's input and output; post_attention_layernorm is the
    # attention's output norm there
    "gemma2": _llama_like(norm_offset=1.0, mlp_norm="pre_feedforward_layernorm",
                          post_mlp_norm="post_feedforward_layernorm"),
    # OLMo: LayerNorm without weights or biases
    "olmo": _llama_like(layernorm=True),
    # OLMo-2: no norm in front of attention or MLP; each one's output is normalised
    "olmo2": _llama_like(mlp_norm=None, attn_norm=None, post_mlp_norm="post_feedforward_layernorm",
                         qk_norm=True),
    "phi3": _llama_like(in_proj="gate_up_proj", gate_proj=None, fused_gate_up=True,
                        act="activation_fn", attn_layout="qkv_fused"),
    # GPT-J: attention and MLP both read ln_1 (parallel residual)
    "gptj": ArchSpec(
        blocks="transformer.h", mlp="mlp", in_proj="fc_in", out_proj="fc_out", act="act",
        final_norm="transformer.ln_f", attn="attn", mlp_norm="ln_1", attn_norm="ln_1",
        layernorm=True,
    ),
    # OPT: fc1 / fc2 sit on the decoder layer itself, which flattens tokens before the MLP
    "opt": ArchSpec(
        blocks="model.decoder.layers", mlp="", in_proj="fc1", out_proj="fc2",
        act="activation_fn", final_norm="model.decoder.final_layer_norm", attn="self_attn",
        mlp_norm="final_layer_norm", attn_norm="self_attn_layer_norm", layernorm=True,
        flat_tokens=True,
    ),
}


def mlp_shape_from_config(cfg) -> tuple[int, int]:
    """``(n_layers, d_mlp)`` read from a transformers config of a supported family.

    The names differ per family: GPT-2 / GPT-J ``n_layer`` and ``n_inner`` (None means
    ``4 * n_embd``), OPT ``ffn_dim``, the others ``num_hidden_layers`` and
    ``intermediate_size``. Raises :class:`UnineuronsError` for an unsupported family.
    """
    fam = getattr(cfg, "model_type", None)
    if fam not in ARCHITECTURES:
        raise UnineuronsError(f"architecture {fam!r} is not supported; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}")
    if fam in ("gpt2", "gptj"):
        return int(cfg.n_layer), int(cfg.n_inner or 4 * cfg.n_embd)
    if fam == "opt":
        return int(cfg.num_hidden_layers), int(cfg.ffn_dim)
    return int(cfg.num_hidden_layers), int(cfg.intermediate_size)


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


def _check_supported(model: nn.Module, family: str, name: str) -> None:
    """Refuse variants of a supported family whose layout the adapter does not describe."""
    cfg = getattr(model, "config", None)
    if family == "opt" and (not getattr(cfg, "do_layer_norm_before", True)
                            or getattr(cfg, "word_embed_proj_dim", None) not in (None, cfg.hidden_size)):
        raise UnineuronsError(
            f"{name}: OPT with post-norm layers or an embedding projection (opt-350m's layout) is "
            "not supported: its final norm and unembedding do not read the residual stream; use "
            "another OPT size")


class Adapter:
    """One model seen through its family's :class:`ArchSpec`.

    Knows the sizes, the hook points and the weights in the canonical orientation.
    ``vocab_size`` is the number of unembedding columns (a padded vocabulary included);
    ``n_vocab`` the number of real tokens once known (:meth:`set_n_vocab`), else None.
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
        self.n_vocab: int | None = None

    def set_n_vocab(self, n_tokens: int) -> int:
        """Record the real vocabulary: ``min(n_tokens, vocab_size)`` (a tokenizer never adds
        rows to the matrices; padding rows past it are no tokens). Returns it."""
        if n_tokens < 1:
            raise UnineuronsError(f"a tokenizer of {n_tokens} tokens is empty; give a real one")
        self.n_vocab = min(int(n_tokens), self.vocab_size)
        return self.n_vocab

    # ---- module access -------------------------------------------------------------------
    def mlp(self, layer: int) -> nn.Module:
        """The module holding the MLP's projections (the block itself for OPT)."""
        block = self.blocks[layer]
        return getattr(block, self.spec.mlp) if self.spec.mlp else block

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.spec.out_proj)

    def in_proj(self, layer: int) -> nn.Module:
        """The input projection module (Phi-3: the fused gate/up projection)."""
        return getattr(self.mlp(layer), self.spec.in_proj)

    def pre_act_proj(self, layer: int) -> nn.Module:
        """The projection whose output goes through the nonlinearity (the pre-activation);
        for Phi-3 the fused projection, whose first ``d_mlp`` outputs are the gate."""
        name = self.spec.gate_proj or self.spec.in_proj
        return getattr(self.mlp(layer), name)

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.spec.attn)

    def act_fn(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(self.mlp(layer), self.spec.act)

    def block_norm(self, layer: int, which: str) -> nn.Module | None:
        """The norm in front of block ``layer``'s ``"mlp"`` or ``"attn"``, or applied to the
        MLP's output (``"post_mlp"``); None where the family has none."""
        name = {"mlp": self.spec.mlp_norm, "attn": self.spec.attn_norm,
                "post_mlp": self.spec.post_mlp_norm}[which]
        return None if name is None else getattr(self.blocks[layer], name)

    def norm_scale(self, norm: nn.Module | None) -> torch.Tensor:
        """``[d_model]`` float32: the elementwise factor ``norm`` multiplies its normalised
        input by: ``weight`` (``1 + weight`` for Gemma), ones without a weight or norm."""
        w = getattr(norm, "weight", None) if norm is not None else None
        if w is None:
            return torch.ones(self.d_model, device=self.W_U_raw().device)
        return w.detach().float() + self.spec.norm_offset

    def hook_point(self, layer: int) -> str:
        """The HF module path whose input is the activation of layer ``layer``'s neurons."""
        mlp = f".{self.spec.mlp}" if self.spec.mlp else ""
        return f"{self.spec.blocks}.{layer}{mlp}.{self.spec.out_proj}"

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    # ---- weights, canonical orientation --------------------------------------------------
    def _gate_up(self, layer: int, part: int) -> torch.Tensor:
        """Phi-3: rows ``[part * d_mlp, (part + 1) * d_mlp)`` of the fused weight, [d_model, d_mlp]."""
        w = self.in_proj(layer).weight  # [2 d_mlp, d_model]
        return w[part * self.d_mlp:(part + 1) * self.d_mlp].T

    @torch.no_grad()
    def W_in_layer(self, layer: int) -> torch.Tensor:
        """[d_model, d_mlp]: the weight of the pre-activation (gated MLPs: the gate)."""
        if self.spec.fused_gate_up:
            return self._gate_up(layer, 0)
        return _linear_weight(self.pre_act_proj(layer), self.spec.conv1d)

    @torch.no_grad()
    def W_up_layer(self, layer: int) -> torch.Tensor | None:
        """[d_model, d_mlp]: gated MLPs' up projection (``act(gate) * up``); None otherwise."""
        if self.spec.fused_gate_up:
            return self._gate_up(layer, 1)
        if self.spec.gate_proj is None:
            return None
        return _linear_weight(self.in_proj(layer), self.spec.conv1d)

    @torch.no_grad()
    def b_in_layer(self, layer: int) -> torch.Tensor:
        """[d_mlp]; zeros where the projection has no bias."""
        b = getattr(self.pre_act_proj(layer), "bias", None)
        if b is None:
            return torch.zeros(self.d_mlp, device=self.W_U_raw().device)
        return b[: self.d_mlp]

    @torch.no_grad()
    def W_out_layer(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]."""
        return _linear_weight(self.out_proj(layer), self.spec.conv1d)

    @torch.no_grad()
    def W_in(self) -> torch.Tensor:
        """[L, d_model, d_mlp]: for gated MLPs the gate projection (its output is the pre-activation)."""
        return torch.stack([self.W_in_layer(layer) for layer in range(self.n_layers)])

    @torch.no_grad()
    def b_in(self) -> torch.Tensor:
        """[L, d_mlp]; zeros where the projection has no bias."""
        return torch.stack([self.b_in_layer(layer) for layer in range(self.n_layers)])

    @torch.no_grad()
    def W_out(self) -> torch.Tensor:
        """[L, d_mlp, d_model]."""
        return torch.stack([self.W_out_layer(layer) for layer in range(self.n_layers)])

    @torch.no_grad()
    def b_out(self) -> torch.Tensor:
        """[L, d_model]; zeros where the projection has no bias."""
        out = []
        for layer in range(self.n_layers):
            b = getattr(self.out_proj(layer), "bias", None)
            out.append(b if b is not None else torch.zeros(self.d_model, device=self.W_U_raw().device))
        return torch.stack(out)

    @torch.no_grad()
    def W_E(self) -> torch.Tensor:
        """[vocab, d_model] (all rows, padding included; Gemma's sqrt(d_model) input scale is
        not applied)."""
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

    @torch.no_grad()
    def W_U_folded(self) -> torch.Tensor:
        """[d_model, vocab]: ``diag(scale_f) W_U`` with the final norm's scale folded in, so
        that ``logits = normalise(x) @ W_U_folded + b_U_folded`` where ``normalise`` is the
        final norm without its weight and bias. Gemma-2's final-logit softcapping
        (``cap * tanh(logits / cap)``, monotone) comes after this and is not folded."""
        return self.norm_scale(self.final_norm())[:, None] * self.W_U_raw().float()

    @torch.no_grad()
    def b_U_folded(self) -> torch.Tensor:
        """[vocab]: the final norm's bias through ``W_U`` plus the head's own bias (GPT-J)."""
        w_u = self.W_U_raw().float()
        out = torch.zeros(w_u.shape[1], device=w_u.device)
        nb = getattr(self.final_norm(), "bias", None)
        if nb is not None:
            out = out + nb.float() @ w_u
        hb = getattr(self.model.get_output_embeddings(), "bias", None)
        return out + hb.float() if hb is not None else out

    # ---- hooks ---------------------------------------------------------------------------
    def _shapes(self, layers: list[int], handles: list) -> dict[int, torch.Size]:
        """OPT flattens tokens: record each block's input ``[B, T]`` to restore them."""
        shapes: dict[int, torch.Size] = {}
        if self.spec.flat_tokens:
            for layer in layers:
                def block_hook(_mod, args, kwargs, layer=layer):
                    x = args[0] if args else kwargs["hidden_states"]
                    shapes[layer] = x.shape[:-1]
                handles.append(self.blocks[layer].register_forward_pre_hook(block_hook,
                                                                            with_kwargs=True))
        return shapes

    @contextmanager
    def capture(self, layers: list[int] | None = None, pre_activation: bool = False
                ) -> Iterator[dict[int, torch.Tensor]]:
        """Record activations ``[B, T, d_mlp]`` per layer while the block is active.

        With ``pre_activation`` the dict also gets ``-1 - layer`` keys holding the value
        before the nonlinearity. Hooks are removed in ``finally``.
        """
        layers = list(range(self.n_layers)) if layers is None else layers
        store: dict[int, torch.Tensor] = {}
        handles: list = []
        d_mlp = self.d_mlp
        try:
            shapes = self._shapes(layers, handles)

            def tokens(layer: int, x: torch.Tensor) -> torch.Tensor:
                return x.reshape(*shapes[layer], x.shape[-1]) if layer in shapes else x

            for layer in layers:
                def pre_hook(_mod, args, layer=layer):
                    store[layer] = tokens(layer, args[0].detach())
                handles.append(self.out_proj(layer).register_forward_pre_hook(pre_hook))
                if pre_activation:
                    def fwd_hook(_mod, _args, out, layer=layer):
                        store[-1 - layer] = tokens(layer, out.detach()[..., :d_mlp])
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
        handles: list = []
        try:
            shapes = self._shapes(layers, handles)
            for layer in layers:
                def pre_hook(_mod, args, layer=layer):
                    x = args[0]
                    if layer in shapes:
                        new = fn(layer, x.reshape(*shapes[layer], x.shape[-1])).reshape(x.shape)
                    else:
                        new = fn(layer, x)
                    return (new,) + tuple(args[1:])
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
    _check_supported(model, family, name)
    return Adapter(model, family)
