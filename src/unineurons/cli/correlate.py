"""``unineurons correlate``: cross-seed correlations and universal neurons."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..config import build
from .options import BACKEND, CHECKPOINT_TOKENS, CPUS_PER_WORKER, RAY_ADDRESS, WORKERS

__all__ = ["register", "print_summary", "print_split_half", "CRITERIA_NOTE"]

#: Why the two universal counts differ, in one sentence (CLI, demo and report).
CRITERIA_NOTE = (
    "paper: excess correlation > the fixed threshold set on GPT-2 small after 100M tokens; "
    "calibrated: the neuron's max correlation is beyond its own null of many seeded rotations "
    "(BH q < FDR), so it adapts to the model's size and the token count, where no neuron may "
    "reach the fixed threshold or many pass it by chance")


def print_summary(layers, console) -> None:
    """Universal count and share per model and layer under both criteria (paper: excess >
    threshold; calibrated: q < FDR), with the readability columns."""
    cal = "universal_calibrated" in layers
    for model, sub in layers.groupby("model", sort=False):
        t = Table(title=f"universal neurons of {model}", title_justify="left")
        for col in ("layer", "neurons", "universal", "share", *(("calibrated",) if cal else ()),
                    "max ρ", "baseline", "excess", "ceiling", "ρ>0.7 / base", "PR", "zero-var"):
            t.add_column(col, justify="right")
        for _, r in sub.iterrows():
            t.add_row(
                f"L{r.layer}", str(r.neurons), str(r.universal), f"{r.universal_share:.1%}",
                *((f"{r.universal_calibrated} ({r.universal_calibrated_share:.1%})",) if cal else ()),
                f"{r.mean_max_corr:.3f}", f"{r.mean_baseline_corr:.3f}",
                f"{r.mean_excess_corr:.3f}",
                f"{r.mean_ceiling_corr:.3f}" if "mean_ceiling_corr" in r else "-",
                f"{r['share_max_gt_0.7']:.1%} / {r['share_baseline_gt_0.7']:.1%}",
                f"{r.participation_ratio:.1f}", str(r.zero_var),
            )
        tot, uni = int(sub.neurons.sum()), int(sub.universal.sum())
        t.caption = f"total: {uni} of {tot} universal ({uni / max(tot, 1):.2%}) by the paper's threshold"
        if cal:
            c = int(sub.universal_calibrated.sum())
            t.caption += f"; {c} ({c / max(tot, 1):.2%}) calibrated"
        console.print(t)
    if cal:
        console.print(f"[dim]{CRITERIA_NOTE}[/]")


def print_split_half(split, console) -> None:
    """Per model and layer: both halves' universal counts, Jaccard, excess correlation r."""
    cal = "jaccard_calibrated" in split
    for model, sub in split.groupby("model", sort=False):
        r0 = sub.iloc[0]
        t = Table(title=f"split half of {model}: {r0.kept_tokens_h0:,} / {r0.kept_tokens_h1:,} "
                  "kept tokens", title_justify="left")
        for col in ("layer", "universal h0 / h1", "Jaccard",
                    *(("calibrated h0 / h1", "Jaccard cal.") if cal else ()), "excess r", "max ρ r"):
            t.add_column(col, justify="right")
        for _, r in sub.iterrows():
            t.add_row(f"L{r.layer}", f"{r.universal_h0} / {r.universal_h1}", f"{r.jaccard:.2f}",
                      *((f"{r.universal_calibrated_h0} / {r.universal_calibrated_h1}",
                         f"{r.jaccard_calibrated:.2f}") if cal else ()),
                      f"{r.excess_corr_r:.3f}", f"{r.max_corr_r:.3f}")
        t.caption = ("Jaccard near 1 and r near 1: the token count pins the universal set down "
                     "(nan: both sets empty)")
        console.print(t)


