"""Zoo presets: the model shape and training hyper-parameters of a seed family.

A :class:`ZooConfig` is everything that decides what a zoo's models become *except* the seed
and the data: two zoos trained with equal configs on the same token store hold bitwise-equal
models seed for seed. Configs are frozen and validated on construction;
presets are named configs, and overrides make a new config (:meth:`ZooConfig.from_preset`).

Presets (see the tuning notes at :data:`PRESETS` and ``benchmarks/zoo_presets.py``):

- ``micro``: 1 layer, width 32, MLP 128, for tests (a few steps train in well under a second);
- ``tiny``: 2 layers, width 128, MLP 512, for the demo (5 seeds in about 8 minutes on 2 cores);
- ``small``: 4 layers, width 256, MLP 1024, for research runs (hours per seed on a CPU).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import MAX_BATCH, MAX_CTX, MAX_INT, range_text
from ..errors import UnineuronsError

__all__ = ["ZooConfig", "PRESETS", "lr_at", "Member", "member_name", "member_seeds",
           "grid_members", "check_members", "parse_pairs"]


@dataclass(frozen=True)
class ZooConfig:
    """Model shape and training hyper-parameters of a seed family (everything but the seed)."""

    preset: str  #: the preset this config started from (recorded, not used in training)
    # ---- model shape (HF GPT2Config names) -----------------------------------------------
    n_layer: int  #: transformer blocks
    n_embd: int  #: residual stream width (d_model)
    n_head: int  #: attention heads; must divide n_embd
    n_inner: int  #: MLP width (d_mlp): the number of neurons per layer
    # ---- optimisation ----------------------------------------------------------------------
    lr: float  #: peak learning rate of AdamW
    batch_size: int  #: contexts per step (one step = batch_size x ctx tokens)
    steps: int  #: optimizer steps per seed (the schedule spans them); a preset's is a default
    warmup_frac: float = 0.05  #: linear warmup over this fraction of the steps (at least 1 step)
    decay: Literal["cosine", "linear"] = "cosine"  #: shape of the decay after warmup
    min_lr_ratio: float = 0.1  #: the decay ends at lr * min_lr_ratio on the last step
    weight_decay: float = 0.1  #: AdamW decoupled weight decay, on matrices only (dim >= 2)
    beta1: float = 0.9  #: AdamW beta1
    beta2: float = 0.95  #: AdamW beta2 (0.95 rather than 0.999: steadier for short runs)
    eps: float = 1e-8  #: AdamW epsilon
    grad_clip: float = 1.0  #: clip the global gradient norm to this (0 = no clipping)
    ctx: int | None = None  #: train on the first ctx tokens of each row; None = the store's ctx
    # ---- bookkeeping -----------------------------------------------------------------------
    log_every: int = 10  #: a metrics.jsonl row (mean train loss since the last row) every N steps
    eval_every: int = 100  #: held-out loss every N steps (and at every checkpoint)
    eval_contexts: int = 128  #: held-out loss on the first N contexts of the held-out store

    #: The range of every numeric field (the zoo's one source of them; ``zoo train``'s options
    #: of the same names are held to these): ``{"ge"|"gt"|"le"|"lt": bound}``.
    BOUNDS: ClassVar[dict[str, dict[str, float]]] = {
        "n_layer": {"ge": 1, "le": 1 << 10}, "n_embd": {"ge": 1, "le": 1 << 16},
        "n_head": {"ge": 1, "le": 1 << 10}, "n_inner": {"ge": 1, "le": 1 << 18},
        "lr": {"gt": 0, "le": 1}, "batch_size": {"ge": 1, "le": MAX_BATCH},
        "steps": {"ge": 1, "le": MAX_INT}, "warmup_frac": {"ge": 0, "lt": 1},
        "min_lr_ratio": {"ge": 0, "le": 1}, "weight_decay": {"ge": 0, "le": 1e3},
        "beta1": {"ge": 0, "lt": 1}, "beta2": {"ge": 0, "lt": 1}, "eps": {"gt": 0, "le": 1},
        "grad_clip": {"ge": 0, "le": 1e6}, "ctx": {"ge": 2, "le": MAX_CTX},
        "log_every": {"ge": 1, "le": MAX_INT}, "eval_every": {"ge": 1, "le": MAX_INT},
        "eval_contexts": {"ge": 1, "le": MAX_INT},
    }

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UnineuronsError(f"zoo config ({self.preset}): {what}")

        for name in ("n_layer", "n_embd", "n_head", "n_inner", "batch_size", "steps",
                     "log_every", "eval_every", "eval_contexts"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        for name, b in self.BOUNDS.items():
            v = getattr(self, name)
            if v is None:
                continue
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and not (("ge" in b and v < b["ge"]) or ("gt" in b and v <= b["gt"])
                          or ("le" in b and v > b["le"]) or ("lt" in b and v >= b["lt"])),
                 f"{name} = {v!r} is out of range; it must be {range_text(b)}")
        need(self.n_embd % self.n_head == 0,
             f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.warmup_frac < 1, f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        need(self.decay in ("cosine", "linear"), f"decay must be cosine or linear, got {self.decay!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.ctx is None or (isinstance(self.ctx, int) and self.ctx >= 2),
             f"ctx must be None or an integer >= 2, got {self.ctx!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ZooConfig:
        """The preset ``name`` with ``overrides`` (field names of this class) applied."""
        if name not in PRESETS:
            raise UnineuronsError(
                f"unknown zoo preset {name!r}; choose one of {', '.join(PRESETS)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"preset"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise UnineuronsError(
                f"unknown zoo setting(s) {', '.join(unknown)}; settable: {', '.join(sorted(fields))}"
            )
        # None means "not given" (the CLI passes every option); ctx=None is the default anyway.
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(PRESETS[name], **given)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what zoo.json records)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer zoo format)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise UnineuronsError(
                f"zoo config has unknown field(s) {', '.join(unknown)}: made by a newer unineurons?"
            )
        return cls(**d)


def lr_at(cfg: ZooConfig, step: int, total_steps: int) -> float:
    """Learning rate for the update that takes the model from ``step`` to ``step + 1``.

    Linear warmup from lr/warmup to lr over the warmup steps, then cosine (or linear) decay
    that reaches ``lr * min_lr_ratio`` exactly at the last update. A pure function of the step,
    so a resumed run needs no scheduler state.
    """
    warmup = max(1, round(cfg.warmup_frac * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total_steps - 1 - warmup)
    frac = min(1.0, (step - warmup) / span)  # 0 right after warmup, 1 on the last update
    if cfg.decay == "cosine":
        import math

        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        shape = 1.0 - frac
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)


#: Named configs.
#:
#: ``tiny`` is tuned for held-out loss per CPU-second on a 2-core machine (stdlib corpus, BPE
#: 4096, ctx 128; benchmarks/zoo_presets.py, budget 160 single-thread CPU-seconds per seed):
#: lr 1e-3 / batch 32 (the starting point) reached held-out loss 4.91; lr 3e-3 / batch 16 4.30.
#: At this budget more, smaller steps win (batch 8 was no better than 16); lr 4e-3 and above
#: was worse, and ctx 64 was no better than 128 on the same first 64 positions. 500 steps of
#: 16 x 128 tokens (~1M tokens) take about 2.3 minutes per seed on one core, so 5 seeds on 2
#: workers take about 7.5 minutes.
#:
#: ``small`` follows the usual small-GPT recipe and is not tuned: about 2,000 tokens/s per CPU
#: thread, so 4,000 steps (16M tokens) take about 2.3 hours per seed on a CPU.
PRESETS: dict[str, ZooConfig] = {
    "micro": ZooConfig(
        preset="micro", n_layer=1, n_embd=32, n_head=2, n_inner=128,
        lr=3e-3, batch_size=8, steps=20, log_every=5, eval_every=10, eval_contexts=16,
    ),
    "tiny": ZooConfig(
        preset="tiny", n_layer=2, n_embd=128, n_head=4, n_inner=512,
        lr=3e-3, batch_size=16, steps=500, log_every=10, eval_every=100, eval_contexts=128,
    ),
    "small": ZooConfig(
        preset="small", n_layer=4, n_embd=256, n_head=4, n_inner=1024,
        lr=2e-3, batch_size=32, steps=4000, log_every=20, eval_every=250, eval_contexts=256,
    ),
}


# ---- members: a plain seed, or an (init seed, data seed) pair of a seed grid ------------------

#: A zoo member: an int seed (``seed{S}``: the same seed sets the initial weights and the data
#: order) or a grid member's name ``init{I}-data{D}`` (initial weights from seed I, data order
#: from seed D).
Member = int | str

_GRID = re.compile(r"init(\d+)-data(\d+)")


def member_name(member: Member) -> str:
    """The member's folder name in its zoo: ``seed{S}`` or ``init{I}-data{D}``."""
    return f"seed{member}" if isinstance(member, int) else str(member)


