"""``unineurons dynamics``: universal neurons across training checkpoints (Nandan et al.).

A thin wrapper over :mod:`unineurons.analyses.dynamics`; :func:`show_dynamics` also prints the
pipeline's dynamics stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..config import build
from . import options as _opts
from .options import BACKEND, CPUS_PER_WORKER, RAY_ADDRESS, WORKERS

__all__ = ["register", "show_dynamics", "print_emergence", "print_persistence"]


def _names(text: str, what: str) -> list[str]:
    from ..errors import UnineuronsError

    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UnineuronsError(f"{what} is empty; give a comma-separated list")
    return items


def print_emergence(emergence: Any, console: Any) -> None:
    """Universal share (and count) per layer and step, one table per member."""
    from rich.table import Table

    for member, sub in emergence.groupby("member", sort=False):
        steps = sorted(sub["step"].unique())
        # headers and notes as plain lines: a table title would wrap to the (narrow) table
        console.print(f"[bold]universal share per layer and step ({member})[/]")
        t = Table()
        t.add_column("layer", justify="right")
        for s in steps:
            t.add_column(f"step {s}", justify="right")
        for layer, g in sub.groupby("layer", sort=True):
            by = g.set_index("step")
            t.add_row(f"L{layer}", *[f"{by.at[s, 'universal_share']:.1%} ({by.at[s, 'universal']})"
                                     for s in steps])
        tot = sub.groupby("step")[["universal", "neurons"]].sum()
        t.add_row("all", *[f"{tot.at[s, 'universal'] / tot.at[s, 'neurons']:.1%} "
                           f"({tot.at[s, 'universal']})" for s in steps])
        exc = sub.groupby("step").apply(lambda g: (g["mean_excess_corr"] * g["neurons"]).sum()
                                        / g["neurons"].sum(), include_groups=False)
        console.print(t)
        console.print("mean excess correlation: " + ", ".join(
            f"step {s}: {exc[s]:.3f}" for s in steps), highlight=False)


def print_persistence(persistence: Any, console: Any) -> None:
    """P_persist(t -> final step) per layer, one table per member (n persisting / |U_t|)."""
    from rich.table import Table

    final = int(persistence["later_step"].max())
    to_final = persistence[persistence["later_step"] == final]
    for member, sub in to_final.groupby("member", sort=False):
        steps = sorted(sub["step"].unique())
        console.print(f"[bold]persistence P(t → {final}) = |U_t ∩ U_{final}| / |U_t| "
                      f"({member})[/]")
        t = Table()
        t.add_column("layer", justify="right")
        for s in steps:
            t.add_column(f"t = {s}", justify="right")
        # the per-layer rows first, then all layers pooled (layer -1), as in the emergence table
        for layer, g in sorted(sub.groupby("layer"), key=lambda x: (x[0] == -1, x[0])):
            by = g.set_index("step")
            cells = []
            for s in steps:
                r = by.loc[s]
                p = "-" if r["n_universal"] == 0 else f"{r['p_persist']:.2f}"
                cells.append(f"{p} ({r['n_persist']}/{r['n_universal']})")
            t.add_row("all" if layer == -1 else f"L{layer}", *cells)
        console.print(t)
        if (sub["n_universal"] == 0).any():
            console.print("-: U_t is empty (P_persist is NaN in persistence.parquet)")


def show_dynamics(res: Any) -> None:
    """Print a :class:`~unineurons.analyses.dynamics.DynamicsResult`: emergence, persistence
    and, with ablations, each step's headline."""
    from . import console

    print_emergence(res.emergence, console)
    print_persistence(res.persistence, console)
    if res.ablations is not None and len(res.ablations):
        from ..analyses.ablate import headline

        for step, g in res.ablations.groupby("step", sort=True):
            console.print(f"step {step}: {headline(g)}", highlight=False, soft_wrap=True)


