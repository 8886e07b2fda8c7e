"""``unineurons families``: the seed families by name, and ``--family`` for the model commands.

The registry is :mod:`unineurons.models.seed_families` (plain TOML data). :func:`family_models`
turns ``--family NAME [--seeds S] [--step N]`` into model specs for correlate, analyze and
ablate; :func:`family_template` into dynamics' model template and names.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UnineuronsError

__all__ = ["register", "family_models", "family_template", "hold_safetensors_only"]


def _files(families_file: list[Path] | None) -> list[Path]:
    return list(families_file or [])


def hold_safetensors_only(ctx: typer.Context, enabled: bool) -> None:
    """``--safetensors-only``: every model this command loads (and local Ray workers, through
    the environment) refuses ``.bin`` weights until the command ends."""
    if not enabled:
        return
    from ..models.checkpoint import strict_weights

    held = strict_weights(True)
    held.__enter__()
    ctx.call_on_close(lambda: held.__exit__(None, None, None))


def family_models(models: list[str] | None, family: str | None, seeds: str | None,
                  step: int | None, families_file: list[Path] | None,
                  required: bool = False) -> list[str]:
    """``--model`` specs followed by the family's members (``--seeds`` in the order given, at
    ``--step``'s revision, else main).

    Raises:
        UnineuronsError: ``--seeds`` / ``--step`` without ``--family``; an unknown family, seed
            or step; ``required`` and neither models nor a family.
    """
    from ..models.seed_families import get_seed_family, parse_seeds

    out = list(models or [])
    if family is None:
        if seeds is not None or step is not None:
            raise UnineuronsError("--seeds and --step pick members of a seed family; give "
                                  "--family NAME too (`unineurons families` lists them)")
        if families_file:
            raise UnineuronsError("--families-file adds seed families for --family; give "
                                  "--family NAME too")
        if required and not out:
            raise UnineuronsError("give the models: --model SPEC (repeat) or --family NAME "
                                  "(`unineurons families` lists them)")
        return out
    fam = get_seed_family(family, _files(families_file))
    chosen = None if seeds is None else parse_seeds(seeds)
    specs = fam.specs(chosen, step)
    dup = sorted(set(out) & set(specs))
    if dup:
        raise UnineuronsError(f"model {dup[0]} is given by --model and by --family; give it once")
    return out + specs


def family_template(family: str, seeds: str | None, steps: list[int] | None,
                    families_file: list[Path] | None) -> tuple[str, list[str]]:
    """``(model_template, names)`` of a family for dynamics: ``{name}@REVISION`` and the
    chosen members' ids; every step must be published.

    Raises:
        UnineuronsError: unknown family / seed / step; no steps given.
    """
    from ..models.seed_families import get_seed_family, parse_seeds

    fam = get_seed_family(family, _files(families_file))
    members = fam.select(None if seeds is None else parse_seeds(seeds))
    if not steps:
        raise UnineuronsError(f"dynamics --family {family} needs --steps (published: "
                              f"{fam.steps_text or 'not listed'})")
    for s in steps:
        fam.check_step(s)
    return fam.template(), [m.id for m in members]


def families(
    name: str | None = typer.Argument(None, help="A family: list its members and steps."),
    families_file: list[Path] = typer.Option(None, "--families-file", help=(
        "Extra seed family file (TOML, same shape as the built-in one); repeat. Also: "
        "UNINEURONS_SEED_FAMILIES=FILE[:FILE].")),
) -> None:
    """The seed families --family knows: members, sizes, checkpoint steps, tokenizer.

    The registry is plain TOML (unineurons/configs/seed_families.toml); add your own families
    in a file of the same shape, given with --families-file or UNINEURONS_SEED_FAMILIES."""
    from rich.table import Table

    from ..models.seed_families import get_seed_family, load_seed_families
    from . import console

    if name is not None:
        fam = get_seed_family(name, _files(families_file))
        console.print(f"[bold]{fam.name}[/]: {fam.description}", highlight=False, soft_wrap=True)
        arch = f"{fam.architecture}, {fam.params} parameters" if fam.params else fam.architecture
        if fam.n_layers is not None and fam.d_mlp is not None:
            arch += (f", {fam.n_layers} layers x {fam.d_mlp} = {fam.n_layers * fam.d_mlp:,} "
                     "neurons")
        console.print(f"architecture: {arch}", highlight=False)
        console.print(f"tokenizer: {fam.tokenizer}", highlight=False)
        if fam.revision:
            n = f"{len(fam.steps)} " if fam.steps is not None else ""
            console.print(f"checkpoints: {n}steps as revision {fam.revision}: "
                          f"{fam.steps_text or 'not listed'}; main = step {fam.final_step}",
                          highlight=False, soft_wrap=True)
        console.print(f"from: {fam.source}", highlight=False)
        console.print("members (--seeds picks them; the first is the reference):", highlight=False)
        t = Table()
        t.add_column("seed", justify="right")
        t.add_column("model")
        for m in fam.members:
            t.add_row(str(m.seed), m.id)
        console.print(t)
        return
    fams = load_seed_families(_files(families_file))
    console.print("seed families (`unineurons families NAME` lists members; use them as "
                  "--family NAME --seeds S --step N)", highlight=False)
    t = Table()
    for col in ("family", "members", "seeds", "size", "neurons", "steps", "revision",
                "tokenizer"):
        t.add_column(col, justify="right" if col in ("members", "size", "neurons") else "left")
    for fam in fams.values():
        seeds = fam.seeds
        contiguous = seeds == tuple(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2
        neurons = (f"{fam.n_layers} x {fam.d_mlp}" if fam.n_layers is not None
                   and fam.d_mlp is not None else "-")
        steps = "-" if fam.steps is None else (
            f"{len(fam.steps)}: {fam.steps[0]}..{fam.steps[-1]}")
        t.add_row(fam.name, str(len(fam.members)),
                  f"{seeds[0]}-{seeds[-1]}" if contiguous else ",".join(map(str, seeds)),
                  fam.params or "-", neurons, steps, fam.revision or "-", fam.tokenizer)
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add the ``families`` command to ``app``."""
    app.command("families")(families)