def register(app: typer.Typer) -> None:
    from .options import FAMILIES_FILE, FAMILY, FAMILY_SEEDS, FAMILY_STEP, SAFETENSORS_ONLY

    @app.command("correlate")
    def correlate(
        ctx: typer.Context,
        model: list[str] = typer.Option(None, "--model", "-m", help=(
            "Model spec: a folder or HUB_ID[@REVISION]. Repeat; the first is the reference."
        )),
        tokens: Path = typer.Option(..., help="Token store folder (from `unineurons tokens build`)."),
        out: Path = typer.Option(..., help="Run directory to write."),
        n_tokens: int = typer.Option(None, help="Use the first ceil(N / ctx) contexts (default: all)."),
        pairs: str = typer.Option("reference", help=(
            "reference: the first model against each other; all: every model gets its own universality."
        )),
        baseline: str = typer.Option("rotation", help="rotation (random orthogonal per layer) or none."),
        threshold: float = typer.Option(0.5, help="Universal if excess correlation > threshold (Gurnee et al.: 0.5)."),
        null_rotations: int = typer.Option(32, help=(
            "Seeded rotations per layer for each neuron's calibrated null (p_value, q_value, "
            "is_universal_calibrated); 0: paper criterion only.")),
        fdr: float = typer.Option(0.01, help="Calibrated universal if the BH q-value < fdr."),
        split_half: bool = typer.Option(False, help=(
            "Also find the universal sets on two disjoint halves of the contexts: Jaccard and "
            "excess correlation r between them per layer (split_half.parquet).")),
        similarity: bool = typer.Option(True, "--similarity/--no-similarity", help=(
            "Layer similarity (CKA, ridge R²: layer_similarity.parquet) and one-to-one matching "
            "(assigned_neuron, mutual_best in matches.parquet); off saves their time and memory.")),
        ceiling: bool = typer.Option(True, help=(
            "Correlate each model with its own rotated activations (ceiling_corr, excess_norm)."
        )),
        top_k: int = typer.Option(5, help="Top matches kept per neuron and partner."),
        batch_size: int = typer.Option(8, help="Contexts per forward pass."),
        accumulate_tokens: int = typer.Option(None, help=(
            "Fold into the co-moments once this many kept tokens are buffered (bigger: faster, more memory; "
            "default: up to 8192 within a quarter of the budget)."
        )),
        device: str = typer.Option("cpu", help="cpu or cuda[:i]."),
        dtype: str = typer.Option("float32", help=(
            "Dtype of each batch's cross product: float32, tf32, bfloat16 or float64 (accumulation is always "
            "float64)."
        )),
        memory_budget: str = typer.Option("8GB", help=(
            "Memory for accumulators and batch buffers; pairs that do not fit take more passes."
        )),
        seed: int = typer.Option(0, help="Seed of the random rotations."),
        resume: bool = typer.Option(False, help="Continue an interrupted run in --out from its last checkpoint."),
        save_full_matrix: bool = typer.Option(False, help=(
            "Also save each pair's full correlation matrix in float16 (GPT-2 small: 2.7 GB a pair, "
            "twice that until the run ends; the free disk of --out is checked first).")),
        checkpoint_tokens: int = CHECKPOINT_TOKENS,
        keep_newline: bool = typer.Option(False, help=(
            "Keep newline-token positions (dropped by default, as in the paper)."
        )),
        backend: str = BACKEND,
        ray_address: str = RAY_ADDRESS,
        workers: int = WORKERS,
        cpus_per_worker: int = CPUS_PER_WORKER,
        family: str = FAMILY,
        seeds: str = FAMILY_SEEDS,
        step: int = FAMILY_STEP,
        families_file: list[Path] = FAMILIES_FILE,
        safetensors_only: bool = SAFETENSORS_ONLY,
    ) -> None:
        """Correlate every neuron of the reference model with every neuron of the other seeds;
        compare with the random-rotation baseline and mark universal neurons."""
        from ..correlate.config import CorrelateConfig
        from ..correlate.engine import run_correlate
        from ..correlate.plan import fmt_bytes
        from . import console
        from .families import family_models, hold_safetensors_only

        model = family_models(model, family, seeds, step, families_file, required=True)
        hold_safetensors_only(ctx, safetensors_only)
        cfg = build(
            CorrelateConfig, models=model, tokens=str(tokens), n_tokens=n_tokens, pairs=pairs,
            baseline=baseline, threshold=threshold, null_rotations=null_rotations, fdr=fdr,
            split_half=split_half, similarity=similarity, ceiling=ceiling, top_k=top_k,
            batch_size=batch_size, accumulate_tokens=accumulate_tokens, device=device, dtype=dtype,
            memory_budget=memory_budget,
            seed=seed, save_full_matrix=save_full_matrix, checkpoint_tokens=checkpoint_tokens,
            drop_newline=not keep_newline, backend=backend, ray_address=ray_address, workers=workers,
            cpus_per_worker=cpus_per_worker,
        )
        res = run_correlate(cfg, out, resume=resume)
        if res.reused:
            console.print(f"[green]already done[/]: {out} holds this correlate run")
        else:
            p = res.plan
            console.print(f"plan: {len(p.passes)} pass(es), {sum(len(x) for x in p.passes)} blocks, "
                          f"peak {fmt_bytes(p.peak_bytes)} of {fmt_bytes(p.budget)}")
        print_summary(res.layers, console)
        if split_half:
            print_split_half(res.run.read_table("split_half"), console)
        n_zero = int(res.neurons["zero_var"].sum()) if "zero_var" in res.neurons else 0
        if n_zero:
            console.print(f"[yellow]{n_zero} neurons have zero variance on these tokens: their "
                          "correlations are NaN[/]")
        console.print(f"results: {out}/neurons.parquet, matches.parquet, layers.parquet, pairs/"
                      + (", split_half.parquet" if split_half else ""))

    @app.command("plan")
    def plan(
        model: list[str] = typer.Option(None, "--model", "-m", help=(
            "Model spec; repeat. Only configs are read: no weights.")),
        n_tokens: int = typer.Option(100_000_000, help="Tokens the run would stream."),
        ctx: int = typer.Option(512, help="Context length of the token store."),
        memory_budget: str = typer.Option("80GB", help="Memory of the device (or host) the run gets."),
        pairs: str = typer.Option("reference", help="reference or all."),
        dtype: str = typer.Option("float32", help="Compute dtype of the batch products."),
        device: str = typer.Option("cpu", help="cpu or cuda (weights take 2 bytes with bfloat16 on cuda)."),
        batch_size: int = typer.Option(8, help="Contexts per forward pass."),
        accumulate_tokens: int = typer.Option(None, help="Kept tokens buffered per fold (default: automatic)."),
        ceiling: bool = typer.Option(True, help="Plan the rotated-self ceiling too."),
        null_rotations: int = typer.Option(32, help="Rotations of the calibrated null per layer."),
        split_half: bool = typer.Option(False, help="Plan the second half's accumulators too."),
        similarity: bool = typer.Option(True, "--similarity/--no-similarity", help=(
            "Plan the working memory of layer similarity and matching.")),
        flops_per_s: float = typer.Option(None, help=(
            "Matmul rate for the time estimate (default: measure fp32 GEMM here).")),
        workers: int = typer.Option(1, help="Machines (Ray workers) sharing the tokens."),
        family: str = FAMILY,
        seeds: str = FAMILY_SEEDS,
        step: int = FAMILY_STEP,
        families_file: list[Path] = FAMILIES_FILE,
    ) -> None:
        """Plan a correlate run from model configs alone: memory, passes, FLOPs, time."""
        from ..correlate.config import CorrelateConfig
        from ..correlate.estimate import estimate
        from ..correlate.plan import fmt_bytes, full_matrix_bytes
        from . import console
        from .families import family_models

        model = family_models(model, family, seeds, step, families_file, required=True)
        cfg = build(CorrelateConfig, models=model, tokens="-", pairs=pairs, dtype=dtype,
                           device=device, batch_size=batch_size, accumulate_tokens=accumulate_tokens,
                           memory_budget=memory_budget, ceiling=ceiling,
                           null_rotations=null_rotations, split_half=split_half,
                           similarity=similarity)
        est = estimate(cfg, n_tokens, ctx, rate=flops_per_s, workers=workers)
        p = est.plan
        t = Table(title=f"plan: {len(model)} models, {n_tokens:,} tokens, budget {fmt_bytes(p.budget)}",
                  title_justify="left")
        t.add_column("item")
        t.add_column("value", justify="right")
        for i, (spec, sh) in enumerate(zip(model, est.shapes, strict=True)):
            t.add_row(f"model {i}: {spec}", f"{sh.n_layers} x {sh.d_mlp} = {sh.n:,} neurons, "
                      f"{sh.n_params / 1e6:,.0f}M params")
        t.add_row("co-moment blocks", f"{sum(len(x) for x in p.passes)} in {len(p.passes)} pass(es)")
        for i, (b, w) in enumerate(zip(p.pass_bytes, p.work_bytes or [0] * len(p.pass_bytes), strict=True)):
            t.add_row(f"  pass {i + 1} accumulators", fmt_bytes(b))
            t.add_row(f"  pass {i + 1} temporaries of one block", fmt_bytes(w))
        t.add_row("within-layer covariances (kept)", fmt_bytes(p.persistent_bytes))
        t.add_row("weights, batch buffers, forward pass", fmt_bytes(p.stream_bytes))
        t.add_row("peak memory", f"{fmt_bytes(p.peak_bytes)} of {fmt_bytes(p.budget)}")
        full = full_matrix_bytes(p, est.shapes)
        if full:
            t.add_row("disk of --save-full-matrix", f"{fmt_bytes(full)} (float16), twice that "
                      "until the run ends")
        f = est.flops
        t.add_row("FLOPs per token", f"{f['total'] / 1e9:,.2f} G (forward {f['forward'] / 1e9:,.2f}, "
                  f"co-moments {f['comoments'] / 1e9:,.2f}, layer cov {f['layer_cov'] / 1e9:,.2f})")
        if est.null_flops:
            t.add_row("calibrated null (once)", f"{est.null_flops:.3e} FLOPs, {null_rotations} rotations")
        t.add_row("total FLOPs", f"{est.total_flops:.3e}")
        t.add_row("matmul rate", f"{est.rate / 1e12:,.3f} TFLOP/s" + (" (measured here)" if not flops_per_s else ""))
        hours = est.seconds / 3600
        t.add_row("estimated time", f"{hours:,.2f} h on {est.workers} worker(s)")
        console.print(t)
