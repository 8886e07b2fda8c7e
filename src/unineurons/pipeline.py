"""Pipelines: a plain-data TOML config runs the stages in data-flow order.

``unineurons run CONFIG.toml`` validates the whole config first (unknown keys and bad values
are refused with the key named), then runs each configured stage into ``out``::

    out/tokenizer/        BPE tokenizer           (stage "tokenizer")
    out/tokens/train/     training token store    (stage "tokens")
    out/tokens/heldout/   held-out token store
    out/zoo/              the seed zoo            (stage "zoo")
    out/run/              the run directory       (stages "correlate", "analyze", "ablate")
    out/dynamics/         checkpoints over training (stage "dynamics")
    out/run/report/       figures and neuron browser (stage "report"; out/run/figures/)

Work already done is reused: ``out/pipeline.json`` records, per finished stage, a hash of its
config and of everything upstream; a stage whose hash matches is skipped.
``unineurons demo`` is ``run`` on the built-in ``configs/demo.toml``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .analyses.ablate import AblateConfig
from .analyses.analyze import AnalyzeConfig
from .analyses.dynamics import DynamicsConfig
from .config import (
    MAX_BATCH,
    MAX_CTX,
    MAX_DRAWS,
    MAX_INT,
    MAX_SEED,
    MAX_VOCAB,
    MAX_WORKERS,
    Backend,
    check_model_ranges,
    describe_error,
    without_backend,
)
from .errors import UnineuronsError
from .io import prepare_out_dir, read_json, read_text, write_json
from .report.build import ReportConfig

__all__ = ["PipelineConfig", "load_config", "run_pipeline", "builtin_config"]

#: A seed: numpy and torch take uint32.
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TokenizerStage(_Section):
    source: str = Field("stdlib", description="Corpus the BPE tokenizer is trained on.")
    vocab_size: int = Field(4096, ge=259, le=MAX_VOCAB, description="Vocabulary size, special tokens included.")
    max_chars: int = Field(20_000_000, ge=1, le=MAX_INT, description="Train on at most this many characters.")


class TokensStage(_Section):
    source: str = Field("stdlib", description="Corpus the token stores are cut from.")
    ctx: int = Field(128, ge=2, le=MAX_CTX, description="Context length: BOS + ctx-1 tokens.")
    train_tokens: int = Field(4_000_000, ge=1, le=MAX_INT, description="Tokens in the training store.")
    heldout_tokens: int = Field(262_144, ge=1, le=MAX_INT, description="Tokens in the held-out store.")
    heldout_fraction: float = Field(0.1, gt=0, le=0.9, description="Share of documents held out.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Document-order seed.")


class ZooStage(_Section):
    preset: Literal["micro", "tiny", "small"] = "tiny"
    seeds: list[Seed] = Field([0, 1, 2, 3, 4], min_length=2, description="One model per seed.")
    steps: int | None = Field(None, ge=1, le=MAX_INT, description="Optimizer steps (default: the preset's).")
    checkpoints: list[Annotated[int, Field(ge=1, le=MAX_INT)]] | None = Field(
        None, description="Steps to save (the last always).")
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS, description="Training processes (default: cores).")
    lr: float | None = Field(None, gt=0, le=1, description="Peak learning rate override.")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH, description="Contexts per step override.")
    init_seeds: list[Seed] | None = Field(None, description="With data_seeds: train the seed "
                                         "grid init{I}-data{D} instead of seeds.")
    data_seeds: list[Seed] | None = Field(None, description="Data-order seeds of the grid.")

    def members(self) -> list:
        """The zoo's members: ``seeds``, or the grid's ``init{I}-data{D}`` names."""
        if self.init_seeds is None and self.data_seeds is None:
            return list(self.seeds)
        from .zoo.config import grid_members

        if self.init_seeds is None or self.data_seeds is None:
            raise UnineuronsError("config [zoo]: init_seeds and data_seeds go together")
        return grid_members(self.init_seeds, self.data_seeds)

    def model_dump(self, **kw: Any) -> dict[str, Any]:
        # unset grid fields stay out of the stage hash: configs without them are reused as before
        d = super().model_dump(**kw)
        return {k: v for k, v in d.items()
                if not (k in ("init_seeds", "data_seeds") and v is None)}


#: Keys of [correlate] that pick a seed family's members, as the commands' --family options;
#: left out of the stage hash when unset (configs without them are reused as before).
FAMILY_KEYS = ("family", "seeds", "families_file", "tokens")


def _as_keys(message: str) -> str:
    """A seed-family error worded for the command line, with the [correlate] keys' names."""
    return re.sub(r"--(families-file|family|seeds|step)\b",
                  lambda m: m.group(1).replace("-", "_"), message)


