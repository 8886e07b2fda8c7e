"""Attention (de)activation neurons (Gurnee et al. 2024 section 5.3).

Many heads park their attention on the BOS token when they have nothing to do. A neuron in
layer ``l`` whose output moves later queries towards the BOS key switches such a head off
(deactivation); one that moves them away switches it on. For a neuron and a head of a later
layer ``l' > l`` the score is

    h = w_hat_out . q_dir,   q_dir = P (gamma_l' * (W_Q^h k_BOS^h)) * scaling

with ``w_hat_out = w_out / |w_out|`` (raw residual direction), ``W_Q^h [d_model, d_head]`` the
head's query weights, ``k_BOS^h`` its key at position 0 (averaged over a few contexts; at
position 0 the key only depends on the BOS token, so all contexts agree), ``gamma_l'`` the
scale of the norm in front of the attention (folded into ``W_Q``, as TransformerLens does),
``P`` the centring over ``d_model`` for LayerNorm families (LayerNorm removes the residual's
mean) and ``scaling`` the head's own logit scale (``1/sqrt(d_head)``, and ``1/(layer+1)`` for
GPT-2 with ``scale_attn_by_inverse_layer_idx``). ``h > 0``: the neuron raises the attention
logit on BOS (deactivation); ``h < 0``: it lowers it (activation). The norm's ``1/sigma`` is
left out: it is positive and shared by every neuron at a position.

Rotary families (GPT-NeoX, Llama): rotary is the identity at position 0, so ``k_BOS`` is
exact, but the query of a later position ``p`` is rotated by ``R_p``; the score uses the
unrotated query direction, i.e. it is the exact logit change only for the non-rotary
dimensions (GPT-NeoX's partial rotary) and an approximation for the rotated ones.

Families: GPT-2, GPT-NeoX, GPT-J (parallel block: its ln_1), OPT, the Llama-like ones
(Mistral, Qwen-2, Gemma with ``1 + w`` norms, Gemma-2: its ``tanh`` attention softcap is
monotone, OLMo) and Phi-3 (fused qkv). Qwen-3 and OLMo-2 normalise queries and keys after the
projection, so the BOS logit is not linear in the residual: their neurons get NaN z and no
rows. Gemma-2 / OLMo-2 scale the MLP's output by a norm, folded into ``w_out``.

Each score is compared with those of random unit directions of the residual space (seeded):
``z = (h - mean) / std`` per head; pairs with ``|z| >= z_threshold`` go to
``attention.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import UnineuronsError
from ..models.load import LoadedModel
from ..progress import progress
from .vocab import block_norm, is_layernorm, residual_out_weight

__all__ = ["head_shape", "query_weights", "bos_keys", "query_directions", "attention_scores",
           "ATTENTION_COLUMNS"]

#: Per-neuron columns of :func:`attention_scores` after ``model, layer, neuron``.
ATTENTION_COLUMNS = ["attn_max_z", "attn_max_head_layer", "attn_max_head", "attn_n_heads"]


def head_shape(m: LoadedModel) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, d_head)`` of the model's attention."""
    cfg = m.model.config
    layout = m.adapter.spec.attn_layout
    if layout == "gpt2":
        return cfg.n_head, cfg.n_head, cfg.n_embd // cfg.n_head
    attn = m.adapter.attn(0)
    if layout == "neox":
        return cfg.num_attention_heads, cfg.num_attention_heads, attn.head_size
    # Llama-like, GPT-J, OPT, Phi-3: q/k projections of n_heads (n_kv_heads) x head_dim
    h = int(cfg.num_attention_heads)
    return h, int(getattr(cfg, "num_key_value_heads", None) or h), int(attn.head_dim)


@torch.no_grad()
def query_weights(m: LoadedModel, layer: int) -> torch.Tensor:
    """``[n_heads, d_model, d_head]`` float32: ``q_h = x_norm @ W[h] + b_h``."""
    h, _, dh = head_shape(m)
    d = m.adapter.d_model
    attn = m.adapter.attn(layer)
    layout = m.adapter.spec.attn_layout
    if layout == "gpt2":
        w = attn.c_attn.weight.detach()[:, :d]  # Conv1D [d, 3d]: q | k | v
        return w.float().reshape(d, h, dh).permute(1, 0, 2)
    if layout == "qkv_fused":  # Phi-3: Linear [(h + 2 kv) dh, d], rows q | k | v
        w = attn.qkv_proj.weight.detach().float()[: h * dh].reshape(h, dh, d)
        return w.transpose(1, 2)
    if layout == "neox":
        # Linear [3d, d]; output index = head * 3 d_head + (q|k|v) * d_head + j
        w = attn.query_key_value.weight.detach().float().reshape(h, 3, dh, d)[:, 0]
        return w.transpose(1, 2)  # [h, d, dh]
    w = attn.q_proj.weight.detach().float().reshape(h, dh, d)  # Linear [h*dh, d]
    return w.transpose(1, 2)


