"""The memory planner: which co-moment blocks are accumulated in which pass over the tokens.

A *unit* is one float64 co-moment block: rows = a range of whole layers of model a, columns =
every neuron of model b. The planner splits pairs into layer ranges of one size for the whole
plan (the size that needs the fewest passes, the largest such), and packs units into passes
(first fit, largest first). Every pass streams the same tokens; memory is the planned
accumulators plus O(batch), never O(tokens).

What is counted (all of it measured, see ``benchmarks/correlate.py`` row (f)):

- ``persistent``: every model's within-layer covariances, kept for the whole run;
- ``stream`` (:func:`stream_bytes`): weights, batch buffers, one forward pass's working memory,
  the fold's copies, and on a CPU run the rotation matrices of the baseline;
- per pass, its co-moment blocks plus the temporaries of one block (:func:`work_bytes`): a
  fold's cross product, or the working copies of summarising the block tile by tile;
- the calibrated null (``null_rotations`` R): every block's null maxima (``[R, rows]``, kept
  to the end of the run, in ``persistent``) and one rotation with its QR workspace at a time;
- ``--split-half`` (``halves`` 2): every pair block and layer covariance twice (one per half
  of the contexts) and the merged layer covariances of all contexts, the halves' summaries.

Counting the stream's memory through the summaries (when its buffers are already free) keeps
the plan an upper bound whatever the allocator does with freed memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import UnineuronsError

__all__ = ["ModelShape", "Unit", "Plan", "plan_units", "stream_bytes", "forward_workspace",
           "work_bytes", "acc_bytes", "null_bytes", "null_flops", "parse_bytes", "fmt_bytes",
           "flops_per_token", "full_matrix_bytes"]

F64 = 8
F32 = 4
F16 = 2
#: bytes per weight: ``models/load.py`` loads every model in float32, on every device
WEIGHT_BYTES = 4

# One forward pass of the base model (no LM head, see ``stream._run_one``) in inference mode
# frees each block's intermediates before the next block: its working memory is one block's.
# Measured (peak live tensor bytes of a forward, from the torch profiler; the same as peak RSS
# with big allocations mmapped) for GPT-2, GPT-NeoX and Llama, float32 on CPU, transformers 5,
# d_model 256-1024, d_mlp 256-4096, T 64-512: with SDPA attention a block holds at most
# 10.0 x [B, T, d_model] where attention dominates and 4.3 x [B, T, d_mlp] where the MLP does
# (GPT-2's gelu_new keeps four alive; NeoX 2.3, Llama 3.3); eager attention adds its
# [B, heads, T, T] scores, at most 1.6 x their size. Attention and MLP intermediates never
# coexist, so the sum of the rounded-up factors bounds both; the scores count even under SDPA,
# which never forms them (a model's config may ask for eager attention).
FWD_HIDDEN = 12  #: [B, T, d_model] float32 tensors alive at once within a block
FWD_MLP = 4  #: [B, T, d_mlp] float32 tensors alive at once within a block
FWD_SCORES = 2  #: [B, heads, T, T] float32 attention scores alive at once (eager attention)

# Summarising a finished block (``maxcorr.block_results``) works in tiles of one row layer by
# one column layer; its float64 working copies (correlations, rotated tile, baseline
# correlations, a NaN-filled copy for the top-k) stay below WORK_TILE tiles (measured 2.2 for
# 2048 x 2048 tiles, one and both directions). A fold's cross product is one block-sized
# temporary of at most 8 bytes per entry (float32: 4), added into the block in place.
WORK_TILE = 3
#: Rows of a fold's float64 column sums converted at once (``accumulators.comoments.sum64``).
SUM_ROWS = 256


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
    """The sizes the planner needs. Fields past ``d_mlp`` are 0 when unknown; the forward
    workspace then leaves out the terms that need them (the plan under-counts)."""

    n_layers: int
    d_mlp: int
    n_params: int = 0  #: parameter count (weights memory and forward FLOPs); 0 if unknown
    d_model: int = 0  #: residual stream width
    n_heads: int = 0  #: attention heads
    vocab_size: int = 0  #: rows of the (un)embedding

    @property
    def n(self) -> int:
        return self.n_layers * self.d_mlp


def forward_workspace(s: ModelShape, batch_size: int, ctx: int) -> int:
    """Upper bound of one forward pass's working memory over ``[batch_size, ctx]`` tokens,
    beyond its weights and the captured activations: one block's float32 intermediates (see
    ``FWD_*``)."""
    bt = batch_size * ctx
    return F32 * (bt * (FWD_HIDDEN * s.d_model + FWD_MLP * s.d_mlp)
                  + FWD_SCORES * batch_size * s.n_heads * ctx * ctx)


def stream_bytes(shapes: list[ModelShape], accumulate: int, batch_size: int, ctx: int,
                 compute_bytes: int = 4, weight_bytes: int = WEIGHT_BYTES,
                 rotations: bool = False) -> int:
    """Memory that scales with the batch and the fold, not the tokens, plus the weights.

    ``R = accumulate + batch_size * ctx`` rows per model are buffered at most (a fold starts
    once ``accumulate`` kept rows are pending, so the batch that crosses it is in). The larger
    of the two phases counts:

    - forward pass of model j: every model's pending float32 rows ``R * N * 4``, plus j's
      full-batch capture ``B * T * N_j * 4`` (copied into the kept rows layer by layer) and
      j's :func:`forward_workspace`;
    - fold: the larger of concatenating the pending batches (both copies, ``R * N * 8``) and
      shifting them: rows and shifted copies ``R * N * (4 + compute_bytes)``, plus the
      transient of shifting one model (a float32 difference before bfloat16, a float64 copy
      before a float64 difference: ``R * max N * (4 | 0 | 8)``) and the float64 column sums'
      ``SUM_ROWS`` rows (``accumulators.comoments.sum64``). The stream generator keeps no
      batch of its own while a fold runs.

    ``rotations``: also count the baseline's per-layer rotations (float64 ``[d_mlp, d_mlp]``),
    which the run keeps in host memory: true when the accumulators live there too (CPU).
    """
    if not shapes:
        return 0
    rows = accumulate + batch_size * ctx
    bt = batch_size * ctx
    pending = sum(rows * s.n * F32 for s in shapes)
    forward = pending + max(bt * s.n * F32 + forward_workspace(s, batch_size, ctx) for s in shapes)
    concat = sum(rows * s.n * 2 * F32 for s in shapes)
    widest = max(s.n for s in shapes)
    transient = {2: F32, 4: 0}.get(compute_bytes, F64)
    shift = (sum(rows * s.n * (F32 + compute_bytes) for s in shapes)
             + rows * widest * transient + SUM_ROWS * widest * F64)
    resident = sum(s.n_params * weight_bytes for s in shapes)
    if rotations:
        resident += sum(s.n_layers * s.d_mlp * s.d_mlp * F64 for s in shapes)
    return resident + max(forward, concat, shift)


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


#: float64 ``[d, d]`` copies of generating one null rotation: the Gaussian, Q, R, the signs'
#: product (``rotation.random_orthogonal``)
NULL_ROT_COPIES = 4


def work_bytes(u: Unit, shapes: list[ModelShape], null_rotations: int = 0,
               similarity: bool = True) -> int:
    """Temporaries of block ``u`` beyond the block itself: the larger of a fold's cross
    product and the working copies of summarising it tile by tile (see ``WORK_TILE``), the
    latter with a null rotation being made (``NULL_ROT_COPIES``) when ``null_rotations``, and
    of layer similarity and matching (``extras_work_bytes``) unless ``similarity`` is off."""
    tile = shapes[u.a].d_mlp * shapes[u.b].d_mlp * F64
    rot = NULL_ROT_COPIES * max(shapes[u.a].d_mlp, shapes[u.b].d_mlp) ** 2 * F64 if null_rotations else 0
    from .extras import extras_work_bytes  # layer similarity and matching of the block

    extras = extras_work_bytes(u, shapes) if similarity else 0
    return max(u.nbytes(shapes), WORK_TILE * tile + rot, extras)


def acc_bytes(u: Unit, shapes: list[ModelShape], halves: int = 1) -> int:
    """Accumulator bytes of block ``u``: one co-moment block per split half (pairs only)."""
    return u.nbytes(shapes) * (halves if u.kind == "pair" else 1)


@dataclass(frozen=True)
class Plan:
    passes: list[list[Unit]]
    pass_bytes: list[int]  #: co-moment bytes of each pass
    persistent_bytes: int  #: within-layer covariances kept for the whole run
    stream_bytes: int  #: weights, batch buffers, forward working memory (:func:`stream_bytes`)
    budget: int
    work_bytes: list[int] = field(default_factory=list)  #: each pass's largest working copies

    @property
    def peak_bytes(self) -> int:
        """Upper bound of the run's memory: the pass that needs the most."""
        work = self.work_bytes or [0] * len(self.pass_bytes)
        return self.persistent_bytes + self.stream_bytes + max(
            [b + w for b, w in zip(self.pass_bytes, work, strict=True)] or [0])

    def to_dict(self) -> dict:
        return {"passes": [[asdict(u) for u in p] for p in self.passes],
                "pass_bytes": self.pass_bytes, "work_bytes": self.work_bytes,
                "persistent_bytes": self.persistent_bytes, "stream_bytes": self.stream_bytes,
                "budget_bytes": self.budget, "peak_bytes": self.peak_bytes}


