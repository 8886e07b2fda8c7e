"""Training dynamics: emergence and persistence of universal neurons across checkpoints.

Nandan et al. (2025) follow universal neurons through training: at every checkpoint step t the
seeds of a family are correlated (the correlate stage, unchanged) and the universal set U_t is
recorded; the universal share per layer shows when universality emerges (their Fig. 1),
``P_persist(t -> t') = |U_t ∩ U_t'| / |U_t|`` whether the neurons universal early stay universal,
and group ablations at every step whether their effect grows (Fig. 3-4). Usage::

    unineurons dynamics --zoo ZOO --steps 37,75,150,300 --tokens tokens/heldout --out DYN
    unineurons dynamics --model-template 'stanford-crfm/{name}@checkpoint-{step}' \\
        --names alias-gpt2-small-x21,battlestar-gpt2-small-x49 --steps 10000,400000 ...

Layout of ``DYN`` (a run directory; columns in docs/tables.md)::

    manifest.json               section "dynamics": config, members, steps, each step's models
    steps/step{t}/              a normal, resumable run directory per step (correlate, ablate)
    emergence.parquet           per step x member x layer: universal count and share, readability
    persistence.parquet         per member x layer x (t, t' >= t): P_persist and Jaccard
    first_universal.parquet     per neuron: first step universal, step it stays universal from
    trajectories.parquet        per neuron x step: excess / max / baseline correlation
    dynamics_ablations.parquet  with ``ablate``: every step's ablations.parquet, plus ``step``

A finished step is reused on a re-run (the correlate stage's own config hash decides); a step
interrupted mid-pass resumes from its checkpoint.
"""

from __future__ import annotations

import math
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import (
    BACKEND_FIELDS,
    MAX_BATCH,
    MAX_DRAWS,
    MAX_INT,
    MAX_SEED,
    Backend,
    Device,
    without_backend,
)
from ..errors import UnineuronsError
from ..progress import progress
from ..rundir import RunDir
from .ablate import AblateConfig
from .dynamics_tables import (
    emergence_table,
    first_universal_table,
    parse_universal,
    persistence_table,
    universal_mask,
)

__all__ = ["DynamicsConfig", "DynamicsResult", "run_dynamics", "expand_template",
           "zoo_step_models", "plan_models", "correlate_config", "with_defaults"]

#: DynamicsConfig fields handed to every step's CorrelateConfig unchanged.
_CORRELATE_FIELDS = ("n_tokens", "pairs", "threshold", "null_rotations", "fdr", "similarity",
                     "ceiling", "batch_size",
                     "accumulate_tokens", "device", "dtype", "memory_budget", "seed",
                     "drop_newline", *sorted(BACKEND_FIELDS))


