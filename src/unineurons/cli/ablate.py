"""``unineurons ablate`` and ``unineurons intervene``: thin wrappers over
:mod:`unineurons.analyses.ablate` and :mod:`unineurons.analyses.interventions`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import build
from ..relocate import hold as hold_moved
from . import options as _opts
from .options import BACKEND, CPUS_PER_WORKER, RAY_ADDRESS, WORKERS

SIZES_DEFAULT = ",".join(str(2 ** k) for k in range(15)) + ",all"


def _items(text: str, what: str) -> list[str]:
    from ..errors import UnineuronsError

    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UnineuronsError(f"{what} is empty; give a comma-separated list")
    return items


def _sizes(text: str) -> list[int | str]:
    from ..errors import UnineuronsError

    out: list[int | str] = []
    for s in _items(text, "--sizes"):
        if s == "all":
            out.append(s)
        elif s.isdigit() and int(s) > 0:
            out.append(int(s))
        else:
            raise UnineuronsError(f"--sizes entry {s!r} is not a positive integer or 'all'; "
                                  "e.g. --sizes 1,2,4,8,all")
    return out


def _floats(text: str) -> list[float]:
    from ..errors import UnineuronsError

    try:
        return [float(s) for s in _items(text, "--values")]
    except ValueError:
        raise UnineuronsError(f"--values {text!r} is not a comma-separated list of numbers; "
                              "e.g. --values=-1,0,1,2,4,6") from None


def ablate(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run directory (with neurons.parquet from correlate)."),
    model: list[str] | None = typer.Option(None, "--model", help="Model of the run (repeat "
                                           "for several); every model of the run when unset."),
    sets: str = typer.Option("universal,non-universal,random", "--sets", help="Comma-separated "
                             "sets: universal, non-universal, random, universal-calibrated."),
    method: str = typer.Option("zero", "--method", help="zero, mean or value:X."),
    sizes: str = typer.Option(SIZES_DEFAULT, "--sizes", help="Comma-separated set sizes; 'all' "
                              "= the whole universal set."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also ablate one layer at a time."),
    random_draws: int = typer.Option(5, "--random-draws", help="Random sets drawn per size."),
    rank_all: bool = typer.Option(False, "--rank-all", help="Rank every neuron by excess "
                                  "correlation for the universal set, below the threshold too."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Token store; the run's when unset."),
    n_tokens: int | None = typer.Option(None, "--n-tokens", help="Tokens to evaluate on; each "
                                        "configuration costs one forward pass over them."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random sets and the bootstrap."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Paired-bootstrap resamples of the "
                                  "contexts behind each effect's 95% interval (0: none)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
    backend: str = BACKEND,
    ray_address: str = RAY_ADDRESS,
    workers: int = WORKERS,
    cpus_per_worker: int = CPUS_PER_WORKER,
    family: str | None = _opts.FAMILY,
    seeds: str | None = _opts.FAMILY_SEEDS,
    step: int | None = _opts.FAMILY_STEP,
    families_file: list[Path] | None = _opts.FAMILIES_FILE,
    safetensors_only: bool = _opts.SAFETENSORS_ONLY,
    model_path: list[str] | None = _opts.MODEL_PATH,
) -> None:
    """Group ablations: universal vs non-universal vs random neurons -> RUN/ablations.parquet."""
    from ..analyses.ablate import AblateConfig, run_ablations
    from ..rundir import RunDir
    from . import console
    from .families import family_models, hold_safetensors_only

    model = family_models(model, family, seeds, step, families_file)
    hold_safetensors_only(ctx, safetensors_only)
    hold_moved(ctx, model_path)
    cfg = build(AblateConfig, models=model or None, sets=_items(sets, "--sets"), method=method,
                sizes=_sizes(sizes), per_layer=per_layer, random_draws=random_draws,
                rank_all=rank_all, tokens=None if tokens is None else str(tokens),
                n_tokens=n_tokens, seed=seed, n_bootstrap=bootstrap, batch_size=batch_size,
                device=device, backend=backend, ray_address=ray_address, workers=workers,
                cpus_per_worker=cpus_per_worker)
    rd = RunDir.open(run)
    df = run_ablations(rd, cfg)
    show_ablations(df)
    console.print(f"{len(df)} rows written to {rd.table_path('ablations')}", highlight=False)


def show_ablations(df) -> None:
    """The summary table (whole model; per layer only the whole set) and the headline."""
    from ..analyses.ablate import headline, summarize
    from . import console

    summary = summarize(df)
    # whole-model rows in full; per layer only the whole set (Nandan et al. Fig. 5)
    summary = summary[(summary["layer"] == -1) | (summary["size"] == "all")]
    _print_table(console, summary, "ablations (delta_loss: mean over draws; lo, hi: its 95% "
                 "interval over contexts and draws; std: over draws)",
                 ["model", "layer", "set", "size", "n_ablated", "delta_loss", "delta_loss_lo",
                  "delta_loss_hi", "delta_loss_std", "kl", "efficiency"])
    console.print(headline(df), highlight=False, soft_wrap=True)


def intervene(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run directory."),
    model: str | None = typer.Option(None, "--model", help="Model of the run; the run's first "
                                     "(reference) model when unset."),
    neuron: list[str] = typer.Option(..., "--neuron", help="Neuron L{layer}.N{index}; repeat "
                                     "for several."),
    values: str = typer.Option("-1,0,1,2,4,6", "--values", help="Comma-separated activation "
                               "values each neuron is fixed at."),
    random_baseline: int = typer.Option(5, "--random-baseline", help="Random last-layer "
                                        "neurons given the same interventions."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Token store; the run's when unset."),
    n_tokens: int | None = typer.Option(None, "--n-tokens", help="Tokens to evaluate on."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline neurons."),
    batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
    safetensors_only: bool = _opts.SAFETENSORS_ONLY,
    model_path: list[str] | None = _opts.MODEL_PATH,
) -> None:
    """Fix single neurons at several values on every position -> RUN/interventions.parquet."""
    from ..analyses.interventions import InterveneConfig, run_interventions
    from .families import hold_safetensors_only

    hold_safetensors_only(ctx, safetensors_only)
    hold_moved(ctx, model_path)
    from ..rundir import RunDir
    from . import console

    cfg = build(InterveneConfig, model=model, neurons=list(neuron), values=_floats(values),
                  random_baseline=random_baseline, tokens=None if tokens is None else str(tokens),
                  n_tokens=n_tokens, seed=seed, batch_size=batch_size, device=device)
    rd = RunDir.open(run)
    df = run_interventions(rd, cfg)
    shown = df.copy()
    shown.loc[shown["kind"] == "random", "address"] = "random (mean)"
    shown = shown.groupby(["model", "kind", "address", "value"], sort=False).mean(
        numeric_only=True).reset_index()
    _print_table(console, shown, "single-neuron interventions (lo, hi: 95% interval over "
                 "contexts; random: means over the baseline neurons)",
                 ["address", "value", "loss", "delta_loss", "delta_loss_lo", "delta_loss_hi",
                  "entropy", "delta_entropy", "true_rank_median", "final_norm_scale"])
    console.print(f"{len(df)} rows written to {rd.table_path('interventions')}", highlight=False)


def _print_table(console, df, title: str, cols: list[str]) -> None:
    from pandas.api.types import is_numeric_dtype
    from rich.table import Table

    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right" if is_numeric_dtype(df[c]) else "left")
    for _, r in df.iterrows():
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the ``ablate`` and ``intervene`` commands to ``app``."""
    app.command("ablate")(ablate)
    app.command("intervene")(intervene)