def full_matrix_bytes(plan: Plan, shapes: list[ModelShape]) -> int:
    """Bytes of the full correlation matrices ``--save-full-matrix`` writes: one float16
    ``[neurons of a, neurons of b]`` matrix per correlated pair (a, b) of the plan (``--pairs
    all``: one per unordered pair, the other direction is its transpose and is not written);
    ceiling blocks write none. GPT-2 small against GPT-2 small: 36,864² x 2 B = 2.7 GB."""
    return sum((u.l1 - u.l0) * shapes[u.a].d_mlp * shapes[u.b].n * F16
               for p in plan.passes for u in p if u.kind == "pair")


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


def _pack(units: list[Unit], shapes: list[ModelShape], avail: int, null_rotations: int = 0,
          halves: int = 1, similarity: bool = True) -> tuple[list[list[Unit]], list[int], list[int]]:
    """First fit decreasing: a pass holds units while its co-moments plus its largest
    working copies fit ``avail``. Returns (passes, co-moment bytes, working bytes)."""
    passes: list[list[Unit]] = []
    loads: list[int] = []
    works: list[int] = []

    def size(u: Unit) -> tuple[int, int]:
        return acc_bytes(u, shapes, halves), work_bytes(u, shapes, null_rotations, similarity)

    for u in sorted(units, key=lambda u: tuple(-x for x in size(u))):
        nb, w = size(u)
        for i in range(len(passes)):
            if loads[i] + nb + max(works[i], w) <= avail:
                passes[i].append(u)
                loads[i] += nb
                works[i] = max(works[i], w)
                break
        else:
            passes.append([u])
            loads.append(nb)
            works.append(w)
    return passes, loads, works