class CorrelateStage(_Section):
    """The correlate stage: the zoo's seeds (the reference seed first), or with ``family`` a
    seed family's members (``unineurons correlate --family NAME --seeds S --step N``)."""

    reference_seed: int = Field(0, ge=0, le=MAX_SEED, description="The zoo seed whose neurons are tested.")
    step: int | None = Field(None, ge=0, le=MAX_INT, description=(
        "Checkpoint step: of the zoo (default: the last), or with family the family's training "
        "step (its revision naming; default: main)."))
    family: str | None = Field(None, description=(
        "A seed family by name (`unineurons families`): correlate its members instead of the "
        "zoo's seeds; needs tokens."))
    seeds: list[Seed] | str | None = Field(None, description=(
        "With family: the members' seeds in order, e.g. [21, 49] or \"0-9\" (default: all); "
        "the first is the reference."))
    families_file: list[str] | None = Field(None, description=(
        "With family: extra seed family files (TOML like the built-in registry)."))
    tokens: str | None = Field(None, description=(
        "Token store folder (default: the pipeline's held-out store); with family one built "
        "with the family's tokenizer. [analyze] and [ablate] default to it too."))
    n_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="Held-out tokens used (default: all).")
    pairs: Literal["reference", "all"] = "reference"
    threshold: float = Field(0.5, ge=-1, le=1, description="Universal if excess correlation > threshold.")
    null_rotations: int = Field(32, ge=0, le=MAX_DRAWS, description="Rotations of the calibrated null per layer.")
    fdr: float = Field(0.01, gt=0, lt=1, description="Calibrated universal if BH q < fdr.")
    split_half: bool = Field(False, description="Universal sets of two halves of the tokens too.")
    similarity: bool = Field(True, description="Layer similarity (CKA, ridge) and one-to-one "
                             "matching too.")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH)
    memory_budget: str = "8GB"
    dtype: Literal["float32", "tf32", "bfloat16", "float64"] = "float32"

    @model_validator(mode="after")
    def _family(self) -> CorrelateStage:
        if self.family is None:
            if self.seeds is not None or self.families_file is not None:
                raise UnineuronsError("seeds and families_file pick members of a seed family; "
                                      "give family = NAME too (`unineurons families` lists them)")
            return self
        if "reference_seed" in self.model_fields_set:
            raise UnineuronsError("reference_seed picks a zoo seed; with family the first of "
                                  "seeds is the reference")
        if self.tokens is None:
            raise UnineuronsError(f"family {self.family!r} needs tokens = DIR: a token store "
                                  "built with the family's tokenizer (`unineurons tokens build "
                                  "--tokenizer MODEL`); the pipeline's own stores use its tokenizer")
        self.family_specs()  # an unknown family, seed or step is refused with the config
        return self

    def family_specs(self) -> list[str]:
        """The family's members as model specs (``seeds`` in the order given, at ``step``'s
        checkpoint, else main), as ``--family`` expands them; [] without ``family``.

        Raises:
            UnineuronsError: an unknown family, seed or step, worded with this section's keys.
        """
        if self.family is None:
            return []
        from .cli.families import family_models

        seeds = self.seeds
        if isinstance(seeds, list):
            seeds = ",".join(map(str, seeds))
        try:
            return family_models(None, self.family, seeds, self.step,
                                 [Path(f) for f in self.families_file or []], required=True)
        except UnineuronsError as e:
            raise UnineuronsError(_as_keys(str(e))) from None

    def model_dump(self, **kw: Any) -> dict[str, Any]:
        d = super().model_dump(**kw)
        return {k: v for k, v in d.items() if not (k in FAMILY_KEYS and v is None)}


class PipelineConfig(_Section):
    """A whole pipeline. Sections left out are stages not run."""

    out: str = Field("unineurons_demo", description="Folder that receives every stage's output.")
    tokenizer: TokenizerStage | None = None
    tokens: TokensStage | None = None
    zoo: ZooStage | None = None
    correlate: CorrelateStage | None = None
    analyze: AnalyzeConfig | None = Field(None, description=(
        "Options of `unineurons analyze` (tokens default to the held-out store)."
    ))
    ablate: AblateConfig | None = Field(None, description=(
        "Options of `unineurons ablate` (tokens default to the held-out store)."
    ))
    dynamics: DynamicsConfig | None = Field(None, description=(
        "Options of `unineurons dynamics` (zoo, tokens and reference seed default to the "
        "pipeline's zoo, held-out store and correlate reference seed)."
    ))
    report: ReportConfig | None = Field(None, description=(
        "The report, last: `report = true` or a [report] section of `unineurons report` options "
        "(figures and neuron browser in run/report/index.html, with the dynamics figures)."
    ))

    @field_validator("report", mode="before")
    @classmethod
    def _report(cls, v: Any) -> Any:
        # `report = true` is the report with its default options, `report = false` none
        if isinstance(v, bool):
            return ReportConfig() if v else None
        return v


