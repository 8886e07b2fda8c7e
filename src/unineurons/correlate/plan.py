"""The memory planner: which co-moment blocks are accumulated in which pass over the tokens.

A *unit* is one float64 co-moment block: rows = a range of whole layers of model a, columns =
every neuron of model b. The planner splits pairs into layer ranges only when a whole pair
does not fit, then packs units into passes (first fit, largest first). Every pass streams the
same tokens; memory is the planned accumulators plus O(batch), never O(tokens).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import UnineuronsError

__all__ = ["ModelShape", "Unit", "Plan", "plan_units", "stream_bytes", "parse_bytes", "fmt_bytes",
           "flops_per_token"]

F64 = 8


def parse_bytes(text: str | int) -> int:
    """``"8GB"``, ``"512MiB"``, ``"1.5G"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise UnineuronsError(f"memory size {text!r} is not understood; write e.g. 8GB or 512MiB")
    num, unit, ib = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if ib.startswith("i") else 1000
    return int(num * base ** " kmgt".index(unit or " "))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_mlp: int
    n_params: int = 0  #: parameter count (weights memory and forward FLOPs); 0 if unknown

    @property
    def n(self) -> int:
        return self.n_layers * self.d_mlp


def stream_bytes(shapes: list[ModelShape], buffered_tokens: int, compute_bytes: int = 4,
                 weight_bytes: int = 4) -> int:
    """Memory that scales with the batch, not the tokens: per model its weights, the buffered
    float32 activations ``[buffered, L*d]`` and their shifted copy in the compute dtype."""
    return sum(buffered_tokens * s.n * (4 + compute_bytes) + s.n_params * weight_bytes
               for s in shapes)


@dataclass(frozen=True)
class Unit:
    """One co-moment block: layers ``[l0, l1)`` of model ``a`` against all of model ``b``.

    ``kind`` is ``pair`` (a != b) or ``ceiling`` (a against itself, for the rotated-self
    ceiling). ``rows_dir``: results for a's neurons; ``cols_dir``: also for b's neurons.
    """

    a: int
    b: int
    l0: int
    l1: int
    kind: str
    rows_dir: bool = True
    cols_dir: bool = False

    def nbytes(self, shapes: list[ModelShape]) -> int:
        return (self.l1 - self.l0) * shapes[self.a].d_mlp * shapes[self.b].n * F64

    def key(self) -> str:
        return f"{self.kind}.{self.a}.{self.b}.{self.l0}.{self.l1}"


@dataclass(frozen=True)
class Plan:
    passes: list[list[Unit]]
    pass_bytes: list[int]  #: co-moment bytes of each pass
    persistent_bytes: int  #: within-layer covariances kept for the whole run
    stream_bytes: int  #: activation buffers for one batch
    budget: int

    @property
    def peak_bytes(self) -> int:
        return self.persistent_bytes + self.stream_bytes + max(self.pass_bytes or [0])

    def to_dict(self) -> dict:
        return {"passes": [[asdict(u) for u in p] for p in self.passes],
                "pass_bytes": self.pass_bytes, "persistent_bytes": self.persistent_bytes,
                "stream_bytes": self.stream_bytes, "budget_bytes": self.budget,
                "peak_bytes": self.peak_bytes}


def pair_list(n_models: int, mode: str) -> list[tuple[int, int, bool]]:
    """(a, b, cols_dir) for every co-moment block the mode needs.

    ``reference``: model 0 against each other model. ``all``: each unordered pair once, with
    results in both directions (C_ba = C_abᵀ, so half the work of every ordered pair).
    """
    if mode == "reference":
        return [(0, b, False) for b in range(1, n_models)]
    if mode == "all":
        return [(a, b, True) for a in range(n_models) for b in range(a + 1, n_models)]
    raise UnineuronsError(f"--pairs must be reference or all, not {mode!r}")


def plan_units(shapes: list[ModelShape], mode: str, budget: int, stream: int,
               ceiling: bool = True) -> Plan:
    """Split and pack the needed blocks into passes that fit ``budget`` bytes, given the
    batch-scaled memory ``stream`` (see :func:`stream_bytes`)."""
    persistent = sum(s.n_layers * s.d_mlp * s.d_mlp * F64 + 4 * s.n * F64 for s in shapes)
    avail = budget - persistent - stream
    need = [(a, b, cd, "pair") for a, b, cd in pair_list(len(shapes), mode)]
    if ceiling:
        sides = [0] if mode == "reference" else list(range(len(shapes)))
        need += [(a, a, False, "ceiling") for a in sides]
    units: list[Unit] = []
    for a, b, cd, kind in need:
        sa, sb = shapes[a], shapes[b]
        layer_bytes = sa.d_mlp * sb.n * F64
        if layer_bytes > avail:
            raise UnineuronsError(
                f"memory budget {fmt_bytes(budget)} is too small: one layer of model {a} against "
                f"model {b} needs {fmt_bytes(layer_bytes)} on top of {fmt_bytes(persistent)} of "
                f"within-layer covariances and {fmt_bytes(stream)} of weights and batch buffers; "
                "raise --memory-budget, or lower --batch-size or --accumulate-tokens"
            )
        per_unit = max(1, min(sa.n_layers, avail // layer_bytes))
        for l0 in range(0, sa.n_layers, per_unit):
            units.append(Unit(a, b, l0, min(sa.n_layers, l0 + per_unit), kind, True, cd))
    passes: list[list[Unit]] = []
    loads: list[int] = []
    for u in sorted(units, key=lambda u: -u.nbytes(shapes)):  # first fit decreasing
        for i, load in enumerate(loads):
            if load + u.nbytes(shapes) <= avail:
                passes[i].append(u)
                loads[i] += u.nbytes(shapes)
                break
        else:
            passes.append([u])
            loads.append(u.nbytes(shapes))
    for p in passes:  # a stable, readable order inside each pass
        p.sort(key=lambda u: (u.kind != "pair", u.a, u.b, u.l0))
    return Plan(passes=passes, pass_bytes=loads, persistent_bytes=persistent,
                stream_bytes=stream, budget=budget)


def flops_per_token(shapes: list[ModelShape], plan: Plan) -> dict[str, float]:
    """Multiply-add FLOPs per streamed token: forward passes, co-moment GEMMs, layer covariances."""
    forward = sum(2.0 * s.n_params for s in shapes)
    blocks = sum(2.0 * u.nbytes(shapes) / F64 for p in plan.passes for u in p)
    layer = sum(2.0 * s.n_layers * s.d_mlp * s.d_mlp for s in shapes)
    # every pass streams the tokens again: forward passes repeat, blocks do not
    n_passes = max(1, len(plan.passes))
    return {"forward": forward * n_passes, "comoments": blocks, "layer_cov": layer,
            "total": forward * n_passes + blocks + layer}