def _key_module(m: LoadedModel, layer: int) -> nn.Module:
    attn = m.adapter.attn(layer)
    return {"gpt2": lambda: attn.c_attn, "neox": lambda: attn.query_key_value,
            "qkv_fused": lambda: attn.qkv_proj,
            "q_k_proj": lambda: attn.k_proj}[m.adapter.spec.attn_layout]()


def _split_key(m: LoadedModel, out: torch.Tensor) -> torch.Tensor:
    """The key module's output ``[B, T, *]`` -> keys ``[B, T, n_heads, d_head]``."""
    h, kv, dh = head_shape(m)
    b, t = out.shape[:2]
    layout = m.adapter.spec.attn_layout
    if layout == "gpt2":
        d = h * dh
        return out[..., d:2 * d].reshape(b, t, h, dh)
    if layout == "neox":
        return out.reshape(b, t, h, 3, dh)[..., 1, :]
    if layout == "qkv_fused":
        out = out[..., h * dh:(h + kv) * dh]
    k = out.reshape(b, t, kv, dh)  # grouped-query heads share a key head
    return k.repeat_interleave(h // kv, dim=2)  # [B, T, h, dh]


@torch.inference_mode()
def bos_keys(m: LoadedModel, contexts: np.ndarray, n_contexts: int = 8) -> torch.Tensor:
    """``[n_layers, n_heads, d_head]`` float32: every head's key at position 0 (BOS; rotary is
    the identity there), averaged over the first ``n_contexts`` contexts."""
    ad = m.adapter
    dev = next(m.model.parameters()).device
    # causal attention: position 0 sees only itself, so the first column is all it takes
    tokens = torch.from_numpy(np.asarray(contexts[:max(1, n_contexts), :1]).astype(np.int64))
    keys: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in range(ad.n_layers):
            def hook(_mod, _args, out, layer=layer):
                keys[layer] = _split_key(m, out[:, :1]).float().mean(0)[0]  # [h, dh]
            handles.append(_key_module(m, layer).register_forward_hook(hook))
        m.model(input_ids=tokens.to(dev), use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return torch.stack([keys[layer] for layer in range(ad.n_layers)])


@torch.no_grad()
def query_directions(m: LoadedModel, keys: torch.Tensor) -> torch.Tensor:
    """``[n_layers, n_heads, d_model]`` float32: the residual direction whose growth raises each
    head's attention logit on BOS the most (module docstring's ``q_dir``)."""
    out = []
    for layer in range(m.adapter.n_layers):
        w_q = query_weights(m, layer)  # [h, d, dh]
        k = keys[layer].to(w_q.device)  # [h, dh]
        q_dir = torch.einsum("hdk,hk->hd", w_q, k)  # [h, d]
        gamma = m.adapter.norm_scale(block_norm(m, layer, "attn")).to(w_q.device)
        q_dir = q_dir * gamma[None, :] * float(m.adapter.attn(layer).scaling)
        if is_layernorm(m):
            q_dir = q_dir - q_dir.mean(1, keepdim=True)
        out.append(q_dir)
    return torch.stack(out)


def _no_scores(m: LoadedModel, neurons: Sequence[tuple[int, int]] | None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Families with query/key norms (Qwen-3, OLMo-2): NaN z, no head, no rows."""
    ad = m.adapter
    keys = (sorted({(int(a), int(b)) for a, b in neurons}) if neurons is not None else
            [(a, b) for a in range(ad.n_layers) for b in range(ad.d_mlp)])
    per = pd.DataFrame({"model": m.name, "layer": np.array([a for a, _ in keys], dtype=np.int64),
                        "neuron": np.array([b for _, b in keys], dtype=np.int64),
                        "attn_max_z": np.nan, "attn_max_head_layer": -1, "attn_max_head": -1,
                        "attn_n_heads": 0})
    cols = ["model", "layer", "neuron", "head_layer", "head", "score", "baseline_mean",
            "baseline_std", "z"]
    rows = pd.DataFrame({c: pd.Series(dtype="int64" if c in ("layer", "neuron", "head_layer",
                                                            "head") else object if c == "model"
                                      else "float64") for c in cols})
    return per.astype({"attn_max_head_layer": "int64", "attn_max_head": "int64",
                       "attn_n_heads": "int64"}), rows


def _layer_scores(m: LoadedModel, layer: int, idx: np.ndarray, flat: torch.Tensor,
                  mean: torch.Tensor, std: torch.Tensor, head_layer: torch.Tensor,
                  head_idx: torch.Tensor, z_threshold: float, per: list, rows: list) -> None:
    """Append to ``per`` the per-neuron frame of neurons ``idx`` of ``layer`` and to ``rows``
    their pairs with ``|z| >= z_threshold`` among the heads of later layers (``flat [L*h, d]``
    the heads' query directions, ``mean`` / ``std [L*h]`` their random-direction baseline)."""
    later = (head_layer > layer).nonzero()[:, 0]  # [n_later]
    w = residual_out_weight(m, layer).double()[torch.as_tensor(idx, device=flat.device)]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    score = w @ flat[later].T  # [n, n_later]
    z = (score - mean[later]) / std[later].clamp_min(1e-300)  # [n, n_later]
    frame = {"model": m.name, "layer": layer, "neuron": idx}
    if len(later) == 0:
        per.append(pd.DataFrame({**frame, "attn_max_z": np.nan, "attn_max_head_layer": -1,
                                 "attn_max_head": -1, "attn_n_heads": 0}))
        return
    best = z.abs().argmax(1)  # [n]
    big = z.abs() >= z_threshold  # [n, n_later]
    per.append(pd.DataFrame({
        **frame, "attn_max_z": z.gather(1, best[:, None])[:, 0].cpu().numpy(),
        "attn_max_head_layer": head_layer[later][best.cpu()].numpy(),
        "attn_max_head": head_idx[later][best.cpu()].numpy(),
        "attn_n_heads": big.sum(1).cpu().numpy()}))
    i, j = big.nonzero(as_tuple=True)
    i, j = i.cpu(), j.cpu()
    hj = later.cpu()[j]
    rows.append(pd.DataFrame({
        "model": m.name, "layer": layer, "neuron": idx[i.numpy()],
        "head_layer": head_layer[hj].numpy(), "head": head_idx[hj].numpy(),
        "score": score.cpu()[i, j].numpy(), "baseline_mean": mean.cpu()[hj].numpy(),
        "baseline_std": std.cpu()[hj].numpy(), "z": z.cpu()[i, j].numpy()}))


@torch.no_grad()
def attention_scores(m: LoadedModel, contexts: np.ndarray, *, n_contexts: int = 8,
                     n_random: int = 1000, z_threshold: float = 3.0, seed: int = 0,
                     neurons: Sequence[tuple[int, int]] | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every (neuron, later head) pair against ``n_random`` random directions.

    Returns ``(per_neuron, rows)``. ``per_neuron``: ``model, layer, neuron`` and
    :data:`ATTENTION_COLUMNS`: the signed z of the neuron's most extreme later head, that
    head's layer and index (-1 and NaN z in the last layer, which has no later head) and the
    number of heads with ``|z| >= z_threshold``. ``rows`` (``attention.parquet``): ``model,
    layer, neuron, head_layer, head, score, baseline_mean, baseline_std, z`` for those pairs.
    ``neurons`` restricts both to the given ``(layer, neuron)`` pairs.
    """
    ad = m.adapter
    if n_random < 2:
        raise UnineuronsError(
            f"attention baseline needs at least 2 random directions, got {n_random}")
    if ad.spec.qk_norm:  # normalised queries/keys: the BOS logit is not linear in the residual
        return _no_scores(m, neurons)
    n_heads = head_shape(m)[0]
    q_dir = query_directions(m, bos_keys(m, contexts, n_contexts))  # [L, h, d]
    flat = q_dir.reshape(-1, ad.d_model).double()  # [L*h, d], head index = layer * h + head
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(n_random, ad.d_model, generator=g, dtype=torch.float64)
    rand = (rand / rand.norm(dim=1, keepdim=True)).to(flat.device)  # [R, d] uniform on sphere
    base = rand @ flat.T  # [R, L*h]
    mean, std = base.mean(0), base.std(0, unbiased=False)  # [L*h]
    head_layer = torch.arange(ad.n_layers).repeat_interleave(n_heads)  # [L*h]
    head_idx = torch.arange(n_heads).repeat(ad.n_layers)

    want: dict[int, list[int]] | None = None
    if neurons is not None:
        want = {}
        for layer, n in neurons:
            want.setdefault(int(layer), []).append(int(n))
    per: list[pd.DataFrame] = []
    rows: list[pd.DataFrame] = []
    idx_of = {layer: (np.arange(ad.d_mlp) if want is None
                      else np.array(sorted(set(want.get(layer, []))), dtype=np.int64))
              for layer in range(ad.n_layers)}
    with progress(f"attention scores of {m.name}", sum(len(i) for i in idx_of.values()),
                  unit="neurons") as bar:
        for layer, idx in idx_of.items():
            if len(idx):
                _layer_scores(m, layer, idx, flat, mean, std, head_layer, head_idx,
                              z_threshold, per, rows)
            bar.advance(len(idx))
    cols = ["model", "layer", "neuron", "head_layer", "head", "score", "baseline_mean",
            "baseline_std", "z"]
    per_df = (pd.concat(per, ignore_index=True) if per else
              pd.DataFrame(columns=["model", "layer", "neuron", *ATTENTION_COLUMNS]))
    rows_df = pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)
    ints = {c: "int64" for c in ("layer", "neuron", "attn_max_head_layer", "attn_max_head",
                                 "attn_n_heads")}
    rows_df = rows_df.astype({"layer": "int64", "neuron": "int64", "head_layer": "int64",
                              "head": "int64"})
    return per_df.astype(ints).astype({"attn_max_z": "float64"}), rows_df