class DynamicsConfig(Backend):
    """Universal neurons at several checkpoint steps of one seed family. With
    ``backend="ray"`` every step's correlate stage and ablations run as token shards on Ray
    workers."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    zoo: str | None = Field(None, description="Seed zoo folder (`unineurons zoo train`); its "
                            "checkpoints are the steps. Give either zoo or model_template.")
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        None, description="Zoo seeds to compare; every seed of the "
                                    "zoo when unset.")
    reference_seed: int = Field(0, ge=0, le=MAX_SEED, description="Zoo seed whose neurons are followed: the "
                                "reference of every step's correlate stage.")
    model_template: str | None = Field(None, description="Model spec with {name} and {step}, "
                                       "e.g. 'stanford-crfm/{name}@checkpoint-{step}'.")
    names: list[str] | None = Field(None, description="Values of {name} in model_template; the "
                                    "first is the reference.")
    steps: list[Annotated[int, Field(ge=0, le=MAX_INT)]] | None = Field(
        None, description="Checkpoint steps, analysed in ascending "
                                    "order; with a zoo, every checkpoint all seeds have when unset.")
    tokens: str | None = Field(None, description="Token store the correlations are measured on "
                               "(use a held-out store).")
    n_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="Use the first ceil(N / ctx) contexts "
                                 "at every step; all when unset.")
    universal: str = Field("threshold", description=(
        "Which neurons form U_t: 'threshold' = excess correlation > threshold (Gurnee et al.); "
        "'top:S' = the share S of each model's neurons with the highest excess correlation "
        "(small zoos have few neurons above 0.5); 'calibrated' = BH q < fdr against each "
        "neuron's rotation null (is_universal_calibrated)."))
    null_rotations: int = Field(32, ge=0, le=MAX_DRAWS, description="Rotations of the calibrated null per layer "
                                "(each step's is_universal_calibrated); 0: none.")
    fdr: float = Field(0.01, gt=0, lt=1, description="Calibrated universal if BH q < fdr.")
    similarity: bool = Field(True, description="Each step's layer similarity and one-to-one "
                             "matching too (correlate --similarity).")
    threshold: float = Field(0.5, ge=-1, le=1, description="Universal if excess correlation > threshold "
                             "(also the correlate stage's is_universal in each step's run).")
    pairs: Literal["reference", "all"] = Field("reference", description=(
        "reference: follow the reference model's neurons; all: every model's."))
    ceiling: bool = Field(True, description="Also compute the rotated-self ceiling per step.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Contexts per forward pass.")
    accumulate_tokens: int | None = Field(None, ge=1, le=1 << 30, description="Kept tokens buffered per "
                                          "co-moment fold; the correlate stage picks when unset.")
    device: Device = Field("cpu", description="cpu or cuda[:i].")
    dtype: Literal["float32", "tf32", "bfloat16", "float64"] = Field(
        "float32", description="Dtype of each batch's cross product (accumulation is float64).")
    memory_budget: str = Field("8GB", description="Memory for one step's accumulators.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the random rotations (the baseline).")
    drop_newline: bool = Field(True, description="Drop newline positions (as in the paper).")
    ablate: AblateConfig | None = Field(None, description=(
        "Group ablations at every step (the ablate stage's options); none when unset."))

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one step, e.g. 100,1000,10000")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"step {dup[0]} is given twice")
        if min(v) < 0:
            raise ValueError(f"step {min(v)} is negative")
        return sorted(v)

    @field_validator("universal")
    @classmethod
    def _universal(cls, v: str) -> str:
        try:
            parse_universal(v)
        except UnineuronsError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _sources(self) -> DynamicsConfig:
        if self.zoo is not None and self.model_template is not None:
            raise ValueError("give either zoo or model_template, not both")
        if self.model_template is None:
            if self.names is not None:
                raise ValueError("names fill {name} of model_template; give model_template too")
        else:
            _template_fields(self.model_template)
            if self.seeds is not None:
                raise ValueError("seeds are zoo seeds; with model_template give names")
            if not self.names or len(self.names) < 2:
                raise ValueError("model_template needs at least two names (the first is the "
                                 "reference)")
            if len(set(self.names)) != len(self.names):
                raise ValueError("a name is given twice; each name must be a different model")
            if self.steps is None:
                raise ValueError("model_template needs steps (the checkpoints to load)")
        # the per-step correlate config must validate too: check its shared fields now
        try:
            correlate_config(self, ["a", "b"])
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
        return self


@dataclass
class DynamicsResult:
    """What :func:`run_dynamics` wrote (the tables are also in ``run``)."""

    run: RunDir
    steps: list[int]
    members: list[str]  #: member labels, the reference first
    emergence: pd.DataFrame
    persistence: pd.DataFrame
    first_universal: pd.DataFrame
    trajectories: pd.DataFrame
    ablations: pd.DataFrame | None
    reused: list[int]  #: steps whose correlate results were reused
    elapsed_s: float


def correlate_config(cfg: DynamicsConfig, models: list[str]):
    """The :class:`~unineurons.correlate.config.CorrelateConfig` of one step."""
    from ..correlate.config import CorrelateConfig

    return CorrelateConfig(models=models, tokens=cfg.tokens or "", baseline="rotation",
                           **{k: getattr(cfg, k) for k in _CORRELATE_FIELDS})


def _template_fields(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"model_template {template!r} is not a format string ({e})") from None
    bad = sorted(set(fields) - {"name", "step"})
    if bad or not {"name", "step"} <= set(fields):
        found = f" (found {', '.join(bad)})" if bad else ""
        raise ValueError(f"model_template {template!r} must contain {{name}} and {{step}} and no "
                         f"other field{found}; e.g. 'stanford-crfm/{{name}}@checkpoint-{{step}}'")


def expand_template(template: str, names: Sequence[str], steps: Sequence[int]
                    ) -> dict[int, list[str]]:
    """``{step: [template with each name and that step filled in, in names order]}``."""
    try:
        _template_fields(template)
    except ValueError as e:
        raise UnineuronsError(f"--model-template: {e}") from None
    return {int(t): [template.format(name=n, step=t) for n in names] for t in steps}


def zoo_step_models(zoo: str | Path, seeds: Sequence[int] | None, reference_seed: int,
                    steps: Sequence[int] | None) -> tuple[list[str], list[int], dict[int, list[str]]]:
    """Members (``seed{S}``, the reference first), steps and ``{step: checkpoint folders}``.

    ``steps`` None: every checkpoint step that all the seeds have. A seed without a checkpoint
    at a requested step is an error naming both.
    """
    from ..zoo import zoo_checkpoints

    ck = zoo_checkpoints(zoo)
    seeds = sorted(ck) if seeds is None else list(seeds)
    missing = [s for s in seeds if s not in ck]
    if missing:
        raise UnineuronsError(f"zoo {zoo} has no seed {missing[0]}; its seeds: "
                              f"{', '.join(map(str, sorted(ck)))}")
    if reference_seed not in seeds:
        raise UnineuronsError(f"--reference-seed {reference_seed} is not among the seeds "
                              f"{', '.join(map(str, seeds))}; choose one of them")
    order = [reference_seed] + sorted(set(seeds) - {reference_seed})
    if len(order) < 2:
        raise UnineuronsError(f"zoo {zoo}: universality needs at least two seeds, got {order}")
    if steps is None:
        steps = sorted(set.intersection(*(set(ck[s]) for s in order)))
        if not steps:
            raise UnineuronsError(f"zoo {zoo}: seeds {order} share no checkpoint step yet; "
                                  "train them first (`unineurons zoo train`)")
    for t in steps:
        for s in order:
            if t not in ck[s]:
                have = ", ".join(map(str, sorted(ck[s]))) or "none"
                raise UnineuronsError(f"zoo {zoo}: seed {s} has no checkpoint at step {t} "
                                      f"(its checkpoints: {have}); choose --steps among them")
    return ([f"seed{s}" for s in order], sorted(int(t) for t in steps),
            {int(t): [str(ck[s][t]) for s in order] for t in steps})


def plan_models(cfg: DynamicsConfig) -> tuple[list[str], list[int], dict[int, list[str]]]:
    """Members, ascending steps and ``{step: model specs in member order}`` of ``cfg``."""
    if cfg.model_template is not None:
        assert cfg.names is not None and cfg.steps is not None  # checked by the config
        return list(cfg.names), list(cfg.steps), expand_template(cfg.model_template, cfg.names,
                                                                 cfg.steps)
    if cfg.zoo is None:
        raise UnineuronsError("dynamics needs a seed family: give --zoo ZOO, or "
                              "--model-template with --names")
    return zoo_step_models(cfg.zoo, cfg.seeds, cfg.reference_seed, cfg.steps)


def with_defaults(cfg: DynamicsConfig, zoo: str | Path, tokens: str | Path,
                  reference_seed: int | None = None) -> DynamicsConfig:
    """``cfg`` with the zoo (unless it names a template or a zoo), the token store and the
    reference seed filled in where it leaves them unset (the pipeline's [dynamics] section)."""
    d = cfg.model_dump()
    if cfg.zoo is None and cfg.model_template is None:
        d["zoo"] = str(zoo)
    if cfg.tokens is None:
        d["tokens"] = str(tokens)
    if reference_seed is not None and "reference_seed" not in cfg.model_fields_set:
        d["reference_seed"] = reference_seed
    return DynamicsConfig(**d)


def _step_ablate(cfg: DynamicsConfig, n_neurons: int) -> AblateConfig | None:
    """The ablate config of one step. Under ``top:S`` the universal set is ranked over every
    neuron (rank_all) and size ``all`` becomes |U_t| = ceil(S * n), so that set is exactly U_t."""
    a = cfg.ablate
    if a is None:
        return None
    if cfg.backend == "ray" and a.backend == "local":  # the steps' ablations go to Ray too
        a = AblateConfig(**{**a.model_dump(), **{k: getattr(cfg, k) for k in BACKEND_FIELDS}})
    kind, share = parse_universal(cfg.universal)
    if kind in ("threshold", "calibrated"):
        return a
    assert share is not None
    k = math.ceil(round(share * n_neurons, 9))
    sizes = list(dict.fromkeys(k if s == "all" else s for s in a.sizes))
    return AblateConfig(**{**a.model_dump(), "rank_all": True, "sizes": sizes})


def _ablate_step(sub: RunDir, acfg: AblateConfig, specs: list[str], correlate_reused: bool
                 ) -> tuple[pd.DataFrame, bool]:
    """Run (or reuse) one step's ablations; rows of ``specs`` and whether they were reused."""
    from .ablate import run_ablations

    want = without_backend(acfg.model_dump(mode="json"))  # where they ran changes nothing
    section = sub.manifest().get("ablate", {})
    if (correlate_reused and sub.has_table("ablations")
            and all(without_backend(section.get(s, {}).get("config") or {}) == want for s in specs)):
        old = sub.read_table("ablations")
        old = old[old["model"].isin(specs)]
        if set(old["model"]) == set(specs):
            return old.reset_index(drop=True), True
    df = run_ablations(sub, acfg)
    return df[df["model"].isin(specs)].reset_index(drop=True), False


def run_dynamics(cfg: DynamicsConfig, out: str | Path,
                 say: Callable[[str], None] | None = None) -> DynamicsResult:
    """Correlate the family at every step into ``out/steps/step{t}``, then write the dynamics
    tables and the manifest section ``dynamics`` into ``out`` (see the module docstring)."""
    from ..correlate.engine import run_correlate
    from ..correlate.summarize import package_versions
    from ..tokens import TokenStore

    say = say or (lambda msg: None)
    t0 = time.time()
    members, steps, models = plan_models(cfg)  # every user error before anything is written
    if cfg.tokens is None:
        raise UnineuronsError("dynamics needs --tokens: the token store to correlate on")
    TokenStore.open(cfg.tokens, verify=False)
    run = RunDir.create(out)
    neurons, layers, ablations, reused, runs = [], [], [], [], {}
    # each step is a whole correlate run (its own bars nest under this one)
    with progress("dynamics", len(steps), unit="checkpoints") as bar:
        for i, t in enumerate(steps):
            sub_path = run.path / "steps" / f"step{t}"
            say(f"step {t} ({i + 1}/{len(steps)}): {len(models[t])} models")
            res = run_correlate(correlate_config(cfg, models[t]), sub_path, resume=True)
            if res.reused:
                reused.append(t)
                say(f"step {t}: correlations done earlier, reused")
            member_of = dict(zip(models[t], members, strict=True))
            ranked = list(dict.fromkeys(res.layers["model"]))  # the models with excess columns
            nt = res.neurons[res.neurons["model"].isin(ranked)]
            neurons.append(nt.assign(step=t, member=nt["model"].map(member_of)))
            layers.append(res.layers.assign(step=t, member=res.layers["model"].map(member_of)))
            entry = {"path": f"steps/step{t}", "models": models[t], "reused": res.reused}
            acfg = _step_ablate(cfg, int((nt["model"] == ranked[0]).sum()))
            if acfg is not None:
                df, ab_reused = _ablate_step(res.run, acfg, ranked, res.reused)
                ablations.append(df.assign(step=t, member=df["model"].map(member_of)))
                entry["ablate"] = {"config": acfg.model_dump(mode="json"), "reused": ab_reused}
            runs[str(t)] = entry
            bar.advance(1)

    allt = pd.concat(neurons, ignore_index=True)
    mask = np.zeros(len(allt), dtype=bool)
    for _, idx in allt.groupby(["step", "member"], sort=False).indices.items():
        g = allt.iloc[idx]
        mask[idx] = universal_mask(g["excess_corr"].to_numpy(), g["layer"].to_numpy(),
                                   g["neuron"].to_numpy(), cfg.universal, cfg.threshold,
                                   g.get("is_universal_calibrated"))
    allt["is_universal"] = mask
    marked = allt[["step", "member", "layer", "neuron", "is_universal"]]
    emergence = emergence_table(pd.concat(layers, ignore_index=True), marked)
    persistence = persistence_table(marked)
    first = first_universal_table(marked)
    trajectories = _trajectories(allt, first, members)
    for name, df in (("emergence", emergence), ("persistence", persistence),
                     ("first_universal", first), ("trajectories", trajectories)):
        run.write_table(name, df)
    abl = None
    if ablations:
        abl = pd.concat(ablations, ignore_index=True)
        front = ["step", "member", "model"]
        abl = abl[front + [c for c in abl.columns if c not in front]]
        run.write_table("dynamics_ablations", abl)
    elif run.has_table("dynamics_ablations"):
        run.table_path("dynamics_ablations").unlink()  # from an earlier run with ablations
    from ..correlate.partner_kinds import write_dynamics_partner_kinds  # init vs data order

    write_dynamics_partner_kinds(run, {t: run.path / "steps" / f"step{t}" for t in steps})
    kind, share = parse_universal(cfg.universal)
    elapsed = time.time() - t0
    run.update_manifest(versions=package_versions(), dynamics={
        "config": cfg.model_dump(mode="json"), "members": members, "reference": members[0],
        "steps": steps, "final_step": steps[-1],
        "universal": ({"rule": "threshold", "threshold": cfg.threshold} if kind == "threshold"
                      else {"rule": "calibrated", "fdr": cfg.fdr} if kind == "calibrated"
                      else {"rule": "top", "share": share}),
        "runs": runs, "elapsed_s": round(elapsed, 3),
    })
    return DynamicsResult(run, steps, members, emergence, persistence, first, trajectories, abl,
                          reused, elapsed)


def _trajectories(allt: pd.DataFrame, first: pd.DataFrame, members: list[str]) -> pd.DataFrame:
    """Per (member, layer, neuron, step): the correlations, U_t membership and whether the
    neuron is universal at the last step (to follow the final universal set back in time)."""
    cols = ["member", "layer", "neuron", "address", "step", "model", "excess_corr", "max_corr",
            "baseline_corr", "is_universal"]
    tr = allt[cols].merge(first[["member", "layer", "neuron", "universal_final"]],
                          on=["member", "layer", "neuron"], how="left", validate="many_to_one")
    order = {m: i for i, m in enumerate(members)}
    return tr.sort_values(["member", "layer", "neuron", "step"], kind="stable",
                          key=lambda c: c.map(order) if c.name == "member" else c
                          ).reset_index(drop=True)
