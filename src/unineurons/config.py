"""What every stage's config shares: validated field types and one way to report bad values.

Stage configs are frozen pydantic models (``extra="forbid"``); the CLI builds them from its
options with :func:`build`, so a bad value reads the same from every command::

    error: option --memory-budget: memory size '8 gigs' is not understood; write e.g. 8GB
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UnineuronsError

__all__ = ["Device", "check_device", "build", "describe_error", "Backend", "BACKEND_FIELDS",
           "without_backend", "check_numbers", "check_range", "MAX_INT", "OPTION_RANGES",
           "check_options", "check_model_ranges", "check_device_available", "field_bounds",
           "range_text", "option_ranges", "config_models", "model_field_bounds"]

T = TypeVar("T", bound=BaseModel)


def check_device(v: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:i`` (whether this machine has it is
    :func:`check_device_available`'s question: a plan may be made for another machine)."""
    if not (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
        raise ValueError(f"device must be cpu or cuda[:i], not {v!r}")
    return v


def check_device_available(v: str) -> str:
    """Raise ``ValueError`` unless this torch can use device ``v`` (cpu, cuda, cuda:i): checked
    before a command starts, not half-way through a run."""
    if v != "cpu":
        import torch

        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"device {v}: this torch ({torch.__version__}) is built without CUDA; "
                             "use --device cpu or install a CUDA build of torch")
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"device {v}: no GPU is visible (CUDA_VISIBLE_DEVICES, driver); use "
                             "--device cpu")
        if v.startswith("cuda:") and int(v[5:]) >= n:
            raise ValueError(f"device {v}: only {n} GPU(s) are visible (cuda:0..cuda:{n - 1})")
    return v


#: Largest integer an option may take: torch and numpy index with int64.
MAX_INT = 2**63 - 1
#: Bounds shared by the stage configs' fields (one name, one range, in every model).
MAX_WORKERS = 1 << 16  #: Ray workers
MAX_CPUS = 1 << 12  #: CPU cores per Ray worker
MAX_BATCH = 1 << 20  #: contexts per forward pass
MAX_CTX = 1 << 20  #: positions of a context
MAX_TOP_K = 1 << 16  #: kept matches / tokens per neuron
MAX_VOCAB = 1 << 24  #: token ids a store (uint32) and a tokenizer trainer can hold
MAX_SEED = 2**32 - 1  #: numpy and torch seeds are uint32
MAX_DRAWS = 1 << 16  #: random draws, rotations, bootstrap resamples per unit

#: A torch device string, validated on construction.
Device = Annotated[str, AfterValidator(check_device)]


class Backend(BaseModel):
    """Where a stage streams its tokens: the options every Ray-capable stage shares
    (correlate, analyze, dynamics); see :mod:`unineurons.sharding`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    backend: Literal["local", "ray"] = Field("local", description=(
        "local: stream in this process. ray: split the tokens into shards that Ray workers stream; "
        "the driver merges their states (needs pip install 'unineurons[ray]')."
    ))
    ray_address: str | None = Field(None, description=(
        "Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT. Unset: RAY_ADDRESS if set, else a "
        "local Ray instance on this machine."
    ))
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description=(
        "Ray workers (actors); each loads the models once and streams shards of the tokens."
    ))
    cpus_per_worker: int = Field(1, ge=1, le=MAX_CPUS, description=(
        "CPU cores each Ray worker reserves (its torch threads)."))

    @property
    def driver_device(self) -> str:
        """Where this process keeps its models and merged states: on Ray the workers hold the
        GPUs (one each), and the driver, which only loads, checks and merges, stays off them."""
        return "cpu" if self.backend == "ray" else getattr(self, "device", "cpu")

    @model_validator(mode="after")
    def _ray_options(self):
        if self.backend != "ray":
            given = [name for name, default in (("ray_address", None), ("workers", 1),
                                                ("cpus_per_worker", 1))
                     if getattr(self, name) != default]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with --backend ray")
        return self


#: The :class:`Backend` fields: where a stage runs, which never changes its numbers.
BACKEND_FIELDS = frozenset(Backend.model_fields)


def without_backend(d: Any) -> Any:
    """A config dump without the :data:`BACKEND_FIELDS` at any depth: what decides the numbers
    (a stage done on Ray is reused by a local rerun, and the other way round)."""
    if isinstance(d, dict):
        return {k: without_backend(v) for k, v in d.items() if k not in BACKEND_FIELDS}
    if isinstance(d, (list, tuple)):
        return [without_backend(v) for v in d]
    return d


#: pydantic's error types for a number outside a field's bounds.
_BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def field_bounds(info: Any) -> dict[str, float]:
    """The bounds of a pydantic field (or of its list / tuple items) as ``{"ge"|"gt"|"le"|"lt":
    value}``: what ``Field(ge=..., le=...)`` or ``Annotated[int, Field(...)]`` declared."""
    out: dict[str, float] = {}
    for m in getattr(info, "metadata", ()) or ():
        for k in ("ge", "gt", "le", "lt"):
            if getattr(m, k, None) is not None:
                out[k] = getattr(m, k)
    if not out:  # list[Annotated[int, Field(...)]] and the like: the items' bounds
        for arg in typing.get_args(getattr(info, "annotation", None)):
            for a in (arg, *typing.get_args(arg)):
                for m in getattr(a, "__metadata__", ()):
                    out.update(field_bounds(m) if hasattr(m, "metadata") else {
                        k: getattr(m, k) for k in ("ge", "gt", "le", "lt")
                        if getattr(m, k, None) is not None})
    return out


def range_text(bounds: dict[str, float]) -> str:
    """``">= 1 and <= 1048576"``: a field's range in words (see :func:`field_bounds`)."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{ops[k]} {bounds[k]}" for k in ("ge", "gt", "le", "lt") if k in bounds)


