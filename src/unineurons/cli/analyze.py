"""``unineurons analyze``: neuron statistics, top contexts, families and properties."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich.table import Table

from ..config import build
from ..errors import UnineuronsError
from .options import BACKEND, CHECKPOINT_TOKENS, CPUS_PER_WORKER, RAY_ADDRESS, WORKERS

__all__ = ["register", "print_counts", "print_properties", "show_analysis",
           "role_rules_line"]


def show_analysis(res) -> None:
    """Neurons per family and per role (universal and not), the separating properties, notes."""
    from . import console

    print_counts(res.families, "family", console)
    if res.roles is not None:
        print_counts(res.roles, str(res.roles.columns[0]), console)
    if getattr(res, "roles_calibrated", None) is not None:
        print_counts(res.roles_calibrated, "role_calibrated", console)
    for model, th in (getattr(res, "role_thresholds", None) or {}).items():
        console.print(role_rules_line(model, th), highlight=False, soft_wrap=True)
    if res.properties is not None and len(res.properties):
        print_properties(res.properties, console)
    for note in res.notes:
        console.print(f"[yellow]note[/]: {note}")


def role_rules_line(model: str, th: dict) -> str:
    """One line stating both role rules of ``model`` (thresholds from analyses.roles)."""
    p, c = th["paper"], th["calibrated"]
    return (f"roles of {model}: paper rule kurt > {p['kurt']:g} (prediction skew > 0, "
            f"suppression skew < 0), partition var > {p['var']:g}; calibrated rule (beyond the "
            f"{c['quantile']:g} quantile of {c['n_null']} random directions) kurt > "
            f"{c['kurt']:.4g} (prediction skew > {c['skew_hi']:.3g}, suppression skew < "
            f"{c['skew_lo']:.3g}), partition var > {c['var']:.4g}; a random direction gets a "
            f"calibrated vocabulary role {100 * c['null_role_share']:.2g}% of the time")


def print_counts(counts: pd.DataFrame, column: str, console) -> None:
    """Neurons per family (or role), universal and other when known, as a table."""
    t = Table(title=f"neurons per {column}", title_justify="left")
    for c in counts.columns:
        t.add_column(c, justify="left" if c == column else "right")
    for _, r in counts.iterrows():
        t.add_row(*[str(r[c]) for c in counts.columns])
    console.print(t)


def print_properties(props: pd.DataFrame, console, top: int = 10) -> None:
    """The statistics that set universal neurons apart most (mean z over layers)."""
    empty = sorted(set(props["model"]) - set(props.loc[props["n_universal"] > 0, "model"]))
    for model in empty:
        console.print(f"[yellow]note[/]: {model} has no universal neuron at the threshold: nothing to "
                      "compare (layers.parquet shows how far its best matches are above the baseline)")
    props = props[props["n_universal"] > 0]
    g = props.groupby(["model", "statistic"], sort=False)[["universal_mean_z", "other_mean_z"]]
    mean = g.mean().reset_index()
    mean["gap"] = mean["universal_mean_z"] - mean["other_mean_z"]
    for model, sub in mean.groupby("model", sort=False):
        sub = sub.reindex(sub["gap"].abs().sort_values(ascending=False).index).head(top)
        t = Table(title=f"universal vs other neurons of {model} (mean z within layer)",
                  title_justify="left")
        for c in ("statistic", "universal", "other", "gap"):
            t.add_column(c, justify="left" if c == "statistic" else "right")
        for _, r in sub.iterrows():
            t.add_row(r.statistic, f"{r.universal_mean_z:+.2f}", f"{r.other_mean_z:+.2f}",
                      f"{r.gap:+.2f}")
        console.print(t)


def _role_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as RoleConfig fields (a comma makes a list); pydantic validates."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UnineuronsError(f"--role {item!r} is not KEY=VALUE, e.g. --role prediction_kurt=8")
        out[key.strip()] = value.split(",") if "," in value else value
    return out


def register(app: typer.Typer) -> None:
    from ..relocate import hold as hold_moved
    from .options import FAMILIES_FILE, FAMILY, FAMILY_SEEDS, FAMILY_STEP, MODEL_PATH, SAFETENSORS_ONLY

    @app.command("analyze")
    def analyze(
        ctx: typer.Context,
        run: Path = typer.Argument(None, help=(
            "Run directory of `unineurons correlate` (its models and tokens)."
        )),
        model: list[str] = typer.Option(None, "--model", "-m", help=(
            "Without RUN: a model to analyze on its own (repeat for several; needs --tokens and "
            "--out). With RUN: analyze only these of its models."
        )),
        tokens: Path = typer.Option(None, help="Token store folder (default: the run's own)."),
        out: Path = typer.Option(None, help="Without RUN: the run directory to write."),
        n_tokens: int = typer.Option(None, help=(
            "Use the first ceil(N / ctx) contexts (default: the run's count; all of another "
            "store)."
        )),
        neurons: str = typer.Option("auto", help=(
            "Neurons for the family statistics: universal (plus as many seeded random others), "
            "all, a FILE of addresses (L3.N12 per line), or auto."
        )),
        max_neurons: int = typer.Option(50_000, help=(
            "auto without universality: sample this many neurons per model when it has more."
        )),
        batch_size: int = typer.Option(8, help="Contexts per forward pass."),
        top_k: int = typer.Option(10, help="Top activating tokens kept per neuron."),
        window_before: int = typer.Option(24, help=(
            "Tokens before the top token in its stored window."
        )),
        window_after: int = typer.Option(8, help=(
            "Tokens after the top token in its stored window."
        )),
        unigram_top_n: int = typer.Option(256, help=(
            "Unigram / previous-token features for the N most frequent tokens."
        )),
        feature: list[str] = typer.Option(None, "--feature", help=(
            "Library feature of the class family (repeat; default: all registered)."
        )),
        token_class: list[Path] = typer.Option(None, "--token-class", help=(
            "Text file listing one token per line: an extra class feature (repeat)."
        )),
        feature_module: list[Path] = typer.Option(None, "--feature-module", help=(
            "Python file registering features with @register_feature / @register_token_class "
            "(repeat)."
        )),
        vr_threshold: float = typer.Option(0.5, help=(
            "Variance reduction needed for a unigram, previous, alphabet or class family."
        )),
        position_threshold: float = typer.Option(0.3, help=(
            "I(fires; position) / H(fires) needed for a position family."
        )),
        n_ranked: int = typer.Option(3, help="Best features per neuron in families.parquet."),
        vocab_k: int = typer.Option(20, help=(
            "Tokens per neuron, side and direction in vocab.parquet."
        )),
        seed: int = typer.Option(0, help="Seed of the neuron samples."),
        device: str = typer.Option("cpu", help="cpu or cuda[:i]."),
        role: list[str] = typer.Option(None, "--role", help=(
            "A role setting KEY=VALUE of analyses.roles.RoleConfig, e.g. prediction_kurt=8 or "
            "entropy_values=0,2,4 (repeat)."
        )),
        role_thresholds: str = typer.Option("paper", "--role-thresholds", help=(
            "Rule of the role column: paper (fixed thresholds) or calibrated (beyond a null of "
            "random directions); both are written as role_paper and role_calibrated."
        )),
        role_null_quantile: float = typer.Option(0.999, "--role-null-quantile", help=(
            "Calibrated roles: quantile of the random-direction null a statistic must exceed."
        )),
        resume: bool = typer.Option(False, help=(
            "Continue an interrupted token pass from its last checkpoint (same options)."
        )),
        checkpoint_tokens: int = CHECKPOINT_TOKENS,
        backend: str = BACKEND,
        ray_address: str = RAY_ADDRESS,
        workers: int = WORKERS,
        cpus_per_worker: int = CPUS_PER_WORKER,
        family: str = FAMILY,
        seeds: str = FAMILY_SEEDS,
        step: int = FAMILY_STEP,
        families_file: list[Path] = FAMILIES_FILE,
        safetensors_only: bool = SAFETENSORS_ONLY,
        model_path: list[str] = MODEL_PATH,
    ) -> None:
        """Per-neuron statistics (moments, activation frequency), top activating contexts,
        neuron families and universal-vs-other properties, added to the run directory."""
        from ..analyses.analyze import AnalyzeConfig, analyze_models, analyze_run
        from . import console
        from .families import family_models, hold_safetensors_only

        model = family_models(model, family, seeds, step, families_file)
        hold_safetensors_only(ctx, safetensors_only)
        hold_moved(ctx, model_path)
        if run is None and not model:
            raise UnineuronsError("analyze needs a RUN directory, or --model M --tokens DIR "
                                  "--out RUN for a model on its own")
        if run is not None and out is not None:
            raise UnineuronsError("analyze writes into RUN itself; drop --out (it is for "
                                  "--model without RUN)")
        if run is None and out is None:
            raise UnineuronsError("analyze --model needs --out RUN: the run directory to write")
        cfg = build(
            AnalyzeConfig, tokens=None if tokens is None else str(tokens), n_tokens=n_tokens,
            neurons=neurons, max_neurons=max_neurons, batch_size=batch_size, top_k=top_k,
            window_before=window_before, window_after=window_after, unigram_top_n=unigram_top_n,
            features=tuple(feature) if feature else None,
            token_classes=tuple(str(p) for p in token_class or ()),
            feature_modules=tuple(str(p) for p in feature_module or ()),
            vr_threshold=vr_threshold, position_threshold=position_threshold, n_ranked=n_ranked,
            vocab_k=vocab_k, seed=seed, device=device,
            roles={"thresholds": role_thresholds, "null_quantile": role_null_quantile,
                   **_role_settings(role or [])},
            checkpoint_tokens=checkpoint_tokens, backend=backend, ray_address=ray_address,
            workers=workers, cpus_per_worker=cpus_per_worker,
        )
        if run is not None:
            res = analyze_run(run, cfg, models=model or None, resume=resume)
            where = run
        else:
            res = analyze_models(model, out, cfg, resume=resume)
            where = out
        show_analysis(res)
        console.print(f"results: {where}/neurons.parquet, families.parquet, top_contexts.parquet"
                      + (", properties.parquet" if res.properties is not None else ""))
