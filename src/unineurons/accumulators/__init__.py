"""Mergeable accumulators: every statistic computed over tokens."""

from .base import REGISTRY, Accumulator, check_accumulator, register
from .conditional import ConditionalMoments, PositionStats
from .moments import Moments
from .topk import TopK

__all__ = ["Accumulator", "REGISTRY", "check_accumulator", "register", "Moments", "TopK",
           "ConditionalMoments", "PositionStats"]