def member_seeds(member: Member) -> tuple[int, int]:
    """``(init_seed, data_seed)`` of a member; a plain seed S is ``(S, S)``."""
    if isinstance(member, int) and not isinstance(member, bool):
        return member, member
    m = _GRID.fullmatch(str(member))
    if not m:
        raise UnineuronsError(f"zoo member {member!r} is neither a seed nor init<I>-data<D>")
    return int(m.group(1)), int(m.group(2))


def grid_members(init_seeds: Sequence[int], data_seeds: Sequence[int],
                 pairs: Iterable[tuple[int, int]] | None = None) -> list[str]:
    """Members ``init{I}-data{D}`` of the grid ``init_seeds x data_seeds`` (every pair), or of
    only ``pairs`` (each pair's seeds must be among the given ones). Errors are one line."""
    for what, seeds in (("--init-seeds", init_seeds), ("--data-seeds", data_seeds)):
        if not seeds:
            raise UnineuronsError(f"{what} is empty; give comma-separated seeds, e.g. 0,1,2")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
                raise UnineuronsError(f"{what}: {s!r} is not a seed (0 <= seed < 2**32)")
        dup = sorted({s for s in seeds if list(seeds).count(s) > 1})
        if dup:
            raise UnineuronsError(f"{what}: seed {dup[0]} is given twice")
    if pairs is None:
        pairs = [(i, d) for i in init_seeds for d in data_seeds]
    out = []
    for i, d in pairs:
        if i not in init_seeds or d not in data_seeds:
            raise UnineuronsError(f"--grid-pairs: {i}:{d} is not in --init-seeds x --data-seeds")
        name = f"init{i}-data{d}"
        if name in out:
            raise UnineuronsError(f"--grid-pairs: {i}:{d} is given twice")
        out.append(name)
    return out


def check_members(members: Iterable[Any]) -> list[Member]:
    """Validated members, all plain seeds or all grid members (a zoo holds one kind: their
    folder names and resume states differ). Errors are one line."""
    out: list[Member] = []
    for m in members:
        if isinstance(m, bool):
            raise UnineuronsError(f"seeds: {m!r} is not an integer")
        if isinstance(m, int):
            if not 0 <= m < 2**32:
                raise UnineuronsError(f"--seeds: seed {m} is out of range; use 0 <= seed < 2**32")
        else:
            member_seeds(m)
        out.append(m)
    if len({isinstance(m, int) for m in out}) > 1:
        raise UnineuronsError("a zoo holds either plain seeds (--seeds) or a seed grid "
                              "(--init-seeds/--data-seeds), not both; use another --out")
    return out


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"0:0,0:1,1:0"`` -> ``[(0, 0), (0, 1), (1, 0)]`` (init seed : data seed)."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        m = re.fullmatch(r"(\d+):(\d+)", item)
        if not m:
            raise UnineuronsError(f"--grid-pairs: {item!r} is not INIT:DATA; give e.g. 0:0,0:1,1:0")
        out.append((int(m.group(1)), int(m.group(2))))
    return out
