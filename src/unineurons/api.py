"""The public API: one function per command, taking the command's options as keyword arguments.

Each function builds the same validated config object the command builds (the CLI's option
``--memory-budget`` is the keyword ``memory_budget``; a ``--no-x`` / ``--keep-x`` flag is the
config field it sets, e.g. ``drop_newline=False`` for ``--keep-newline``), calls the same engine
function, and returns a result object: a :class:`~unineurons.run.Run` for the stages that write
a run directory (the engine's own result in ``run.result``). Instead of keywords, pass the
config object (``config=CorrelateConfig(...)``); keywords given with it override its fields.
Option names, defaults and meanings: the config classes named below (``help(Class)``), or the
command's ``--help``. Every user error is a :class:`~unineurons.errors.UnineuronsError`.

Nothing heavy is imported until a function runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UnineuronsError
from .run import Run, Zoo

if TYPE_CHECKING:
    from .correlate.estimate import Estimate
    from .report.build import ReportResult
    from .tokens import TokenStore

__all__ = ["correlate", "analyze", "ablate", "intervene", "dynamics", "report", "train_zoo",
           "build_tokens", "train_tokenizer", "plan", "open_run"]

T = TypeVar("T")
PathLike = str | os.PathLike


def _plain(v: Any) -> Any:
    """Paths as strings (config fields hold str), inside lists and tuples too."""
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def _config(cls: type[T], config: Any, options: dict[str, Any]) -> T:
    """``cls`` from ``config`` (an instance) with ``options`` overriding its fields, or from
    ``options`` alone; validated as the CLI validates (one clear error)."""
    from .config import build

    options = {k: _plain(v) for k, v in options.items()}
    if config is None:
        return build(cls, **options)
    if not isinstance(config, cls):
        raise UnineuronsError(f"config must be of type {cls.__name__}, not {type(config).__name__}")
    if not options:
        return config
    return build(cls, **{**config.model_dump(), **options})


def _run_path(run: Run | PathLike) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _listed(v: Any) -> Any:
    """A single spec or address as a one-item list."""
    return [_plain(v)] if isinstance(v, (str, os.PathLike)) else v


_FAMILY_KEYS = ("family", "seeds", "step", "families_file")


def _family(options: dict[str, Any], models: Any, required: bool = False) -> Any:
    """``models`` followed by the members of ``family=`` (``seeds=``, ``step=``,
    ``families_file=``, as the commands' ``--family`` options; removed from ``options``)."""
    fam = {k: options.pop(k) for k in _FAMILY_KEYS if k in options}
    if not fam and not required:
        return models
    from .cli.families import family_models

    seeds = fam.get("seeds")
    if seeds is not None and not isinstance(seeds, str):
        seeds = ",".join(str(int(x)) for x in seeds)
    files = [Path(_plain(f)) for f in _listed(fam.get("families_file")) or []]
    listed = None if models is None else [_plain(m) for m in _listed(models)]
    return family_models(listed, fam.get("family"), seeds, fam.get("step"), files,
                         required=required)


def _weights_rule(options: dict[str, Any]) -> Any:
    """``safetensors_only=True`` (the commands' ``--safetensors-only``): a context in which
    every model load refuses ``.bin`` weights."""
    from contextlib import nullcontext

    if not options.pop("safetensors_only", False):
        return nullcontext()
    from .models.checkpoint import strict_weights

    return strict_weights(True)


def open_run(path: PathLike | Run) -> Run:
    """Open a run directory: its tables as lazily read DataFrames, its neurons as cards.

    Args:
        path: the run directory (of ``correlate``, ``analyze --out``, ``dynamics``, ...).

    Returns:
        A :class:`~unineurons.run.Run`.

    Raises:
        UnineuronsError: not a unineurons run directory, or one of another format version.
    """
    return Run(path)


def correlate(models: Sequence[PathLike] | None = None, tokens: PathLike | None = None,
              out: PathLike | None = None, *, resume: bool = False, config: Any = None,
              **options: Any) -> Run:
    """``unineurons correlate``: Pearson ρ between every neuron of the reference model and
    every neuron of each other seed, the random-rotation baseline and universal neurons
    (Gurnee et al. 2024, sec. 3: excess correlation ϱ_i = mean_m max_j ρ − mean_m max_j ρ̄;
    universal if ϱ_i > ``threshold``).

    Args:
        models: model specs (a folder, or ``HUB_ID[@REVISION]``); the first is the reference.
            At least two.
        tokens: token store folder (``build_tokens``); use a held-out split.
        out: the run directory to write (new, empty, or this same run to reuse / resume).
        resume: continue an interrupted run in ``out`` from its last checkpoint.
        config: a :class:`~unineurons.correlate.config.CorrelateConfig` instead of keywords.
        **options: other CorrelateConfig fields: ``n_tokens`` (tokens used, rounded up to whole
            contexts; default all), ``pairs`` ("reference" | "all"), ``threshold`` (0.5),
            ``batch_size`` (contexts per forward pass, 8), ``device`` ("cpu"), ``dtype``
            ("float32"), ``memory_budget`` ("8GB"), ``seed`` (rotation seed, 0),
            ``drop_newline`` (True), ``backend`` ("local" | "ray"), ...; and as the command's
            options: ``family`` (a seed family by name, its members after ``models``),
            ``seeds`` (its members, e.g. "0-9" or [21, 49]), ``step`` (the checkpoint),
            ``families_file``, ``safetensors_only`` (refuse ``.bin`` weights).

    Returns:
        The :class:`~unineurons.run.Run` of ``out``; ``run.result`` is the engine's
        ``CorrelateResult`` (plan, elapsed time, whether the run was reused). Tables:
        ``neurons`` (one row per model × layer × neuron), ``matches`` (one row per neuron ×
        partner), ``layers`` (per model × layer).

    Raises:
        UnineuronsError: bad options, models that do not load or disagree on the tokenizer,
            a token store that does not match, an ``out`` holding something else.
    """
    from .correlate.config import CorrelateConfig
    from .correlate.engine import run_correlate

    weights = _weights_rule(options)
    if config is None or models is not None or "family" in options:
        models = _family(options, models, required=config is None)
    given = {k: v for k, v in (("models", models), ("tokens", tokens)) if v is not None}
    cfg = _config(CorrelateConfig, config, {**given, **options})
    if out is None:
        raise UnineuronsError("correlate needs out: the run directory to write")
    with weights:
        res = run_correlate(cfg, out, resume=resume)
    return Run(out, result=res)


def analyze(run: Run | PathLike | None = None, *, models: Sequence[PathLike] | None = None,
            out: PathLike | None = None, resume: bool = False, config: Any = None,
            **options: Any) -> Run:
    """``unineurons analyze``: per-neuron statistics (activation moments and frequency), top
    activating contexts, neuron families, weight and vocabulary statistics, functional roles and
    the properties that set universal neurons apart (Gurnee et al. 2024, sec. 4 and 5).

    Args:
        run: a run directory (or Run) of ``correlate``: analyze its models on its tokens.
        models: with ``run``, only these of its models; without, models to analyze on their own
            (needs ``tokens=`` and ``out``).
        out: without ``run``: the run directory to write.
        resume: continue an interrupted token pass from its last checkpoint.
        config: an :class:`~unineurons.analyses.analyze.AnalyzeConfig` instead of keywords.
        **options: other AnalyzeConfig fields: ``tokens`` (default the run's store),
            ``n_tokens`` (default the run's count), ``neurons`` ("auto" | "universal" | "all" |
            a file of addresses), ``top_k`` (10 contexts per neuron), ``window_before`` (24) /
            ``window_after`` (8) tokens, ``vocab_k`` (20), ``batch_size`` (8), ``device``,
            ``roles`` (a RoleConfig or dict of its fields), ...; ``family`` / ``seeds`` /
            ``step`` / ``families_file`` / ``safetensors_only`` as for :func:`correlate`.

    Returns:
        The :class:`~unineurons.run.Run` written; ``run.result`` is the ``AnalyzeResult``
        (counts per family and role, properties, notes). Adds columns to ``neurons`` and the
        tables ``top_contexts``, ``families``, ``vocab``, ``properties`` (with universality),
        ``entropy``, ``attention``.

    Raises:
        UnineuronsError: neither or both of ``run`` and ``out``, bad options, models or token
            store that do not load or changed since the run was made.
    """
    from .analyses.analyze import AnalyzeConfig, analyze_models, analyze_run

    weights = _weights_rule(options)
    models = _family(options, _listed(models))
    if run is None and not models:
        raise UnineuronsError("analyze needs a run directory, or models=[...] with tokens= "
                              "and out= for models on their own")
    if run is not None and out is not None:
        raise UnineuronsError("analyze writes into the run itself; drop out= (it is for models "
                              "without a run)")
    if run is None and out is None:
        raise UnineuronsError("analyze of models on their own needs out=: the run directory "
                              "to write")
    cfg = _config(AnalyzeConfig, config, options)
    with weights:
        if run is not None:
            path = _run_path(run)
            res = analyze_run(path, cfg, models=models or None, resume=resume)
        else:
            path = Path(out)  # type: ignore[arg-type]
            res = analyze_models(models, path, cfg, resume=resume)
    return Run(path, result=res)


def ablate(run: Run | PathLike, *, config: Any = None, **options: Any) -> Run:
    """``unineurons ablate``: group ablations of universal vs non-universal vs layer-matched
    random neurons; loss increase, KL, entropy and efficiency (loss increase per ablated
    neuron), per model and optionally per layer (Nandan et al. 2025; per layer: their Fig. 5).

    Args:
        run: the run directory (or Run) with universality (``correlate``).
        config: an :class:`~unineurons.analyses.ablate.AblateConfig` instead of keywords.
        **options: AblateConfig fields: ``models`` (default all of the run), ``sets``
            (["universal", "non-universal", "random"]), ``method`` ("zero" | "mean" |
            "value:X"), ``sizes`` (1, 2, 4, ... 16384 and "all"), ``per_layer`` (False),
            ``random_draws`` (5), ``rank_all`` (False), ``tokens``, ``n_tokens``, ``seed``,
            ``batch_size``, ``device``, ``backend``, ...; ``family`` / ``seeds`` / ``step`` /
            ``families_file`` / ``safetensors_only`` as for :func:`correlate`.

    Returns:
        The :class:`~unineurons.run.Run`; ``run.ablations`` holds every model's rows (losses
        in nats), ``run.result`` the rows this call wrote.

    Raises:
        UnineuronsError: bad options, a run without universality, models or tokens that do
            not load or changed.
    """
    from .analyses.ablate import AblateConfig, run_ablations
    from .rundir import RunDir

    weights = _weights_rule(options)
    models = _family(options, options.pop("models", None))
    if models is not None:
        options["models"] = models
    cfg = _config(AblateConfig, config, options)
    path = _run_path(run)
    with weights:
        df = run_ablations(RunDir.open(path), cfg)
    return Run(path, result=df)


def intervene(run: Run | PathLike, neurons: str | Sequence[str] | None = None, *,
              config: Any = None, **options: Any) -> Run:
    """``unineurons intervene``: fix single neurons at several activation values on every
    position; loss, entropy, true-token rank and the final norm's scale, against random
    last-layer neurons given the same interventions (Gurnee et al. 2024, sec. 5).

    Args:
        run: the run directory (or Run).
        neurons: addresses ``L{layer}.N{index}`` (one string or a list).
        config: an :class:`~unineurons.analyses.interventions.InterveneConfig` instead.
        **options: InterveneConfig fields: ``model`` (default the reference), ``values``
            ([-1, 0, 1, 2, 4, 6]), ``random_baseline`` (5 neurons), ``tokens``, ``n_tokens``,
            ``seed``, ``batch_size``, ``device``; ``safetensors_only`` (refuse ``.bin``).

    Returns:
        The :class:`~unineurons.run.Run`; ``run.interventions`` holds every model's rows,
        ``run.result`` the rows this call wrote (metrics in nats).

    Raises:
        UnineuronsError: no or bad addresses, bad values, an unknown model.
    """
    from .analyses.interventions import InterveneConfig, run_interventions
    from .rundir import RunDir

    if neurons is not None:
        options["neurons"] = _listed(neurons)
    weights = _weights_rule(options)
    cfg = _config(InterveneConfig, config, options)
    path = _run_path(run)
    with weights:
        df = run_interventions(RunDir.open(path), cfg)
    return Run(path, result=df)


def dynamics(out: PathLike, *, config: Any = None, say: Callable[[str], None] | None = None,
             **options: Any) -> Run:
    """``unineurons dynamics``: universal neurons at every checkpoint step of a seed family:
    emergence per layer, persistence P(t → t'), per-neuron trajectories and, with ``ablate``,
    group ablations per step (Nandan et al. 2025: emergence Fig. 1, ablations Fig. 3-4).

    Args:
        out: the run directory to write (one sub run per step in ``out/steps/step{t}``).
        config: a :class:`~unineurons.analyses.dynamics.DynamicsConfig` instead of keywords.
        say: called with one line per step (e.g. ``print``); silent when None.
        **options: DynamicsConfig fields: ``zoo`` (a zoo folder or :class:`Zoo`) or
            ``model_template`` + ``names``, ``seeds``, ``reference_seed``, ``steps``,
            ``tokens`` (required), ``n_tokens``, ``universal`` ("threshold" | "top:S"),
            ``threshold``, ``ablate`` (True: the CLI's ``--ablate`` with its defaults, sizes
            1, 4, 16, 64, all and 3 draws; or an AblateConfig or a dict of its fields), ...;
            ``safetensors_only`` (refuse ``.bin`` weights).

    Returns:
        The :class:`~unineurons.run.Run` of ``out`` (``run.emergence``, ``run.persistence``,
        ``run.first_universal``, ``run.trajectories``; ``run.step(t)`` opens a step's run);
        ``run.result`` is the ``DynamicsResult``.

    Raises:
        UnineuronsError: bad options, missing checkpoints, models or tokens that do not load.
    """
    from .analyses.dynamics import DynamicsConfig, run_dynamics

    if isinstance(options.get("zoo"), Zoo):
        options["zoo"] = options["zoo"].path
    if options.get("ablate") is True:  # the CLI's --ablate and its --ablate-* defaults
        from .analyses.ablate import AblateConfig

        options["ablate"] = AblateConfig(sizes=[1, 4, 16, 64, "all"], random_draws=3,
                                         batch_size=options.get("batch_size", 8),
                                         device=options.get("device", "cpu"))
    elif options.get("ablate") is False:
        options["ablate"] = None
    weights = _weights_rule(options)
    cfg = _config(DynamicsConfig, config, options)
    with weights:
        res = run_dynamics(cfg, out, say=say)
    return Run(out, result=res)


def report(run: Run | PathLike, *, config: Any = None, **options: Any) -> ReportResult:
    """``unineurons report``: the figures of both papers (``RUN/figures``) and an offline HTML
    report with a neuron browser (``RUN/report/index.html``), from the run's tables.

    Args:
        run: the run directory (or Run).
        config: a :class:`~unineurons.report.build.ReportConfig` instead of keywords.
        **options: ReportConfig fields: ``figures`` (True), ``browser`` (True), ``models``
            (load models for the vocabulary histogram and window shading, True), ``formats``
            (("png", "svg")), ``dpi`` (150), ``max_context_neurons`` (2000), ``vocab_k`` (10),
            ``vocab_neuron``, ``batch_size``, ``device``, ``dynamics`` (a dynamics run dir).

    Returns:
        The ``ReportResult``: ``index`` (the page's path), ``figures`` drawn, ``skipped``
        figures with the reason, ``notes``.

    Raises:
        UnineuronsError: bad options, not a run directory.
    """
    from .report.build import ReportConfig, build_report

    if "formats" in options:
        options["formats"] = tuple(_listed(options["formats"]))
    cfg = _config(ReportConfig, config, options)
    return build_report(_run_path(run), cfg)


def train_zoo(tokens: PathLike, out: PathLike, *, preset: str = "tiny",
              seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int | None = None,
              checkpoints: Sequence[int] | None = None, heldout: PathLike | None = None,
              workers: int | None = None, **overrides: Any) -> Zoo:
    """``unineurons zoo train``: one GPT-2 per seed on the same tokens; each seed sets both the
    initial weights and the data order. Rerunning the same call resumes bit for bit.

    Args:
        tokens: training token store folder; its tokenizer sets the vocabulary.
        out: the zoo folder (new, empty, or a zoo of the same settings to resume / extend).
        preset: "micro" (tests), "tiny" (demo) or "small" (research): shape and defaults.
        seeds: distinct seeds.
        steps: optimizer steps per seed (default the preset's).
        checkpoints: steps to save (the last is always saved; default 1/8, 1/4, 1/2, 1).
        heldout: held-out token store for the held-out loss.
        workers: seeds trained at once, one process each (default min(seeds, CPUs)).
        **overrides: ``ZooConfig`` fields: ``lr``, ``batch_size``, ``ctx``, ``eval_every``, ...

    Returns:
        The :class:`Zoo` (``zoo.models(step)`` lists checkpoint folders for ``correlate``).

    Raises:
        UnineuronsError: bad settings (before anything is written), or an ``out`` holding a
            zoo of other settings.
    """
    from .zoo import train_zoo as _train

    path = _train(_plain(tokens), _plain(out), preset=preset, seeds=list(seeds), steps=steps,
                  checkpoints=None if checkpoints is None else list(checkpoints),
                  heldout=_plain(heldout), workers=workers, **overrides)
    return Zoo(Path(path))


def build_tokens(source: str, tokenizer: PathLike, out: PathLike, *, n_tokens: int,
                 ctx: int = 512, split: str = "train", seed: int = 0,
                 heldout_fraction: float = 0.1) -> TokenStore:
    """``unineurons tokens build``: ``ceil(n_tokens / ctx)`` contexts of BOS + ctx-1 tokens of
    one corpus split, documents joined by EOS, in a seeded, deterministic order.

    Args:
        source: a text file or folder, ``jsonl:PATH``, ``hf:NAME[:SPLIT]`` or ``stdlib``.
        tokenizer: tokenizer folder or hub id.
        out: the store folder (new, empty, or a token store, which is replaced).
        n_tokens: tokens to store (rounded up to whole contexts; fewer if the split runs out).
        ctx: context length in tokens.
        split: "train" or "heldout"; the two never share a document.
        seed: seed of the document order.
        heldout_fraction: share of documents (by text hash) in the heldout split.

    Returns:
        The :class:`~unineurons.tokens.TokenStore` (``tokens`` is ``[n_contexts, ctx]``).

    Raises:
        UnineuronsError: bad sizes or split, a missing tokenizer, an empty corpus split.
    """
    from .tokens import build_token_store

    return build_token_store(source, _plain(tokenizer), ctx, n_tokens, _plain(out), split=split,
                             seed=seed, heldout_fraction=heldout_fraction)


def train_tokenizer(source: str, vocab_size: int, out: PathLike, *, max_chars: int = 20_000_000,
                    heldout_fraction: float = 0.1) -> Path:
    """``unineurons tokenizer train``: byte-level BPE with BOS, EOS and pad tokens, trained on
    the train split only (a heldout store at the same fraction holds unseen text).

    Args:
        source: corpus, as for :func:`build_tokens`.
        vocab_size: tokens, special tokens included (at least 259).
        out: the tokenizer folder (``AutoTokenizer.from_pretrained`` loads it).
        max_chars: train on at most this many characters.
        heldout_fraction: the heldout split to leave out.

    Returns:
        ``out`` as a Path.

    Raises:
        UnineuronsError: a vocabulary below 259, an ``out`` holding something else.
    """
    from .tokenizer import train_tokenizer as _train

    return Path(_train(source, vocab_size, _plain(out), max_chars=max_chars,
                       heldout_fraction=heldout_fraction))


def plan(models: Sequence[PathLike] | None = None, *, n_tokens: int = 100_000_000, ctx: int = 512,
         memory_budget: str = "80GB", flops_per_s: float | None = None, workers: int = 1,
         **options: Any) -> Estimate:
    """``unineurons plan``: memory, passes, FLOPs and time of a correlate run, from the model
    configs alone (no weights are read).

    Args:
        models: model specs, as for :func:`correlate`.
        n_tokens: tokens the run would stream.
        ctx: context length of the token store.
        memory_budget: memory of the device (or host) the run gets, e.g. "24GB".
        flops_per_s: matmul rate for the time (default: a float32 GEMM measured here, ~1 s).
        workers: machines sharing the tokens.
        **options: other CorrelateConfig fields that change the plan: ``pairs``, ``dtype``,
            ``device``, ``batch_size``, ``accumulate_tokens``, ``ceiling``; ``family`` /
            ``seeds`` / ``step`` / ``families_file`` as for :func:`correlate`.

    Returns:
        The ``Estimate``: ``plan`` (passes, ``peak_bytes``), ``flops`` per token,
        ``total_flops``, ``seconds``.

    Raises:
        UnineuronsError: bad options, no models, an unknown family / seed / step, a model
            config that does not load.
    """
    from .correlate.config import CorrelateConfig
    from .correlate.estimate import estimate

    models = _family(options, models, required=True)
    cfg = _config(CorrelateConfig, None, {"models": list(models), "tokens": "-",
                                          "memory_budget": memory_budget, **options})
    return estimate(cfg, n_tokens, ctx, rate=flops_per_s, workers=workers)
