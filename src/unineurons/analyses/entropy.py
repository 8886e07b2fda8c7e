"""Entropy neurons (Gurnee et al. 2024 section 5.2; Stolfo et al. 2024, "Confidence regulation
neurons"): late-layer neurons with a large output weight that lies in the unembedding's
effective null space. Writing there changes no logit directly; it only grows or shrinks the
residual's norm, i.e. the final norm's scale, which sharpens or flattens the whole next-token
distribution: entropy moves, the ranking of tokens does not.

Detection has two steps.

1. **Candidates (weights).** The effective null space is spanned by the bottom ``k`` left
   singular vectors of the folded, centred unembedding ``W_U'`` of
   :mod:`unineurons.analyses.vocab` (for LayerNorm families within the subspace orthogonal to
   the all-ones direction, which LayerNorm removes, so that direction never counts as null).
   ``null_frac`` is the share of ``|w_out|^2`` (as the final norm sees it) in that space. A
   neuron of the searched late layers is a candidate when ``null_frac`` is high and its
   ``w_out_norm`` is among the largest of its layer.
2. **Confirmation (intervention).** Each candidate and a few seeded random neurons of the same
   layers are fixed, one at a time, at several activation values on every position (by
   default multiples of the neuron's own scale, its largest absolute activation on the
   evaluation tokens), through :func:`unineurons.analyses.interventions.evaluate_patches`.
   ``entropy_effect`` / ``loss_effect`` are the largest absolute changes of the mean
   next-token entropy / loss (nats) over the values. A candidate is confirmed when its
   entropy effect is at least ``effect_factor`` times the largest among the random neurons
   and at least ``loss_ratio`` times its own loss effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..errors import UnineuronsError
from ..models.load import LoadedModel
from ..progress import progress
from ..stream import MaskConfig, token_mask
from .interventions import evaluate_patches, make_patch
from .vocab import folded_unembed, is_layernorm, out_directions, out_weight

__all__ = ["default_null_dims", "null_space", "null_fraction", "entropy_candidates",
           "activation_scales", "random_neurons", "find_entropy_neurons", "ENTROPY_COLUMNS"]

#: Per-neuron columns of :func:`find_entropy_neurons` after ``model, layer, neuron``.
ENTROPY_COLUMNS = ["null_frac", "entropy_candidate", "entropy_effect", "loss_effect",
                   "is_entropy"]


def default_null_dims(d_model: int) -> int:
    """2% of ``d_model`` (15 for GPT-2 small), at least 1."""
    return max(1, round(0.02 * d_model))


@torch.no_grad()
def null_space(m: LoadedModel, k: int, vocab_block: int = 8192) -> torch.Tensor:
    """``[d_model, k]`` float64 orthonormal basis of ``W_U'``'s effective null space: its ``k``
    left singular vectors with the smallest singular values (for LayerNorm families, among
    directions orthogonal to the all-ones vector)."""
    d = m.adapter.d_model
    ln = is_layernorm(m)
    if not 1 <= k <= d - int(ln):
        raise UnineuronsError(f"entropy null-space dimensions must be in 1..{d - int(ln)} for "
                              f"model {m.name} (d_model {d}), got {k}")
    w_u = folded_unembed(m)  # [d, V]
    gram = torch.zeros(d, d, dtype=torch.float64, device=w_u.device)  # W_U' W_U'^T
    with progress(f"unembedding null space of {m.name}", w_u.shape[1],
                  unit="vocab tokens") as bar:
        for s in range(0, w_u.shape[1], vocab_block):  # float64 copies of vocab blocks only
            blk = w_u[:, s:s + vocab_block].double()  # [d, vb]
            gram += blk @ blk.T
            bar.advance(blk.shape[1])
    if ln:
        # orthonormal basis of the all-ones complement: QR of [1/sqrt(d) | I] keeps 1 first
        ones = torch.full((d, 1), d ** -0.5, dtype=torch.float64, device=gram.device)
        q = torch.linalg.qr(torch.cat([ones, torch.eye(d, dtype=torch.float64,
                                                       device=gram.device)], 1))[0][:, 1:]
    else:
        q = torch.eye(d, dtype=torch.float64, device=gram.device)
    _, vecs = torch.linalg.eigh(q.T @ gram @ q)  # ascending eigenvalues = squared sing. values
    return q @ vecs[:, :k]  # [d, k]


@torch.no_grad()
def null_fraction(m: LoadedModel, basis: torch.Tensor) -> np.ndarray:
    """``[n_layers, d_mlp]``: share of each neuron's ``|w_out|^2`` (centred for LayerNorm
    families) inside ``span(basis)``; 0 for a zero ``w_out``."""
    out = []
    ad = m.adapter
    with progress(f"null-space share of {m.name}", ad.n_layers * ad.d_mlp,
                  unit="neurons") as bar:
        for layer in range(ad.n_layers):
            w = out_directions(m, layer).double()  # [d_mlp, d]
            inside = (w @ basis.to(w.device)).pow(2).sum(1)  # [d_mlp]
            out.append(inside / w.pow(2).sum(1).clamp_min(1e-300))
            bar.advance(ad.d_mlp)
    return torch.stack(out).cpu().numpy()


def entropy_candidates(w_out_norm: np.ndarray, null_frac: np.ndarray, layers: Sequence[int],
                       min_null_frac: float, norm_quantile: float, max_candidates: int
                       ) -> list[tuple[int, int]]:
    """Neurons of ``layers`` with ``null_frac >= min_null_frac`` and ``w_out_norm`` at least
    the ``norm_quantile`` quantile of their layer, the ``max_candidates`` with the largest
    null-space norm ``w_out_norm * sqrt(null_frac)`` first. Arrays are ``[n_layers, d_mlp]``."""
    found = []
    for layer in layers:
        thr = np.quantile(w_out_norm[layer], norm_quantile)
        ok = np.nonzero((null_frac[layer] >= min_null_frac) & (w_out_norm[layer] >= thr))[0]
        found += [(w_out_norm[layer, i] * np.sqrt(null_frac[layer, i]), layer, int(i))
                  for i in ok]
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(layer, i) for _, layer, i in found[:max_candidates]]


def random_neurons(layers: Sequence[int], d_mlp: int, k: int, seed: int,
                   exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """``k`` distinct neurons of ``layers`` drawn with ``seed`` (fewer if they run out), none
    of ``exclude``, sorted."""
    taken = set(exclude)
    pool = [(layer, i) for layer in layers for i in range(d_mlp) if (layer, i) not in taken]
    pick = np.random.default_rng(seed).choice(len(pool), size=min(k, len(pool)), replace=False)
    return sorted(pool[int(j)] for j in pick)


@torch.inference_mode()
def activation_scales(m: LoadedModel, contexts: np.ndarray, special: dict,
                      neurons: Sequence[tuple[int, int]], batch_size: int = 8
                      ) -> dict[tuple[int, int], float]:
    """Largest absolute activation of each neuron over the kept positions of ``contexts``
    (the activation stream's default mask: no BOS, EOS, pad or newline)."""
    ad = m.adapter
    dev = next(m.model.parameters()).device
    layers = sorted({layer for layer, _ in neurons})
    peak = {layer: torch.zeros(ad.d_mlp, device=dev) for layer in layers}
    with progress(f"activation scales of {m.name}", total=contexts.shape[0] * contexts.shape[1],
                  unit="tokens") as bar:
        for b0 in range(0, contexts.shape[0], batch_size):
            tokens = torch.from_numpy(np.asarray(contexts[b0:b0 + batch_size]).astype(np.int64))
            keep = token_mask(tokens, special, MaskConfig()).to(dev)  # [B, T]
            with ad.capture(layers) as store:
                m.model.base_model(input_ids=tokens.to(dev), use_cache=False)  # no vocabulary head
            for layer in layers:
                a = store[layer][keep].abs()  # [n, d_mlp]
                if a.shape[0]:
                    peak[layer] = torch.maximum(peak[layer], a.amax(0).float())
            bar.advance(tokens.numel())
    return {(layer, i): float(peak[layer][i]) for layer, i in neurons}


def find_entropy_neurons(
    m: LoadedModel, contexts: np.ndarray, special: dict, *,
    layers: int = 1, null_dims: int | None = None, min_null_frac: float = 0.5,
    norm_quantile: float = 0.9, max_candidates: int = 10, n_random: int = 10,
    values: Sequence[float] = (0.0, 1.0, 2.0, 4.0), value_mode: Literal["scale", "absolute"] = "scale",
    n_contexts: int = 32, effect_factor: float = 2.0, loss_ratio: float = 2.0,
    batch_size: int = 8, seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Entropy-neuron candidates of the last ``layers`` layers, confirmed by intervention.

    Returns ``(per_neuron, rows)``. ``per_neuron``: one row per neuron of ``m`` with ``model,
    layer, neuron`` and :data:`ENTROPY_COLUMNS` (``entropy_effect``/``loss_effect`` NaN for
    neurons not intervened on). ``rows`` (``entropy.parquet``): ``model, layer, neuron, kind
    ('candidate'|'random'), scale, value, loss, entropy, delta_loss, delta_entropy,
    delta_final_norm_scale`` per (neuron, value), deltas against the clean model.
    ``value_mode`` ``"scale"`` multiplies ``values`` by each neuron's activation scale
    (:func:`activation_scales`); ``"absolute"`` uses them as they are.
    """
    ad = m.adapter
    if value_mode not in ("scale", "absolute"):
        raise UnineuronsError(
            f"entropy value mode must be 'scale' or 'absolute', got {value_mode!r}")
    if not 1 <= layers <= ad.n_layers:
        raise UnineuronsError(f"entropy layers must be in 1..{ad.n_layers} for model {m.name}, "
                              f"got {layers}")
    late = list(range(ad.n_layers - layers, ad.n_layers))
    basis = null_space(m, null_dims if null_dims is not None else default_null_dims(ad.d_model))
    frac = null_fraction(m, basis)  # [L, d_mlp]
    norm = np.stack([out_weight(m, layer).double().norm(dim=1).cpu().numpy()
                     for layer in range(ad.n_layers)])  # [L, d_mlp]
    cands = entropy_candidates(norm, frac, late, min_null_frac, norm_quantile, max_candidates)
    rand = random_neurons(late, ad.d_mlp, n_random, seed, exclude=cands)
    tested = [(n, "candidate") for n in cands] + [(n, "random") for n in rand]

    per = pd.DataFrame({"model": m.name,
                        "layer": np.repeat(np.arange(ad.n_layers), ad.d_mlp).astype(np.int64),
                        "neuron": np.tile(np.arange(ad.d_mlp), ad.n_layers).astype(np.int64),
                        "null_frac": frac.reshape(-1), "entropy_candidate": False,
                        "entropy_effect": np.nan, "loss_effect": np.nan, "is_entropy": False})
    row_cols = ["model", "layer", "neuron", "kind", "scale", "value", "loss", "entropy",
                "delta_loss", "delta_entropy", "delta_final_norm_scale"]
    if not cands:
        return per, pd.DataFrame(columns=row_cols)
    ctx = contexts[:min(n_contexts, contexts.shape[0])]
    scales = (activation_scales(m, ctx, special, [n for n, _ in tested], batch_size)
              if value_mode == "scale" else {n: 1.0 for n, _ in tested})
    configs = [(n, kind, float(v) * scales[n]) for n, kind in tested for v in values]
    patches = [make_patch([n], [v]) for n, _, v in configs]
    _, results = evaluate_patches(m, ctx, special, patches, batch_size=batch_size,
                                  desc=f"entropy neurons of {m.name}")
    rows = pd.DataFrame([{"model": m.name, "layer": n[0], "neuron": n[1], "kind": kind,
                          "scale": scales[n], "value": v, **{k: r[k] for k in row_cols[6:]}}
                         for (n, kind, v), r in zip(configs, results, strict=True)])[row_cols]
    rows = rows.astype({"layer": "int64", "neuron": "int64"})

    eff = rows.assign(ae=rows["delta_entropy"].abs(), al=rows["delta_loss"].abs()) \
        .groupby(["layer", "neuron"])[["ae", "al"]].max()
    rand_max = max((eff.loc[n, "ae"] for n in rand), default=0.0)
    for n, kind in tested:
        i = n[0] * ad.d_mlp + n[1]  # per's row of neuron n
        ae, al = float(eff.loc[n, "ae"]), float(eff.loc[n, "al"])
        per.loc[i, ["entropy_effect", "loss_effect"]] = [ae, al]
        if kind == "candidate":
            per.loc[i, "entropy_candidate"] = True
            per.loc[i, "is_entropy"] = bool(ae >= effect_factor * rand_max and ae > 0
                                            and ae >= loss_ratio * al)
    return per, rows