def _field_at(model: type[BaseModel] | None, loc: tuple) -> Any:
    """The FieldInfo at pydantic error location ``loc`` in ``model`` (nested models followed)."""
    info = None
    for part in loc:
        if isinstance(part, int) or model is None:
            continue  # a list index: the item has the list field's bounds
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        sub = [a for a in (info.annotation, *typing.get_args(info.annotation))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        model = sub[0] if sub else None
    return info


def describe_error(e: ValidationError, option_style: bool = True,
                   model: type[BaseModel] | None = None) -> str:
    """The first problem of a pydantic error as ``option --name: message`` (or ``key 'a.b'``);
    a number outside its field's bounds reads ``5 is out of range; it must be >= -1 and <= 1``
    (the whole range, found in ``model``'s fields)."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
    msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
    given = err.get("input")
    bounds = field_bounds(_field_at(model, err["loc"])) if err["type"] in _BOUND_ERRORS else {}
    if bounds:
        msg = f"{given!r} is out of range; it must be {range_text(bounds)}"
    elif err["type"] != "value_error" and isinstance(given, (int, float, str)) and not isinstance(
            given, bool) and len(str(given)) <= 80:
        msg = f"{msg} (got {given!r})"
    if option_style:
        name = OPTION_NAMES.get(f"{getattr(model, '__name__', '')}.{loc}", OPTION_NAMES.get(loc, loc))
        return f"option --{name.replace('_', '-')}: {msg}" if loc else msg
    return f"key {loc!r}: {msg}"


#: config fields whose command-line option has another name (``Class.field`` or ``field``)
OPTION_NAMES = {"models": "model", "InterveneConfig.neurons": "neuron"}


def _bad_number(v: Any) -> str | None:
    """Why ``v`` (or a number inside a list / dict) means nothing, or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} is not a finite number"
    if isinstance(v, int) and abs(v) > MAX_INT:
        return f"{v} is too large (at most {MAX_INT})"
    if isinstance(v, (list, tuple)):
        return next((r for r in map(_bad_number, v) if r), None)
    if isinstance(v, dict):
        return next((r for r in map(_bad_number, v.values()) if r), None)
    return None


def check_numbers(**options: Any) -> None:
    """Refuse NaN, infinite and out-of-int64 values among ``options`` (keyword = option name)."""
    for name, v in options.items():
        why = _bad_number(v)
        if why:
            raise UnineuronsError(f"option --{name.replace('_', '-')}: {why}")


def check_range(name: str, value: float | int | None, *, ge: float | None = None,
                gt: float | None = None, le: float | None = None) -> None:
    """Refuse an option outside its range, naming the range (None passes: unset)."""
    if value is None:
        return
    check_numbers(**{name: value})
    lo = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else None
    bad = (ge is not None and value < ge) or (gt is not None and value <= gt) or \
        (le is not None and value > le)
    if bad:
        rng = " and ".join(r for r in (lo, f"<= {le}" if le is not None else None) if r)
        raise UnineuronsError(f"option --{name.replace('_', '-')}: {value} is out of range; it "
                              f"must be {rng}")


#: The range of the numeric command-line options that are no field of a stage config model
#: (``tokens build``, ``tokenizer train``, ``plan``), by option name: ``(low, high)``, ``low``
#: inclusive (None: unbounded). Every other option's range is its config field's
#: (``Field(ge=..., le=...)``, see :func:`option_ranges`). Integer options in neither must be
#: >= 0; every number must be finite and fit int64. The CLI checks these before a command does
#: anything.
OPTION_RANGES: dict[str, tuple[float | None, float | None]] = {
    "ctx": (2, MAX_CTX), "n_tokens": (1, None), "max_chars": (1, None),
    "ablate_n_tokens": (1, None),
    # a vocabulary the token store (uint32 ids) and any tokenizer trainer can hold: 256 bytes
    # and 3 special tokens up to 16.7M tokens (the largest LM vocabularies are ~256k)
    "vocab_size": (259, MAX_VOCAB),
    "heldout_fraction": (0.0, 0.9), "flops_per_s": (1.0, None),
}


