"""What every stage's config shares: validated field types and one way to report bad values.

Stage configs are frozen pydantic models (``extra="forbid"``); the CLI builds them from its
options with :func:`build`, so a bad value reads the same from every command::

    error: option --memory-budget: memory size '8 gigs' is not understood; write e.g. 8GB
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UnineuronsError

__all__ = ["Device", "check_device", "build", "describe_error", "Backend", "BACKEND_FIELDS",
           "without_backend", "check_numbers", "check_range", "MAX_INT", "OPTION_RANGES",
           "check_options", "check_model_ranges", "check_device_available"]

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
    workers: int = Field(1, ge=1, description=(
        "Ray workers (actors); each loads the models once and streams shards of the tokens."
    ))
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores each Ray worker reserves (its torch threads).")

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


def describe_error(e: ValidationError, option_style: bool = True) -> str:
    """The first problem of a pydantic error as ``option --name: message`` (or ``key 'a.b'``)."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else str(err["msg"]).removeprefix("Value error, ")
    given = err.get("input")
    if err["type"] != "value_error" and isinstance(given, (int, float, str)) and not isinstance(
            given, bool) and len(str(given)) <= 80:
        msg = f"{msg} (got {given!r})"
    if option_style:
        return f"option --{loc.replace('_', '-')}: {msg}" if loc else msg
    return f"key {loc!r}: {msg}"


#: Largest integer an option may take: torch and numpy index with int64.
MAX_INT = 2**63 - 1


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


#: The range of every numeric command-line option, by option name: ``(low, high)`` with
#: ``low`` inclusive (None: unbounded). Integer options not listed must be >= 0; every number
#: must be finite and fit int64. The CLI checks these before a command does anything.
OPTION_RANGES: dict[str, tuple[float | None, float | None]] = {
    "batch_size": (1, 1 << 20), "workers": (1, 1 << 16), "cpus_per_worker": (1, 1 << 12),
    "ctx": (2, 1 << 20), "n_tokens": (1, None), "top_k": (1, 1 << 16),
    "checkpoint_tokens": (1, None), "accumulate_tokens": (1, 1 << 30), "max_chars": (1, None),
    "steps": (1, None), "eval_every": (1, None), "dpi": (10, 2400), "max_neurons": (1, None),
    "vocab_k": (1, 1 << 16), "n_ranked": (1, 1 << 10), "ablate_n_tokens": (1, None),
    "seed": (0, 2**32 - 1), "reference_seed": (0, 2**32 - 1),
    # a vocabulary the token store (uint32 ids) and any tokenizer trainer can hold: 256 bytes
    # and 3 special tokens up to 16.7M tokens (the largest LM vocabularies are ~256k)
    "vocab_size": (259, 1 << 24),
    "heldout_fraction": (0.0, 0.9), "threshold": (-1.0, 1.0), "vr_threshold": (0.0, 1.0),
    "position_threshold": (0.0, 1.0), "lr": (1e-12, 1.0), "flops_per_s": (1.0, None),
}


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
    for name, v in options.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        lo, hi = OPTION_RANGES.get(name, (0, None) if isinstance(v, int) else (None, None))
        check_range(name, v, ge=lo, le=hi)


def check_model_ranges(model: BaseModel, where: str = "config", prefix: str = "") -> None:
    """Apply :data:`OPTION_RANGES` to the fields of a (nested) config model by field name, so a
    TOML config is held to the ranges of the command-line options it stands for; raises
    ``UnineuronsError("{where}: key 'a.b': ...")``."""
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
            continue
        values = v if isinstance(v, (list, tuple)) else [v]
        for x in values:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            lo, hi = OPTION_RANGES.get(name, (0, None) if isinstance(x, int) else (None, None))
            try:
                check_range(name, x, ge=lo, le=hi)
            except UnineuronsError as e:
                raise UnineuronsError(f"{where}: key {key!r}: " + str(e).split(": ", 1)[1]) from None


def build(cls: type[T], **kwargs: Any) -> T:
    """``cls(**kwargs)``, with a validation failure turned into one clear user error.

    NaN, infinite and out-of-int64 numbers are refused for every option (by name) first.
    """
    check_numbers(**kwargs)
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise UnineuronsError(describe_error(e)) from None
