"""What every stage's config shares: validated field types and one way to report bad values.

Stage configs are frozen pydantic models (``extra="forbid"``); the CLI builds them from its
options with :func:`build`, so a bad value reads the same from every command::

    error: option --memory-budget: memory size '8 gigs' is not understood; write e.g. 8GB
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UnineuronsError

__all__ = ["Device", "check_device", "build", "describe_error", "Backend", "BACKEND_FIELDS",
           "without_backend"]

T = TypeVar("T", bound=BaseModel)


def check_device(v: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:i``."""
    if not (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
        raise ValueError(f"device must be cpu or cuda[:i], not {v!r}")
    return v


#: A torch device string, validated on construction.
Device = Annotated[str, AfterValidator(check_device)]


class Backend(BaseModel):
    """Where a stage streams its tokens: the options every Ray-capable stage shares
    (correlate, analyze, dynamics); see :mod:`unineurons.sharding`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    if option_style:
        return f"option --{loc.replace('_', '-')}: {msg}" if loc else msg
    return f"key {loc!r}: {msg}"


def build(cls: type[T], **kwargs: Any) -> T:
    """``cls(**kwargs)``, with a validation failure turned into one clear user error."""
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise UnineuronsError(describe_error(e)) from None