def config_models() -> list[type]:
    """Every stage config class (pydantic models, and the zoo's :class:`ZooConfig`): the
    source of the option ranges."""
    from .analyses.ablate import AblateConfig
    from .analyses.analyze import AnalyzeConfig
    from .analyses.dynamics import DynamicsConfig
    from .analyses.interventions import InterveneConfig
    from .analyses.roles import RoleConfig
    from .correlate.config import CorrelateConfig
    from .pipeline import CorrelateStage, PipelineConfig, TokenizerStage, TokensStage, ZooStage
    from .report.build import ReportConfig
    from .zoo.config import ZooConfig

    return [CorrelateConfig, AnalyzeConfig, AblateConfig, InterveneConfig, DynamicsConfig,
            RoleConfig, ReportConfig, PipelineConfig, TokenizerStage, TokensStage, ZooStage,
            CorrelateStage, ZooConfig]


def model_field_bounds(cls: type) -> dict[str, dict[str, float]]:
    """``{field: bounds}`` of a config class's numeric scalar fields (list fields, given as text on
    the command line, are left out) (see :func:`field_bounds`;
    a :class:`ZooConfig`-like dataclass declares them in its ``BOUNDS``)."""
    if hasattr(cls, "BOUNDS"):
        return dict(cls.BOUNDS)
    return {n: b for n, f in cls.model_fields.items()
            if typing.get_origin(f.annotation) not in (list, tuple) and (b := field_bounds(f))
            and not any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(f.annotation))}


@functools.cache
def option_ranges() -> dict[str, dict[str, float]]:
    """The bounds of every numeric option, by name: a config field's (the same name has the
    same range in every config, :mod:`tests.test_config_ranges` checks it), else
    :data:`OPTION_RANGES`."""
    out: dict[str, dict[str, float]] = {}
    for cls in config_models():
        for name, b in model_field_bounds(cls).items():
            out.setdefault(name, b)
    for name, (lo, hi) in OPTION_RANGES.items():
        out[name] = {k: v for k, v in (("ge", lo), ("le", hi)) if v is not None}
    return out


def check_options(options: dict[str, Any], device_here: bool = True) -> None:
    """Check a command's option values against :data:`OPTION_RANGES` (by name) and the rules
    for every number, and (``device_here``) that ``device`` exists on this machine; raise
    :class:`UnineuronsError` naming the option and its range."""
    check_numbers(**options)
    if options.get("backend") == "ray":  # before anything is made, not when the stage starts
        from .sharding import require_ray

        require_ray()
    dev = options.get("device")
    if device_here and isinstance(dev, str):
        try:
            check_device_available(check_device(dev))
        except ValueError as e:
            raise UnineuronsError(f"option --device: {e}") from None
    numeric = {k: v for k, v in options.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # the config models (and torch with them) are imported only for options they hold
    ranges = option_ranges() if set(numeric) - set(OPTION_RANGES) else {
        k: {q: x for q, x in (("ge", lo), ("le", hi)) if x is not None}
        for k, (lo, hi) in OPTION_RANGES.items()}
    for name, v in numeric.items():
        b = ranges.get(name, {"ge": 0} if isinstance(v, int) else {})
        bad = ("ge" in b and v < b["ge"]) or ("gt" in b and v <= b["gt"]) or \
            ("le" in b and v > b["le"]) or ("lt" in b and v >= b["lt"])
        if bad:
            raise UnineuronsError(f"option --{name.replace('_', '-')}: {v} is out of range; it "
                                  f"must be {range_text(b)}")


def check_model_ranges(model: BaseModel, where: str = "config", prefix: str = "") -> None:
    """What a (nested) config model cannot check on construction: that its ``device`` exists
    on this machine and Ray is installed for ``backend = "ray"`` (the ranges are the model's own
    field bounds); raises ``UnineuronsError("{where}: key 'a.b': ...")``."""
    for name in type(model).model_fields:
        v = getattr(model, name)
        key = f"{prefix}{name}"
        if name == "backend" and v == "ray":
            from .sharding import require_ray

            require_ray()
        if name == "device" and isinstance(v, str):
            try:
                check_device_available(v)
            except ValueError as e:
                raise UnineuronsError(f"{where}: key {key!r}: {e}") from None
        if isinstance(v, BaseModel):
            check_model_ranges(v, where, f"{key}.")


def build(cls: type[T], **kwargs: Any) -> T:
    """``cls(**kwargs)``, with a validation failure turned into one clear user error.

    NaN, infinite and out-of-int64 numbers are refused for every option (by name) first.
    """
    check_numbers(**kwargs)
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise UnineuronsError(describe_error(e, model=cls)) from None
