"""Turn per-block results into the run directory's tables, pair files and manifest."""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

import numpy as np
import pandas as pd
import torch

from ..accumulators.comoments import LayerCov
from ..models.load import LoadedModel
from ..progress import progress
from ..rundir import RunDir, pair_file_name
from ..tokens import TokenStore
from .calibrate import calibrated_columns
from .config import CorrelateConfig
from .maxcorr import ZERO_VAR, combine_topk
from .plan import ModelShape, Plan, pair_list

__all__ = ["finalize", "participation_ratio", "package_versions", "SHARE_THRESHOLDS"]

SHARE_THRESHOLDS = (0.5, 0.7, 0.9)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("unineurons", "torch", "transformers", "tokenizers", "safetensors", "numpy",
                "pandas", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def participation_ratio(cov: torch.Tensor) -> float:
    """(tr R)² / ‖R‖²_F of the correlation matrix R of ``cov [d, d]``: the effective number
    of dimensions (d for independent neurons, 1 for perfectly correlated ones)."""
    var = torch.diagonal(cov)
    ok = var > ZERO_VAR
    if int(ok.sum()) == 0:
        return float("nan")
    c = cov[ok][:, ok]
    s = torch.diagonal(c).rsqrt()
    r = c * s[:, None] * s[None, :]
    return float(r.shape[0] ** 2 / (r * r).sum())


def _directions(cfg: CorrelateConfig, shapes: list[ModelShape], res: dict[str, torch.Tensor],
                plan: Plan) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Assemble, for every (a, b) direction, per-neuron arrays over all of a's neurons."""
    k = cfg.top_k
    parts: dict[tuple[int, int], dict[str, list]] = {}
    units = [u for p in plan.passes for u in p if u.kind == "pair"]
    for u in sorted(units, key=lambda u: (u.a, u.b, u.l0)):
        key = u.key()
        fwd = parts.setdefault((u.a, u.b), {"topv": [], "topi": [], "base": [], "rho": [], "null": []})
        fwd["topv"].append(res[f"{key}.row_topv"])
        fwd["topi"].append(res[f"{key}.row_topi"])
        if f"{key}.row_base" in res:
            fwd["base"].append(res[f"{key}.row_base"])
        if f"{key}.rho" in res:
            fwd["rho"].append(res[f"{key}.rho"])
        if f"{key}.row_null" in res:
            fwd["null"].append(res[f"{key}.row_null"])
        if u.cols_dir:
            bwd = parts.setdefault((u.b, u.a), {"ctopv": [], "ctopi": [], "cbase": [], "cnull": []})
            if f"{key}.col_null" in res:
                bwd["cnull"].append(res[f"{key}.col_null"])
            bwd["ctopv"].append(res[f"{key}.col_topv"])
            bwd["ctopi"].append(res[f"{key}.col_topi"])
            if f"{key}.col_base" in res:
                bwd["cbase"].append(res[f"{key}.col_base"])
    out = {}
    for (a, b), p in parts.items():
        if "topv" in p:  # rows direction: blocks are consecutive layer ranges of a
            d = {"topv": torch.cat(p["topv"]), "topi": torch.cat(p["topi"])}
            if p["base"]:
                d["base"] = torch.cat(p["base"])
            if p["rho"]:
                d["rho"] = torch.cat(p["rho"])
            if p["null"]:
                d["null"] = torch.cat(p["null"], dim=1)
        else:  # columns direction: combine the per-block partial maxima
            topv, topi = combine_topk(p["ctopv"], p["ctopi"], k)
            d = {"topv": topv, "topi": topi}
            if p["cbase"]:
                d["base"] = torch.stack(p["cbase"]).nan_to_num(float("-inf")).amax(0)
                d["base"][torch.isinf(d["base"])] = float("nan")
            if p["cnull"]:
                d["null"] = torch.stack(p["cnull"]).nan_to_num(float("-inf")).amax(0)
                d["null"][torch.isinf(d["null"])] = float("nan")
        out[(a, b)] = d
    return out


def finalize(run: RunDir, cfg: CorrelateConfig, models: list[LoadedModel], store: TokenStore,
             plan: Plan, shapes: list[ModelShape], res: dict[str, torch.Tensor],
             layercov: list[LayerCov], *, kept_tokens: int, n_contexts: int, config_hash: str,
             elapsed_s: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write neurons / matches / layers tables, pair files and the manifest."""
    dirs = _directions(cfg, shapes, res, plan)
    sides = sorted({a for a, _ in dirs})
    neuron_rows, match_rows, layer_rows = [], [], []
    # per model: its pair files, calibrated p-values and per-layer summary (participation
    # ratio: a [d_mlp, d_mlp] correlation matrix per layer)
    with progress("correlate tables", sum(shapes[a].n_layers for a in sides),
                  unit="layers") as bar:
        for a in sides:
            sa = shapes[a]
            name_a = models[a].name
            partners = [b for (x, b) in dirs if x == a]
            maxes, bases, nulls = [], [], []
            for b in partners:
                d = dirs[(a, b)]
                top1 = d["topv"][:, 0].float()
                arg = d["topi"][:, 0]
                base = d.get("base", torch.full_like(top1, float("nan"))).float()
                maxes.append(top1)
                bases.append(base)
                db = shapes[b].d_mlp
                arg_np = arg.numpy()
                match_rows.append(pd.DataFrame({
                    "model": name_a, "partner": models[b].name,
                    "layer": np.repeat(np.arange(sa.n_layers), sa.d_mlp),
                    "neuron": np.tile(np.arange(sa.d_mlp), sa.n_layers),
                    "max_corr": top1.numpy(),
                    "argmax_layer": np.where(arg_np >= 0, arg_np // db, -1),
                    "argmax_neuron": np.where(arg_np >= 0, arg_np % db, -1),
                    "baseline_corr": base.numpy(),
                }))
                tensors = {"max_corr": top1, "argmax": arg,
                           "argmax_layer": torch.where(arg >= 0, arg // db, -1),
                           "argmax_neuron": torch.where(arg >= 0, arg % db, -1),
                           "topk_corr": d["topv"].float(), "topk_index": d["topi"],
                           "baseline_corr": base}
                if "rho" in d:
                    tensors["rho"] = d["rho"]
                if "null" in d:
                    tensors["null_max_corr"] = d["null"].float()  # [R, N]: max over b rotated, per draw
                    nulls.append(d["null"].numpy())
                from ..io import save_tensors

                save_tensors(run.pairs_dir / pair_file_name(name_a, models[b].name), tensors,
                             metadata={"model": name_a, "partner": models[b].name,
                                       "index": "flat: layer * d_mlp + neuron"})
            mx = torch.stack(maxes)  # [P, N]
            bs = torch.stack(bases)
            max_corr = mx.mean(0)
            base_corr = bs.mean(0)
            excess = max_corr - base_corr
            ceiling = res_ceiling(res, plan, a, sa)
            m2 = layercov[a].m2()
            zero_var = ((m2 / layercov[a].n) <= ZERO_VAR).cpu()  # layer covariances live on the run's device
            df = pd.DataFrame({
                "model": name_a,
                "layer": np.repeat(np.arange(sa.n_layers), sa.d_mlp),
                "neuron": np.tile(np.arange(sa.d_mlp), sa.n_layers),
                "max_corr": max_corr.numpy(), "baseline_corr": base_corr.numpy(),
                "excess_corr": excess.numpy(),
                "is_universal": (excess > cfg.threshold).numpy(),
                "best_partner_corr": torch.nan_to_num(mx, nan=float("-inf")).amax(0).numpy(),
                "best_baseline_corr": torch.nan_to_num(bs, nan=float("-inf")).amax(0).numpy(),
                "n_partners": len(partners),
                "zero_var": zero_var.numpy(),
            })
            for col in ("best_partner_corr", "best_baseline_corr"):
                df.loc[np.isinf(df[col]), col] = np.nan
            if nulls:
                for col, v in calibrated_columns(max_corr.numpy(), nulls, df["layer"].to_numpy(),
                                                 cfg.fdr).items():
                    df[col] = v
            if ceiling is not None:
                df["ceiling_corr"] = ceiling.float().numpy()
                # how much of the excess a perfect copy could reach is 1 - ceiling
                df["excess_norm"] = df["excess_corr"] / (1.0 - df["ceiling_corr"])
            neuron_rows.append(df)
            for layer in range(sa.n_layers):
                sub = df[df.layer == layer]
                row = {"model": name_a, "layer": layer, "neurons": len(sub),
                       "universal": int(sub.is_universal.sum()),
                       "universal_share": float(sub.is_universal.mean()),
                       **({"universal_calibrated": int(sub.is_universal_calibrated.sum()),
                           "universal_calibrated_share": float(sub.is_universal_calibrated.mean())}
                          if nulls else {}),
                       "mean_max_corr": float(sub.max_corr.mean()),
                       "mean_baseline_corr": float(sub.baseline_corr.mean()),
                       "mean_excess_corr": float(sub.excess_corr.mean()),
                       "median_excess_corr": float(sub.excess_corr.median()),
                       "zero_var": int(sub.zero_var.sum()),
                       "participation_ratio": participation_ratio(layercov[a].c[layer])}
                if ceiling is not None:
                    row["mean_ceiling_corr"] = float(sub.ceiling_corr.mean())
                for t in SHARE_THRESHOLDS:
                    row[f"share_max_gt_{t}"] = float((sub.best_partner_corr > t).mean())
                    row[f"share_baseline_gt_{t}"] = float((sub.best_baseline_corr > t).mean())
                layer_rows.append(row)
                bar.advance(1)
    if run.has_table("neurons"):
        # a new correlate run invalidates every column computed from the old one
        run.table_path("neurons").unlink()
    neurons = run.update_neurons(pd.concat(neuron_rows, ignore_index=True))
    run.write_table("matches", pd.concat(match_rows, ignore_index=True))
    layers = pd.DataFrame(layer_rows)
    run.write_table("layers", layers)
    if cfg.split_half:
        from .splithalf import split_half_table

        run.write_table("split_half", split_half_table(cfg, models, shapes, plan, res, layercov))
    elif run.has_table("split_half"):  # of an earlier run without --split-half
        run.table_path("split_half").unlink()
    run.update_manifest(
        versions=package_versions(),
        models=[{"spec": m.name, "location": m.spec.location, "revision": m.spec.revision,
                 "weights_sha256": m.weights_sha256, **m.info} for m in models],
        tokens={"path": str(store.path), "sha256": store.manifest.get("sha256"),
                "n_contexts": n_contexts, "ctx": store.ctx, "n_tokens": n_contexts * store.ctx,
                "kept_tokens": kept_tokens},
        correlate={"config": cfg.model_dump(), "config_hash": config_hash,
                   "plan": plan.to_dict(), "pairs": [list(p) for p in pair_list(len(models), cfg.pairs)],
                   "elapsed_s": round(elapsed_s, 3), "kept_tokens": kept_tokens,
                   "tokens_per_s": round(n_contexts * store.ctx / max(elapsed_s, 1e-9), 1)},
    )
    return neurons, layers


def res_ceiling(res: dict[str, torch.Tensor], plan: Plan, a: int, sa: ModelShape
                ) -> torch.Tensor | None:
    units = sorted((u for p in plan.passes for u in p if u.kind == "ceiling" and u.a == a),
                   key=lambda u: u.l0)
    if not units:
        return None
    return torch.cat([res[f"{u.key()}.ceiling"] for u in units])
