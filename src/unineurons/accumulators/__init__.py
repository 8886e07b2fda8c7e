"""Mergeable accumulators: every statistic computed over tokens."""

from .base import REGISTRY, Accumulator, check_accumulator, register
from .moments import Moments

__all__ = ["Accumulator", "REGISTRY", "check_accumulator", "register", "Moments"]
