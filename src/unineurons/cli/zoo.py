"""``unineurons zoo ...``: train a seed family of small GPT-2 models and inspect it.

Thin wrappers over :mod:`unineurons.zoo`.
"""

from __future__ import annotations

from pathlib import Path

import typer

zoo_app = typer.Typer(help="Train and inspect seed zoos: K small GPT-2 models that differ only "
                      "in their seed, with checkpoints.", no_args_is_help=True)


@zoo_app.command("train")
def zoo_train(
    tokens: Path = typer.Option(..., "--tokens", help="Training token store folder "
                                "(`unineurons tokens build`); its tokenizer sets the vocabulary "
                                "and its ctx the model's positions."),
    out: Path = typer.Option(..., "--out", help="Zoo folder to write: new, empty, or a zoo made "
                             "with the same settings (which is then resumed or extended)."),
    heldout: Path | None = typer.Option(None, "--heldout", help="Held-out token store (same "
                                        "tokenizer) for the held-out loss; none: train loss only."),
    preset: str = typer.Option("tiny", "--preset", help="Model shape and training defaults: "
                               "micro (tests), tiny (demo), small (research)."),
    seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Comma-separated distinct seeds; each "
                              "sets both the initial weights and the data order of one model."),
    init_seeds: str | None = typer.Option(None, "--init-seeds", help="With --data-seeds: train "
                                          "the seed grid instead of --seeds, one model "
                                          "init{I}-data{D} per pair (initial weights from seed I, "
                                          "data order from seed D), e.g. 0,1,2."),
    data_seeds: str | None = typer.Option(None, "--data-seeds", help="Data-order seeds of the "
                                          "grid (see --init-seeds), e.g. 0,1,2."),
    grid_pairs: str | None = typer.Option(None, "--grid-pairs", help="Only these INIT:DATA "
                                          "pairs of the grid, e.g. 0:0,0:1,1:0 (default: all)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps per seed "
                                     "(default: the preset's)."),
    checkpoints: str | None = typer.Option(None, "--checkpoints", help="Comma-separated steps "
                                           "to save (1..--steps); the last step is always saved "
                                           "(default: 1/8, 1/4, 1/2 and all of --steps)."),
    workers: int | None = typer.Option(None, "--workers", help="Seeds trained at once, one process "
                                       "and one CPU thread each (default: min(seeds, CPUs))."),
    lr: float | None = typer.Option(None, "--lr", help="Peak AdamW learning rate "
                                    "(default: the preset's)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Contexts per step "
                                          "(default: the preset's)."),
    ctx: int | None = typer.Option(None, "--ctx", help="Train on the first CTX tokens of each "
                                   "row; later positions stay untrained, so prefer a store built "
                                   "with this --ctx (default: the token store's ctx)."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Held-out loss every N "
                                          "steps and at each checkpoint (default: the preset's)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Folder the token store's "
                                          "tokenizer is in now, when it moved since the store "
                                          "was built (its vocabulary is checked)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:i: where the models, "
                               "optimizer states and batches live (checkpoints are saved on CPU)."),
) -> None:
    """Train one GPT-2 per seed; rerunning the same command resumes from the last checkpoints."""
    from ..errors import UnineuronsError
    from ..zoo import parse_int_list, train_zoo, zoo_info
    from ..zoo.config import grid_members, parse_pairs
    from . import console

    if (init_seeds is None) != (data_seeds is None):
        raise UnineuronsError("--init-seeds and --data-seeds go together; give both (or --seeds)")
    if init_seeds is not None and data_seeds is not None:
        seed_list = grid_members(parse_int_list(init_seeds, "--init-seeds"),
                                 parse_int_list(data_seeds, "--data-seeds"),
                                 None if grid_pairs is None else parse_pairs(grid_pairs))
    elif grid_pairs is not None:
        raise UnineuronsError("--grid-pairs needs --init-seeds and --data-seeds")
    else:
        seed_list = parse_int_list(seeds, "--seeds")
    ckpt_list = None if checkpoints is None else parse_int_list(checkpoints, "--checkpoints")
    from ..relocate import relocated

    with relocated(tokenizer=tokenizer):
        path = train_zoo(tokens, out, preset=preset, seeds=seed_list, steps=steps,
                         checkpoints=ckpt_list, heldout=heldout, workers=workers, lr=lr,
                         batch_size=batch_size, ctx=ctx, eval_every=eval_every, device=device)
    _print_info(zoo_info(path), console)


@zoo_app.command("info")
def zoo_info_cmd(
    zoo: Path = typer.Argument(..., help="Zoo folder (made by `unineurons zoo train`)."),
) -> None:
    """List a zoo's seeds, their checkpoints and their last train / held-out losses."""
    from ..zoo import zoo_info
    from . import console

    _print_info(zoo_info(zoo), console)


@zoo_app.command("partner-kinds")
def zoo_partner_kinds(
    run: Path = typer.Argument(..., help="Run directory of a finished correlate stage."),
    member_seeds: list[str] = typer.Option([], "--member-seeds", help="MODEL=INIT:DATA for a "
                                           "model whose seeds no folder records (e.g. "
                                           "EleutherAI/pythia-160m-data-seed1=1234:1), repeatable; "
                                           "the model spec exactly as given to correlate."),
) -> None:
    """Universality per partner kind (same init / same data order / both different) of a
    correlate run: writes partner_kinds.parquet and the per-kind excess columns of
    neurons.parquet. Zoo members' seeds are read from their folders."""
    from ..correlate.partner_kinds import write_partner_kinds
    from ..errors import UnineuronsError
    from . import console

    seeds: dict[str, tuple[int | str, int | str]] = {}
    for item in member_seeds:
        spec, eq, pair = item.rpartition("=")
        init, colon, data = pair.partition(":")
        if not eq or not colon or not spec or not init or not data:
            raise UnineuronsError(f"--member-seeds {item!r}: give MODEL=INIT:DATA")
        seeds[spec] = (init, data)
    df = write_partner_kinds(run, seeds)
    for (kind, layer), g in df.groupby(["partner_kind", "layer"], sort=False):
        cal = (f", calibrated {100 * g['universal_calibrated_share'].mean():.1f}%"
               if "universal_calibrated_share" in g else "")
        console.print(f"{kind:15s} L{layer}: mean excess {g['mean_excess_corr'].mean():.3f}, "
                      f"universal {100 * g['universal_share'].mean():.1f}%{cal}", highlight=False)


def _print_info(info: dict, console) -> None:
    from rich.table import Table

    cfg = info["config"]
    console.print(
        f"zoo {info['preset']}: {cfg['n_layer']} layers x {cfg['n_inner']} neurons "
        f"(d_model {cfg['n_embd']}), ctx {info['ctx']}, vocab {info['vocab_size']}, "
        f"{info['steps']} steps of {cfg['batch_size']} x {info['ctx']} tokens; "
        f"tokens {info['tokens']}", highlight=False, soft_wrap=True)
    table = Table("seed", "step", "checkpoints", "train loss", "held-out loss", "train time")

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    for seed, s in info["per_seed"].items():
        table.add_row(str(seed), f"{s['step']}/{info['steps']}",
                      ",".join(map(str, s["checkpoints"])) or "-", fmt(s["train_loss"]),
                      fmt(s["heldout_loss"]), fmt(s["elapsed_s"], ".0f") + " s")
    console.print(table)
    for note in info.get("notes", []):
        console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``zoo`` command group to ``app``."""
    app.add_typer(zoo_app, name="zoo")