def null_bytes(shapes: list[ModelShape], mode: str, null_rotations: int, halves: int = 1) -> int:
    """The calibrated null's maxima of the whole run, float64 ``[R, neurons]`` per direction of
    every pair (and per split half plus all contexts with ``halves`` 2), kept to the end."""
    if not null_rotations:
        return 0
    per = sum(shapes[a].n + (shapes[b].n if cd else 0) for a, b, cd in pair_list(len(shapes), mode))
    return null_rotations * per * F64 * (1 if halves == 1 else halves + 1)


def plan_units(shapes: list[ModelShape], mode: str, budget: int, stream: int,
               ceiling: bool = True, null_rotations: int = 0, halves: int = 1,
               similarity: bool = True) -> Plan:
    """Split and pack the needed blocks into passes that fit ``budget`` bytes, given the
    batch-scaled memory ``stream`` (see :func:`stream_bytes`).

    Blocks are split into units of the same number of layers ``k`` of their row model (the
    last unit of a model may be shorter). Smaller units need smaller working copies, so more
    co-moments fit a pass; the plan takes the ``k`` with the fewest passes, and of those the
    largest (fewer, larger GEMMs). ``null_rotations`` and ``halves`` (``--split-half``): see
    the module docstring; ``similarity`` off: layer similarity and matching are not run, so
    their working copies are not counted.
    """
    lc_copies = 1 if halves == 1 else halves + 1  # each half's and the merged
    persistent = (sum(s.n_layers * s.d_mlp * s.d_mlp * F64 * lc_copies + 4 * s.n * F64 for s in shapes)
                  + null_bytes(shapes, mode, null_rotations, halves))
    avail = budget - persistent - stream
    need = [(a, b, cd, "pair") for a, b, cd in pair_list(len(shapes), mode)]
    if ceiling:
        sides = [0] if mode == "reference" else list(range(len(shapes)))
        need += [(a, a, False, "ceiling") for a in sides]
    for a, b, cd, kind in need:
        one = Unit(a, b, 0, 1, kind, True, cd)
        if acc_bytes(one, shapes, halves) + work_bytes(one, shapes, null_rotations, similarity) > avail:
            raise UnineuronsError(
                f"memory budget {fmt_bytes(budget)} is too small: one layer of model {a} against "
                f"model {b} needs {fmt_bytes(acc_bytes(one, shapes, halves))} and "
                f"{fmt_bytes(work_bytes(one, shapes, null_rotations, similarity))} of working "
                "copies to summarise it, on top "
                f"of {fmt_bytes(persistent)} of within-layer covariances and {fmt_bytes(stream)} of "
                "weights, batch buffers and forward working memory; raise --memory-budget, or "
                "lower --batch-size or --accumulate-tokens"
            )
    best: tuple[list[list[Unit]], list[int], list[int]] | None = None
    for k in range(max((shapes[a].n_layers for a, _, _, _ in need), default=1), 0, -1):
        units = [Unit(a, b, l0, min(shapes[a].n_layers, l0 + k), kind, True, cd)
                 for a, b, cd, kind in need for l0 in range(0, shapes[a].n_layers, k)]
        if any(acc_bytes(u, shapes, halves) + work_bytes(u, shapes, null_rotations, similarity)
               > avail for u in units):
            continue
        packed = _pack(units, shapes, avail, null_rotations, halves, similarity)
        if best is None or len(packed[0]) < len(best[0]):  # ties keep the larger k
            best = packed
    passes, loads, works = best if best is not None else ([], [], [])
    for p in passes:  # a stable, readable order inside each pass
        p.sort(key=lambda u: (u.kind != "pair", u.a, u.b, u.l0))
    return Plan(passes=passes, pass_bytes=loads, persistent_bytes=persistent,
                stream_bytes=stream, budget=budget, work_bytes=works)