def _validation_error(e: ValidationError, where: str) -> UnineuronsError:
    return UnineuronsError(f"{where}: {describe_error(e, option_style=False, model=PipelineConfig)}")


def load_config(path: str | Path | None = None, text: str | None = None,
                overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Parse and validate a TOML pipeline config (a file, or its text)."""
    where = str(path) if path else "config"
    if text is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise UnineuronsError(f"config file {p} does not exist")
        text = read_text(p, "config file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UnineuronsError(f"{where} is not valid TOML: {e}") from None
    data.update(overrides or {})
    try:
        cfg = PipelineConfig(**data)
    except ValidationError as e:
        raise _validation_error(e, where) from None
    check_model_ranges(cfg, where)  # the ranges of the command-line options, by key
    if cfg.correlate and cfg.correlate.family is None and cfg.zoo is None:
        raise UnineuronsError(f"{where}: [correlate] needs a [zoo] section (its seeds are "
                              "correlated) or family = NAME (a seed family's members)")
    return cfg


def builtin_config(name: str) -> str:
    """Text of a config shipped with the package (``demo``, ``micro``, ``seeds-grid``)."""
    f = resources.files("unineurons") / "configs" / f"{name.replace('-', '_')}.toml"
    if not f.is_file():
        raise UnineuronsError(f"no built-in config {name!r}; choose demo, micro or seeds-grid")
    return f.read_text()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Runner:
    """Runs stages in order, skipping those whose config and inputs are unchanged."""

    def __init__(self, cfg: PipelineConfig, say: Callable[[str], None]):
        self.cfg = cfg
        self.out = prepare_out_dir(cfg.out, "pipeline")
        self.say = say
        self.state_path = self.out / "pipeline.json"
        self.state = read_json(self.state_path, "pipeline state") if self.state_path.is_file() else {}
        self.chain = ""  # hash of everything upstream
        self.where: dict[str, str] = {}

    def stage(self, name: str, section: Any, outputs: list[Path], fn: Callable[[], Any]) -> None:
        dump = section.model_dump() if hasattr(section, "model_dump") else section
        if isinstance(section, Backend):
            dump = without_backend(dump)  # a stage run on Ray is reused by a local rerun
        h = _hash([self.chain, name, dump])
        self.chain = h
        done = self.state.get(name, {})
        if done.get("hash") == h and all(p.exists() for p in outputs):
            self.say(f"[dim]stage {name}: done earlier, reused[/]")
            return
        self.say(f"[bold]stage {name}[/]")
        t0 = time.time()
        fn()
        self.state[name] = {"hash": h, "elapsed_s": round(time.time() - t0, 2),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.state_path, self.state)
        self.say(f"stage {name}: {time.time() - t0:.1f} s")


def run_pipeline(cfg: PipelineConfig, say: Callable[[str], None] = print,
                 show: Callable[[str, Any], None] | None = None) -> dict[str, str]:
    """Run every configured stage; return {what: path} of the outputs."""
    r = _Runner(cfg, say)
    out = r.out
    tok_dir, train_dir, held_dir = out / "tokenizer", out / "tokens" / "train", out / "tokens" / "heldout"
    zoo_dir, run_dir = out / "zoo", out / "run"
    show = show or (lambda what, obj: None)
    # analyze and ablate read the correlate stage's store when it names one
    store = Path(cfg.correlate.tokens) if cfg.correlate and cfg.correlate.tokens else held_dir

    if cfg.tokenizer:
        from .tokenizer import train_tokenizer

        t = cfg.tokenizer
        r.stage("tokenizer", t, [tok_dir / "tokenizer.json"],
                lambda: train_tokenizer(t.source, t.vocab_size, tok_dir, max_chars=t.max_chars,
                                        heldout_fraction=cfg.tokens.heldout_fraction if cfg.tokens else 0.1))
        r.where["tokenizer"] = str(tok_dir)
    if cfg.tokens:
        from .tokens import build_token_store

        t = cfg.tokens
        tokenizer = str(tok_dir) if cfg.tokenizer else None
        if tokenizer is None:
            raise UnineuronsError("config: the tokens stage needs a [tokenizer] section")

        def build() -> None:
            build_token_store(t.source, tokenizer, t.ctx, t.train_tokens, train_dir, split="train",
                              seed=t.seed, heldout_fraction=t.heldout_fraction)
            build_token_store(t.source, tokenizer, t.ctx, t.heldout_tokens, held_dir, split="heldout",
                              seed=t.seed, heldout_fraction=t.heldout_fraction)

        r.stage("tokens", t, [train_dir / "tokens.npy", held_dir / "tokens.npy"], build)
        r.where["tokens"] = f"{train_dir} (train), {held_dir} (heldout)"
    if cfg.zoo:
        from .zoo import train_zoo, zoo_info

        z = cfg.zoo
        over = {k: v for k, v in (("lr", z.lr), ("batch_size", z.batch_size)) if v is not None}
        r.stage("zoo", z, [zoo_dir / "zoo.json"],
                lambda: train_zoo(train_dir, zoo_dir, preset=z.preset, seeds=tuple(z.members()),
                                  steps=z.steps, checkpoints=z.checkpoints, heldout=held_dir,
                                  workers=z.workers, **over))
        show("zoo", zoo_info(zoo_dir))
        r.where["zoo"] = str(zoo_dir)
    if cfg.correlate:
        c = cfg.correlate
        r.stage("correlate", c, [run_dir / "neurons.parquet"],
                lambda: show("correlate", _correlate(cfg, zoo_dir, held_dir, run_dir)))
        r.where["run"] = str(run_dir)
    if cfg.analyze:
        from .analyses.analyze import analyze_run

        an = cfg.analyze if cfg.analyze.tokens else cfg.analyze.model_copy(update={"tokens": str(store)})
        r.stage("analyze", an, [run_dir / "top_contexts.parquet"],
                lambda: show("analyze", analyze_run(run_dir, an, resume=True)))
    if cfg.ablate:
        from .analyses.ablate import run_ablations
        from .rundir import RunDir

        a = cfg.ablate if cfg.ablate.tokens else cfg.ablate.model_copy(update={"tokens": str(store)})
        r.stage("ablate", a, [run_dir / "ablations.parquet"],
                lambda: show("ablate", run_ablations(RunDir.open(run_dir), a)))
        r.where["ablations"] = str(run_dir / "ablations.parquet")
    if cfg.dynamics:
        from .analyses.dynamics import run_dynamics, with_defaults

        dyn_dir = out / "dynamics"
        d = with_defaults(cfg.dynamics, zoo_dir, held_dir,
                          cfg.correlate.reference_seed if cfg.correlate else None)
        r.stage("dynamics", d, [dyn_dir / "persistence.parquet"],
                lambda: show("dynamics", run_dynamics(d, dyn_dir, say=say)))
        r.where["dynamics"] = str(dyn_dir)
    if cfg.report:
        from .report import build_report

        rep = cfg.report
        target = run_dir if cfg.correlate else out / "dynamics"
        if cfg.dynamics and cfg.correlate and rep.dynamics is None:
            rep = rep.model_copy(update={"dynamics": str(out / "dynamics")})
        r.stage("report", rep, [target / "report" / "index.html"],
                lambda: show("report", build_report(target, rep)))
        r.where["report"] = str(target / "report" / "index.html")
    return r.where


def zoo_models(zoo_dir: Path, seeds: list[int], step: int | None) -> list[str]:
    """Checkpoint folders of ``seeds`` at ``step`` (the last common step when None)."""
    from .zoo import zoo_checkpoints

    ck = zoo_checkpoints(zoo_dir)
    missing = [s for s in seeds if s not in ck]
    if missing:
        raise UnineuronsError(f"zoo {zoo_dir} has no seed(s) {missing}; train them first")
    if step is None:
        step = max(set.intersection(*(set(ck[s]) for s in seeds)))
    for s in seeds:
        if step not in ck[s]:
            raise UnineuronsError(f"zoo {zoo_dir}: seed {s} has no checkpoint at step {step}")
    return [str(ck[s][step]) for s in seeds]


def _correlate(cfg: PipelineConfig, zoo_dir: Path, held_dir: Path, run_dir: Path):
    from .correlate.config import CorrelateConfig
    from .correlate.engine import run_correlate

    c = cfg.correlate
    assert c is not None
    if c.family is not None:
        models = c.family_specs()
    elif cfg.zoo is None:
        raise UnineuronsError("config: [correlate] needs a [zoo] section or family = NAME")
    else:
        members = cfg.zoo.members()  # a seed grid's reference is its first member
        ref = c.reference_seed if c.reference_seed in members else members[0]
        seeds = [ref] + [s for s in members if s != ref]
        models = zoo_models(zoo_dir, seeds, c.step)
    cc = CorrelateConfig(models=models, tokens=c.tokens or str(held_dir),
                         n_tokens=c.n_tokens, pairs=c.pairs, threshold=c.threshold,
                         null_rotations=c.null_rotations, fdr=c.fdr, split_half=c.split_half,
                         similarity=c.similarity,
                         batch_size=c.batch_size, memory_budget=c.memory_budget, dtype=c.dtype)
    return run_correlate(cc, run_dir, resume=True)