def dynamics(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Run directory to write (steps/step{t}/ holds "
                             "each step's correlate run)."),
    tokens: Path = typer.Option(..., "--tokens", help="Token store to correlate on (held-out)."),
    zoo: Path | None = typer.Option(None, "--zoo", help="Seed zoo folder (`unineurons zoo "
                                    "train`)."),
    steps: str | None = typer.Option(None, "--steps", help="Comma-separated checkpoint steps; "
                                     "with --zoo, every checkpoint all seeds have when unset."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated zoo seeds (default: "
                                     "all)."),
    reference_seed: int = typer.Option(0, "--reference-seed", help="Zoo seed whose neurons "
                                       "are followed."),
    model_template: str | None = typer.Option(None, "--model-template", help="Model spec with "
                                              "{name} and {step} instead of --zoo, e.g. "
                                              "'stanford-crfm/{name}@checkpoint-{step}'."),
    names: str | None = typer.Option(None, "--names", help="Comma-separated values of {name}; "
                                     "the first is the reference."),
    n_tokens: int | None = typer.Option(None, "--n-tokens", help="Tokens per step (default: "
                                        "the whole store)."),
    universal: str = typer.Option("threshold", "--universal", help="threshold (excess > "
                                  "--threshold), top:S (the share S of neurons with the "
                                  "highest excess, e.g. top:0.05, for small zoos) or calibrated "
                                  "(BH q < --fdr against each neuron's rotation null)."),
    null_rotations: int = typer.Option(32, "--null-rotations", help="Rotations of the calibrated "
                                       "null per layer; 0: paper criterion only."),
    fdr: float = typer.Option(0.01, "--fdr", help="Calibrated universal if BH q < fdr."),
    similarity: bool = typer.Option(True, "--similarity/--no-similarity", help="Each step's "
                                    "layer similarity and one-to-one matching too."),
    threshold: float = typer.Option(0.5, "--threshold", help="Universal if excess correlation "
                                    "> threshold (Gurnee et al.: 0.5)."),
    pairs: str = typer.Option("reference", "--pairs", help="reference: follow the reference "
                              "model's neurons; all: every model's."),
    batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:i]."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, tf32, bfloat16 or float64."),
    memory_budget: str = typer.Option("8GB", "--memory-budget", help="Memory for one step's "
                                      "accumulators."),
    keep_newline: bool = typer.Option(False, "--keep-newline", help="Keep newline positions."),
    ablate: bool = typer.Option(False, "--ablate", help="Group ablations at every step -> "
                                "dynamics_ablations.parquet."),
    ablate_sizes: str = typer.Option("1,4,16,64,all", "--ablate-sizes", help="Set sizes of the "
                                     "ablations ('all' = the whole universal set)."),
    ablate_method: str = typer.Option("zero", "--ablate-method", help="zero, mean or value:X."),
    ablate_draws: int = typer.Option(3, "--ablate-draws", help="Random sets per size."),
    ablate_n_tokens: int | None = typer.Option(None, "--ablate-n-tokens", help="Tokens the "
                                               "ablations are evaluated on (default: the "
                                               "step's)."),
    rank_all: bool = typer.Option(False, "--rank-all", help="Ablations rank every neuron by "
                                  "excess, below the threshold too."),
    backend: str = BACKEND,
    ray_address: str = RAY_ADDRESS,
    workers: int = WORKERS,
    cpus_per_worker: int = CPUS_PER_WORKER,
    family: str | None = typer.Option(None, "--family", help="A seed family by name (`unineurons "
                                      "families`) instead of --zoo / --model-template: --seeds "
                                      "picks its members, --steps its checkpoints."),
    families_file: list[Path] | None = _opts.FAMILIES_FILE,
    safetensors_only: bool = _opts.SAFETENSORS_ONLY,
) -> None:
    """Universal neurons at every checkpoint step: emergence per layer, persistence
    P(t → t'), per-neuron trajectories and (--ablate) group ablations per step."""
    from ..analyses.ablate import AblateConfig
    from ..analyses.dynamics import DynamicsConfig, run_dynamics
    from ..zoo import parse_int_list
    from . import console
    from .ablate import _items, _sizes
    from .families import hold_safetensors_only

    hold_safetensors_only(ctx, safetensors_only)
    if family is not None:
        from ..errors import UnineuronsError
        from .families import family_template

        if zoo is not None or model_template is not None or names is not None:
            raise UnineuronsError("--family replaces --zoo, --model-template and --names; give "
                                  "one source of models")
        model_template, fam_names = family_template(
            family, seeds, None if steps is None else list(parse_int_list(steps, "--steps")),
            families_file)
        names, seeds = ",".join(fam_names), None
    elif families_file:
        from ..errors import UnineuronsError

        raise UnineuronsError("--families-file adds seed families for --family; give --family "
                              "NAME too")
    # validated without --ablate too: a bad value is refused, never ignored
    acfg = build(AblateConfig, sets=_items("universal,non-universal,random", "--sets"),
                   method=ablate_method, sizes=_sizes(ablate_sizes),
                   random_draws=ablate_draws, rank_all=rank_all, n_tokens=ablate_n_tokens,
                   batch_size=batch_size, device=device)
    cfg = build(
        DynamicsConfig, zoo=None if zoo is None else str(zoo),
        seeds=None if seeds is None else list(parse_int_list(seeds, "--seeds")),
        reference_seed=reference_seed, model_template=model_template,
        names=None if names is None else _names(names, "--names"),
        steps=None if steps is None else list(parse_int_list(steps, "--steps")),
        tokens=str(tokens), n_tokens=n_tokens, universal=universal, threshold=threshold,
        null_rotations=null_rotations, fdr=fdr, similarity=similarity,
        pairs=pairs, batch_size=batch_size, device=device, dtype=dtype,
        memory_budget=memory_budget, drop_newline=not keep_newline, ablate=acfg if ablate else None,
        backend=backend,
        ray_address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker)
    res = run_dynamics(cfg, out, say=lambda m: console.print(m, highlight=False))
    show_dynamics(res)
    tables = "emergence, persistence, first_universal, trajectories" + \
        (", dynamics_ablations" if res.ablations is not None else "")
    console.print(f"results: {out}/ ({tables}.parquet; steps/step{{t}}/ per step)",
                  highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``dynamics`` command to ``app``."""
    app.command("dynamics")(dynamics)