def null_flops(shapes: list[ModelShape], plan: Plan, null_rotations: int, halves: int = 1) -> float:
    """FLOPs of the calibrated null, once per run (not per token): per rotation and pair block,
    the rotated block's GEMM (``2 rows N_b d_b``, and ``2 rows N_b d_a`` for the columns
    direction) and making the rotations (QR, ``~4 d³`` each, per layer). With ``halves`` 2 each
    half is summarised too (three times in all)."""
    total = 0.0
    for p in plan.passes:
        for u in p:
            if u.kind != "pair":
                continue
            sa, sb = shapes[u.a], shapes[u.b]
            rows = (u.l1 - u.l0) * sa.d_mlp
            total += 2.0 * rows * sb.n * sb.d_mlp + 4.0 * sb.n_layers * sb.d_mlp ** 3
            if u.cols_dir:
                total += 2.0 * rows * sb.n * sa.d_mlp + 4.0 * (u.l1 - u.l0) * sa.d_mlp ** 3
    return total * null_rotations * (1 if halves == 1 else halves + 1)


def flops_per_token(shapes: list[ModelShape], plan: Plan) -> dict[str, float]:
    """Multiply-add FLOPs per streamed token: forward passes, co-moment GEMMs, layer covariances.

    A forward pass costs 2 FLOPs per parameter, less the unembedding (``2 * d_model * vocab``)
    where the shape knows both: the stream runs the base model without its LM head. (An untied
    input embedding is a lookup, yet still counted: a small over-count.)
    """
    forward = sum(2.0 * (s.n_params - s.d_model * s.vocab_size) for s in shapes)
    blocks = sum(2.0 * u.nbytes(shapes) / F64 for p in plan.passes for u in p)
    layer = sum(2.0 * s.n_layers * s.d_mlp * s.d_mlp for s in shapes)
    # every pass streams the tokens again: forward passes repeat, blocks do not
    n_passes = max(1, len(plan.passes))
    return {"forward": forward * n_passes, "comoments": blocks, "layer_cov": layer,
            "total": forward * n_passes + blocks + layer}
