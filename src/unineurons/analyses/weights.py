"""Per-neuron weight statistics (Gurnee et al. section 4): norms, bias, input-output cosine,
weight decay penalty and vocabulary-composition moments.

:func:`weight_columns` gives one row per neuron, ready for ``RunDir.update_neurons``. Raw
weights (nothing folded) for the norms, bias and ``in_out_cos``; the ``vocab_*`` and
``in_vocab_*`` moments use the folded, centred directions of :mod:`unineurons.analyses.vocab`.
For gated MLPs (Llama) the input weight is the gate projection, whose output goes through the
nonlinearity; the up projection is not part of ``w_in_norm`` or ``l2_penalty``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..models.load import LoadedModel
from .vocab import DEFAULT_MAX_BYTES, in_weight, out_weight, vocab_moments

__all__ = ["weight_columns", "WEIGHT_COLUMNS"]

#: Columns of :func:`weight_columns` after the keys ``model, layer, neuron``.
WEIGHT_COLUMNS = ["w_in_norm", "w_out_norm", "b_in", "in_out_cos", "l2_penalty",
                  "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt",
                  "in_vocab_mean", "in_vocab_var", "in_vocab_skew", "in_vocab_kurt"]


@torch.no_grad()
def weight_columns(m: LoadedModel, max_bytes: int = DEFAULT_MAX_BYTES) -> pd.DataFrame:
    """One row per (layer, neuron) of ``m``: ``model, layer, neuron`` and :data:`WEIGHT_COLUMNS`.

    - ``w_in_norm``, ``w_out_norm``: L2 norms of the neuron's input column / output row;
    - ``b_in``: its input bias (0 where the projection has none);
    - ``in_out_cos``: cos(w_in, w_out), both in the residual space;
    - ``l2_penalty``: ``|w_in|^2 + |w_out|^2``;
    - ``vocab_{mean,var,skew,kurt}``: moments over the vocabulary of cos(w_out, W_U' columns);
    - ``in_vocab_{...}``: the same for cos(gamma * w_in, W_E rows).

    Skew is the biased sample skewness and kurtosis is non-excess (Gaussian = 3), as in
    ``scipy.stats.skew`` / ``kurtosis(fisher=False)``; both are NaN for a zero weight vector.
    """
    ad = m.adapter
    w_in_norm, w_out_norm, io_cos = [], [], []
    for layer in range(ad.n_layers):
        w_in = in_weight(m, layer).double()  # [d_mlp, d_model]
        w_out = out_weight(m, layer).double()  # [d_mlp, d_model]
        n_in, n_out = w_in.norm(dim=1), w_out.norm(dim=1)  # [d_mlp]
        w_in_norm.append(n_in)
        w_out_norm.append(n_out)
        io_cos.append((w_in * w_out).sum(1) / (n_in * n_out).clamp_min(1e-300))
    n_in = torch.stack(w_in_norm).cpu().numpy()  # [L, d_mlp]
    n_out = torch.stack(w_out_norm).cpu().numpy()
    cols = {
        "w_in_norm": n_in,
        "w_out_norm": n_out,
        "b_in": ad.b_in().double().cpu().numpy(),
        "in_out_cos": torch.stack(io_cos).cpu().numpy(),
        "l2_penalty": n_in**2 + n_out**2,
    }
    for side, prefix in (("out", "vocab_"), ("in", "in_vocab_")):
        for k, v in vocab_moments(m, side, max_bytes=max_bytes).items():
            cols[prefix + k] = v
    layer, neuron = np.meshgrid(np.arange(ad.n_layers), np.arange(ad.d_mlp), indexing="ij")
    df = pd.DataFrame({"model": m.name, "layer": layer.reshape(-1).astype(np.int64),
                       "neuron": neuron.reshape(-1).astype(np.int64)})
    for c in WEIGHT_COLUMNS:
        df[c] = cols[c].reshape(-1).astype(np.float64)
    return df
