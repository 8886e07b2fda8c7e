"""Plan a big correlate run from model configs alone: memory, passes, FLOPs and time.

No weights are downloaded: shapes and parameter counts come from each model's config (the
model is instantiated on PyTorch's ``meta`` device, which allocates nothing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UnineuronsError
from .config import CorrelateConfig
from .engine import plan_for
from .plan import ModelShape, Plan, flops_per_token, null_flops

__all__ = ["shape_from_config", "measure_matmul_rate", "estimate", "Estimate"]


def shape_from_config(spec: str) -> ModelShape:
    """The :class:`ModelShape` of a model spec (layers, MLP width, parameter count, residual
    width, heads, vocabulary), from its config only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.adapters import ARCHITECTURES, mlp_shape_from_config
    from ..models.load import parse_model_spec

    ms = parse_model_spec(spec)
    if ms.local and not (Path(ms.location) / "config.json").is_file():
        raise UnineuronsError(f"model folder {spec} has no config.json; give the folder a model "
                              "was saved to (save_pretrained), or a hub id")
    try:
        cfg = AutoConfig.from_pretrained(ms.location, revision=ms.revision)
    except Exception as e:
        raise UnineuronsError(f"model {spec}: cannot read its config ({type(e).__name__}); offline and "
                              "not cached, or no such model") from None
    if cfg.model_type not in ARCHITECTURES:
        raise UnineuronsError(f"model {spec}: architecture {cfg.model_type!r} is not supported; "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
    n_layers, d_mlp = mlp_shape_from_config(cfg)  # each family's names
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    # hidden_size and num_attention_heads are every family's names (GPT-2's config maps
    # them to n_embd and n_head)
    return ModelShape(int(n_layers), int(d_mlp), int(n_params), d_model=int(cfg.hidden_size),
                      n_heads=int(cfg.num_attention_heads), vocab_size=int(cfg.vocab_size))


def measure_matmul_rate(n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 GEMM FLOP/s of this machine, measured now on square ``n`` x ``n`` products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


@dataclass
class Estimate:
    shapes: list[ModelShape]
    plan: Plan
    flops: dict[str, float]  #: per token
    n_tokens: int
    rate: float  #: FLOP/s used for the time
    workers: int
    null_flops: float = 0.0  #: the calibrated null's, once per run (``plan.null_flops``)

    @property
    def total_flops(self) -> float:
        return self.flops["total"] * self.n_tokens + self.null_flops

    @property
    def seconds(self) -> float:
        return self.total_flops / (self.rate * self.workers)


def estimate(cfg: CorrelateConfig, n_tokens: int, ctx: int, rate: float | None = None,
             workers: int = 1) -> Estimate:
    """The plan and cost of ``cfg`` over ``n_tokens`` tokens of contexts of ``ctx``."""
    shapes = [shape_from_config(m) for m in cfg.models]
    plan = plan_for(cfg, shapes, ctx)
    return Estimate(shapes, plan, flops_per_token(shapes, plan), n_tokens,
                    rate if rate else measure_matmul_rate(), max(1, workers),
                    null_flops(shapes, plan, cfg.null_rotations, 2 if cfg.split_half else 1))
