"""Seed families by name: published models trained alike from different seeds.

A *seed family* (not to be confused with the *neuron families* of
:mod:`unineurons.analyses.families`) is a named list of members — hub ids or local folders
sharing one tokenizer, each with its seed — and the family's checkpoint naming (the hub
revision of training step ``t``, e.g. ``checkpoint-{step}`` or ``step{step}``). The registry is
plain data: ``configs/seed_families.toml`` in the package (Stanford CRFM GPT-2 small and
medium, Pythia 14m-410m with the PolyPythias seeds, the 160m data-seed and weight-seed runs),
then the files in ``UNINEURONS_SEED_FAMILIES`` (``:``-separated), then files given in code or
with ``--families-file``; a later family of the same name replaces an earlier one.

Gurnee et al. (2024) compare the five CRFM GPT-2 seeds (Sec. 3); Nandan et al. (2025) follow
them through training checkpoints. ``--family crfm-gpt2-small --step 400000`` names the first;
``dynamics --family crfm-gpt2-small --steps ...`` the second.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UnineuronsError

__all__ = ["Member", "SeedFamily", "load_seed_families", "get_seed_family", "parse_seeds",
           "expand_steps", "SEED_FAMILIES_ENV"]

#: Environment variable: extra registry files (``:``-separated; ``;`` on Windows).
SEED_FAMILIES_ENV = "UNINEURONS_SEED_FAMILIES"

_FIELDS = {"description", "architecture", "params", "n_layers", "d_mlp", "tokenizer", "revision",
           "final_step", "steps", "members"}


@dataclass(frozen=True)
class Member:
    """One seed of a family: its seed label and its hub id (or local folder)."""

    seed: int
    id: str


@dataclass(frozen=True)
class SeedFamily:
    """A named seed family (see the module docstring for the fields' meaning)."""

    name: str
    members: tuple[Member, ...]
    revision: str | None = None  #: hub revision of step {step}; None: no checkpoints
    steps: tuple[int, ...] | None = None  #: published steps, ascending; None: not listed
    final_step: int | None = None
    description: str = ""
    architecture: str = ""
    params: str = ""
    n_layers: int | None = None
    d_mlp: int | None = None
    tokenizer: str = ""
    steps_text: str = ""  #: the steps as written in the file (ranges kept)
    source: str = ""  #: the registry file it came from

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(m.seed for m in self.members)

    def select(self, seeds: Sequence[int] | None = None) -> list[Member]:
        """Members with these seeds, in the order given (every member, in file order, when
        None); the first is the reference of a correlate run.

        Raises:
            UnineuronsError: a seed the family does not have; a seed given twice.
        """
        if seeds is None:
            return list(self.members)
        by_seed = {m.seed: m for m in self.members}
        missing = [s for s in seeds if s not in by_seed]
        if missing:
            raise UnineuronsError(
                f"family {self.name} has no seed {', '.join(map(str, missing))}; its seeds are "
                f"{', '.join(map(str, self.seeds))}")
        dup = sorted({s for s in seeds if list(seeds).count(s) > 1})
        if dup:
            raise UnineuronsError(f"--seeds gives seed {dup[0]} twice")
        return [by_seed[s] for s in seeds]

    def check_step(self, step: int) -> None:
        """Raises UnineuronsError when the family has no checkpoints or none at ``step``."""
        if self.revision is None:
            raise UnineuronsError(f"family {self.name} has no checkpoint naming (revision); drop "
                                  "--step to load its members as they are")
        if self.steps is not None and step not in self.steps:
            below = [s for s in self.steps if s < step]
            above = [s for s in self.steps if s > step]
            near = ", ".join(str(s) for s in ([below[-1]] if below else []) + above[:1])
            raise UnineuronsError(
                f"family {self.name} has no checkpoint at step {step}; nearest: {near} (published: "
                f"{self.steps_text}; `unineurons families {self.name}` lists them)")

    def revision_for(self, step: int) -> str:
        """The hub revision of ``step`` (checked against the published steps)."""
        self.check_step(step)
        assert self.revision is not None
        return self.revision.format(step=step)

    def specs(self, seeds: Sequence[int] | None = None, step: int | None = None) -> list[str]:
        """Model specs of the chosen members: ``ID@REVISION`` at ``step``, else ``ID`` (main).

        A local-folder member has no revisions: with ``step`` it is an error.
        """
        members = self.select(seeds)
        if step is None:
            return [m.id for m in members]
        rev = self.revision_for(step)
        local = [m.id for m in members if _is_local(m.id)]
        if local:
            raise UnineuronsError(f"family {self.name}: member {local[0]} is a local folder; "
                                  "folders have no revisions, so --step does not apply")
        return [f"{m.id}@{rev}" for m in members]

    def template(self) -> str:
        """``{name}@REVISION`` with ``{step}`` left in: dynamics' model template, whose
        ``{name}`` values are the member ids."""
        if self.revision is None:
            raise UnineuronsError(f"family {self.name} has no checkpoint naming (revision); "
                                  "dynamics needs one")
        return "{name}@" + self.revision


def _is_local(member_id: str) -> bool:
    return member_id.startswith((".", "/", "~")) or Path(member_id).is_dir()


def expand_steps(items: Sequence[Any], where: str) -> tuple[int, ...]:
    """``[0, 1, "1000-143000:1000"]`` -> the sorted steps; a range ``START-STOP:EVERY``
    includes both ends when STOP - START is a multiple of EVERY."""
    out: set[int] = set()
    for it in items:
        if isinstance(it, bool):
            raise UnineuronsError(f"{where}: step {it!r} is not an integer")
        if isinstance(it, int):
            out.add(it)
            continue
        text = str(it).strip()
        rng, _, every = text.partition(":")
        a, sep, b = rng.partition("-")
        try:
            start, stop, step = int(a), int(b), int(every or "1")
            if not sep or step <= 0 or stop < start:
                raise ValueError
        except ValueError:
            raise UnineuronsError(f"{where}: step {text!r} is neither an integer nor a range "
                                  "START-STOP:EVERY, e.g. \"1000-143000:1000\"") from None
        out.update(range(start, stop + 1, step))
    if any(s < 0 for s in out):
        raise UnineuronsError(f"{where}: steps must not be negative")
    return tuple(sorted(out))


def _family(name: str, d: Any, source: str) -> SeedFamily:
    where = f"{source}: family {name}"
    if not isinstance(d, dict):
        raise UnineuronsError(f"{where} is not a table")
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise UnineuronsError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(_FIELDS))}")
    raw = d.get("members")
    if not isinstance(raw, list) or not raw:
        raise UnineuronsError(f"{where} needs members = [{{ seed = 0, id = \"org/name\" }}, ...]")
    members = []
    for m in raw:
        if (not isinstance(m, dict) or set(m) != {"seed", "id"} or isinstance(m["seed"], bool)
                or not isinstance(m["seed"], int) or not isinstance(m["id"], str) or not m["id"]):
            raise UnineuronsError(f"{where}: member {m!r} is not {{ seed = INTEGER, id = \"org/name\" }}")
        if "{" in m["id"] or "@" in m["id"]:
            raise UnineuronsError(f"{where}: member id {m['id']!r} must be a plain hub id or folder "
                                  "(the step's revision comes from the family's revision field)")
        members.append(Member(int(m["seed"]), m["id"]))
    seeds = [m.seed for m in members]
    if len(set(seeds)) != len(seeds):
        raise UnineuronsError(f"{where}: two members have the same seed")
    revision = d.get("revision")
    if revision is not None and (not isinstance(revision, str) or "{step}" not in revision
                                 or revision.replace("{step}", "").count("{")):
        raise UnineuronsError(f"{where}: revision must contain {{step}} and no other field, e.g. "
                              "\"checkpoint-{step}\"")
    steps_raw = d.get("steps")
    steps = None
    if steps_raw is not None:
        if not isinstance(steps_raw, list) or not steps_raw:
            raise UnineuronsError(f"{where}: steps must be a list, e.g. [0, \"1000-143000:1000\"]")
        steps = expand_steps(steps_raw, where)
    for key in ("n_layers", "d_mlp", "final_step"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise UnineuronsError(f"{where}: {key} must be a non-negative integer")
    return SeedFamily(
        name=name, members=tuple(members), revision=revision, steps=steps,
        final_step=d.get("final_step"), description=str(d.get("description", "")),
        architecture=str(d.get("architecture", "")), params=str(d.get("params", "")),
        n_layers=d.get("n_layers"), d_mlp=d.get("d_mlp"), tokenizer=str(d.get("tokenizer", "")),
        steps_text=", ".join(str(s) for s in steps_raw or []), source=source)


def _read(text: str, source: str) -> dict[str, SeedFamily]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UnineuronsError(f"seed family file {source} is not valid TOML ({e})") from None
    fams = data.get("families")
    if not isinstance(fams, dict) or set(data) - {"families"}:
        raise UnineuronsError(f"seed family file {source} must hold [families.NAME] tables only "
                              "(see `unineurons families --help`)")
    return {name: _family(name, d, source) for name, d in fams.items()}


def load_seed_families(files: Sequence[str | Path] = ()) -> dict[str, SeedFamily]:
    """Every seed family: the built-in registry, then ``UNINEURONS_SEED_FAMILIES``, then
    ``files`` (later files replace families of the same name).

    Raises:
        UnineuronsError: a file that is missing, not TOML, or not of the registry's shape.
    """
    builtin = resources.files("unineurons") / "configs" / "seed_families.toml"
    out = _read(builtin.read_text(encoding="utf-8"), "built-in seed_families.toml")
    env = [p for p in os.environ.get(SEED_FAMILIES_ENV, "").split(os.pathsep) if p.strip()]
    for f in [*env, *files]:
        p = Path(f).expanduser()
        if not p.is_file():
            src = f"{SEED_FAMILIES_ENV}" if str(f) in env else "--families-file"
            raise UnineuronsError(f"seed family file {p} ({src}) does not exist")
        out.update(_read(p.read_text(encoding="utf-8"), str(p)))
    return out


def get_seed_family(name: str, files: Sequence[str | Path] = ()) -> SeedFamily:
    """The family called ``name``; an unknown name is an error listing the known ones."""
    fams = load_seed_families(files)
    if name not in fams:
        raise UnineuronsError(f"no seed family {name!r}; known: {', '.join(sorted(fams))} (add "
                              "your own with --families-file FILE)")
    return fams[name]


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"21,49"`` or ``"0,2,5-7"`` -> seeds in the order given (ranges inclusive)."""
    out: list[int] = []
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise UnineuronsError("--seeds is empty; give seeds like 0-9 or 21,49,81")
    for t in items:
        a, sep, b = t.partition("-")
        try:
            if sep and a:
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(t))
        except ValueError:
            raise UnineuronsError(f"--seeds: {t!r} is not a seed or a range like 0-9") from None
    return out
