"""Per-token activations of the top-context windows, recomputed from the models.

top_contexts.parquet stores, per neuron and rank, the window of tokens around a top-activating
token but only that token's activation. To shade every token of a window, the browser needs the
neuron's activation on each of them: one forward pass over each distinct context row the
windows come from (the rows the analyze stage streamed), capturing the same hook point.

The recomputation checks itself against the table: the window's token ids must equal the
token store's and the activation at the top token must equal the stored value; otherwise the
store or the model changed since analyze ran and nothing is returned for that model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import UnineuronsError
from ..models.load import LoadedModel
from ..progress import progress

__all__ = ["window_activations", "run_window_activations"]


@torch.inference_mode()
def window_activations(m: LoadedModel, tokens: np.ndarray, tops: pd.DataFrame,
                       keep: np.ndarray | None = None, batch_size: int = 8, rtol: float = 1e-3
                       ) -> list[np.ndarray | None]:
    """For each row of ``tops`` (one model's top_contexts rows), the neuron's activation on
    every token of the window, ``float32 [len(window_ids)]``; None where ``keep`` is False.

    ``tokens`` is the token store's ``[n_contexts, ctx]`` array the rows index. Raises
    :class:`UnineuronsError` when a window's ids differ from the store or the recomputed top
    activation differs from ``value`` by more than ``rtol`` of the neuron's scale.
    """
    n = len(tops)
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    out: list[np.ndarray | None] = [None] * n
    if not keep.any():
        return out
    rows = tops["row"].to_numpy(np.int64)
    starts = tops["window_start"].to_numpy(np.int64)
    layers = tops["layer"].to_numpy(np.int64)
    neurons = tops["neuron"].to_numpy(np.int64)
    lengths = tops["window_ids"].map(len).to_numpy(np.int64)
    values = tops["value"].to_numpy(np.float64)
    if rows[keep].max() >= tokens.shape[0]:
        raise UnineuronsError(f"top contexts of {m.name} refer to context row {rows[keep].max()}, "
                              f"beyond the token store's {tokens.shape[0]} rows")
    dev = next(m.model.parameters()).device
    uniq = np.unique(rows[keep])
    T = tokens.shape[1]
    with progress(f"window activations of {m.name}", len(uniq) * T, unit="tokens") as bar:
        for b0 in range(0, len(uniq), batch_size):
            chunk = uniq[b0:b0 + batch_size]
            x = torch.from_numpy(np.asarray(tokens[chunk]).astype(np.int64))  # [B, T]
            with m.adapter.capture() as store:
                m.model(input_ids=x.to(dev), use_cache=False)
            sel = np.nonzero(keep & np.isin(rows, chunk))[0]
            b = np.searchsorted(chunk, rows[sel])  # [n_sel] batch index of each window
            w = int(lengths[sel].max())
            pos = np.minimum(starts[sel, None] + np.arange(w)[None, :], T - 1)  # [n_sel, w]
            for layer in np.unique(layers[sel]):
                s = layers[sel] == layer
                act = store[int(layer)]  # [B, T, d_mlp]
                v = act[torch.from_numpy(b[s])[:, None], torch.from_numpy(pos[s]),
                        torch.from_numpy(neurons[sel][s])[:, None]]  # [n_s, w]
                v = v.float().cpu().numpy()
                for j, i in enumerate(sel[s]):
                    out[i] = v[j, : lengths[i]].copy()
            bar.advance(x.numel())
    kept = np.nonzero(keep)[0]
    with progress(f"checking windows of {m.name}", len(kept), unit="windows") as bar:
        for i in kept:
            ids = np.asarray(tops["window_ids"].iloc[i])
            store_ids = np.asarray(tokens[rows[i], starts[i]:starts[i] + lengths[i]])
            if not np.array_equal(ids, store_ids):
                raise UnineuronsError(f"model {m.name}: the top-context window of row {rows[i]} "
                                      "differs from the token store; the store changed since "
                                      "`unineurons analyze` ran")
            got = out[i][int(tops["position"].iloc[i] - starts[i])]  # type: ignore[index]
            if abs(got - values[i]) > rtol * max(1.0, abs(values[i])):
                raise UnineuronsError(f"model {m.name}: recomputed activation {got:.4g} of "
                                      f"L{layers[i]}.N{neurons[i]} differs from the stored "
                                      f"{values[i]:.4g}; the model or store changed since analyze")
            bar.advance(1)
    return out


def run_window_activations(manifest: dict, top_contexts: pd.DataFrame,
                           chosen: dict[str, set[tuple[int, int]]], device: str = "cpu",
                           batch_size: int = 8) -> tuple[dict[str, list[np.ndarray | None]],
                                                         list[str]]:
    """Window activations of every model whose top contexts are embedded (``chosen``), per
    model aligned with its rows of ``top_contexts`` in table order; plus notes on the models
    skipped (model or token store unavailable or changed)."""
    from ..analyses.interventions import load_run_model
    from ..tokens import TokenStore
    from .browser import chosen_mask

    notes: list[str] = []
    info = (manifest.get("analyze") or {}).get("tokens") or {}
    if not info.get("path"):
        return {}, ["tokens shaded by the top activation only: the run records no analyze "
                    "token store"]
    try:
        store = TokenStore.open(info["path"], verify=False)
    except UnineuronsError as e:
        return {}, [f"tokens shaded by the top activation only: the token store does not open "
                    f"({e})"]
    if info.get("sha256") and store.sha256 != info["sha256"]:
        return {}, [f"tokens shaded by the top activation only: token store {info['path']} "
                    "changed since analyze ran"]
    entries = {e["spec"]: e for e in manifest.get("models") or []}
    out: dict[str, list[np.ndarray | None]] = {}
    for model, g in top_contexts.groupby("model", sort=False):
        keep = chosen_mask(g, chosen)
        if not keep.any():
            continue
        try:
            m = load_run_model(entries.get(model, {"spec": model}), device)
            out[model] = window_activations(m, store.tokens, g, keep, batch_size)
        except (UnineuronsError, OSError) as e:
            notes.append(f"tokens of {model} shaded by the top activation only: {e}")
        finally:
            m = None  # free the weights before the next model loads
    return out, notes
