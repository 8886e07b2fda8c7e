"""``--split-half``: is the token count enough? The universal sets of two disjoint halves.

The correlate stage accumulates, with ``--split-half``, every co-moment block and layer
covariance twice: over the first ``n_contexts // 2`` contexts and over the rest (all contexts
are the two merged, exactly). Each half gets its own max correlations, rotation baseline and
calibrated null, hence its own universal set under both criteria. Per model and layer,
``split_half.parquet`` holds the sets' sizes, their Jaccard index ``|U_0 ∩ U_1| / |U_0 ∪ U_1|``
(NaN when both are empty) and the Pearson correlation over neurons of the excess correlation
(and of the max correlation) between the halves. Sets that agree and excesses that correlate
near 1 say the run's token count pins the universal set down; Gurnee et al. used 100M tokens,
Nandan et al. 5M.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..models.load import LoadedModel
from .calibrate import calibrated_columns
from .config import CorrelateConfig
from .plan import ModelShape, Plan

__all__ = ["half_view", "half_neurons", "jaccard", "split_half_table"]


def half_view(res: dict[str, torch.Tensor], half: int) -> dict[str, torch.Tensor]:
    """The results of split half ``half`` under the names of the full run's results
    (``{unit}.h{half}.{name}`` -> ``{unit}.{name}``)."""
    tag = f".h{half}."
    return {k.replace(tag, ".", 1): v for k, v in res.items() if tag in k}


def half_neurons(cfg: CorrelateConfig, shapes: list[ModelShape], dirs: dict) -> dict[int, pd.DataFrame]:
    """Per model side: ``layer, neuron, max_corr, excess_corr, is_universal`` and, with a
    null, ``p_value, q_value, is_universal_calibrated`` (the same rules as ``neurons.parquet``)."""
    out = {}
    for a in sorted({a for a, _ in dirs}):
        sa = shapes[a]
        ds = [dirs[(x, b)] for (x, b) in sorted(dirs) if x == a]
        mx = torch.stack([d["topv"][:, 0] for d in ds]).double().mean(0).numpy()
        base = torch.stack([d.get("base", torch.full_like(d["topv"][:, 0], float("nan")))
                            for d in ds]).double().mean(0).numpy()
        layer = np.repeat(np.arange(sa.n_layers), sa.d_mlp)
        df = pd.DataFrame({"layer": layer, "neuron": np.tile(np.arange(sa.d_mlp), sa.n_layers),
                           "max_corr": mx, "excess_corr": mx - base,
                           "is_universal": (mx - base) > cfg.threshold})
        if all("null" in d for d in ds) and cfg.null_rotations:
            cal = calibrated_columns(mx, [d["null"].numpy() for d in ds], layer, cfg.fdr)
            for col in ("p_value", "q_value", "is_universal_calibrated"):
                df[col] = cal[col]
        out[a] = df
    return out


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """``|x ∩ y| / |x ∪ y|`` of two boolean masks; NaN when both are empty."""
    union = int((x | y).sum())
    return float((x & y).sum() / union) if union else float("nan")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def split_half_table(cfg: CorrelateConfig, models: list[LoadedModel], shapes: list[ModelShape],
                     plan: Plan, res: dict[str, torch.Tensor], layercov=None) -> pd.DataFrame:
    """One row per model side x layer comparing the two halves (see the module docstring)."""
    from .summarize import _directions

    halves = [half_neurons(cfg, shapes, _directions(cfg, shapes, half_view(res, h), plan))
              for h in (0, 1)]
    kept = [next((int(v) for k, v in half_view(res, h).items() if k.endswith(".n")), 0) for h in (0, 1)]
    rows = []
    for a, h0 in halves[0].items():
        h1 = halves[1][a]
        for layer in range(shapes[a].n_layers):
            s0, s1 = h0[h0.layer == layer], h1[h1.layer == layer]
            u0, u1 = s0.is_universal.to_numpy(), s1.is_universal.to_numpy()
            row = {"model": models[a].name, "layer": layer, "neurons": len(s0),
                   "kept_tokens_h0": kept[0], "kept_tokens_h1": kept[1],
                   "universal_h0": int(u0.sum()), "universal_h1": int(u1.sum()),
                   "jaccard": jaccard(u0, u1)}
            if "is_universal_calibrated" in s0:
                c0 = s0.is_universal_calibrated.to_numpy()
                c1 = s1.is_universal_calibrated.to_numpy()
                row.update({"universal_calibrated_h0": int(c0.sum()),
                            "universal_calibrated_h1": int(c1.sum()),
                            "jaccard_calibrated": jaccard(c0, c1)})
            row["excess_corr_r"] = _pearson(s0.excess_corr.to_numpy(), s1.excess_corr.to_numpy())
            row["max_corr_r"] = _pearson(s0.max_corr.to_numpy(), s1.max_corr.to_numpy())
            rows.append(row)
    return pd.DataFrame(rows)
