"""The one shared accumulator check, run over every registered accumulator.

Split-and-merge equals one pass, merge is associative, the empty accumulator is neutral on
both sides, and the state round-trips through safetensors (see accumulators/base.py). The
suite asserts how many accumulators it found, so a new one cannot slip by unregistered.
"""

from __future__ import annotations

import pytest

import unineurons.accumulators  # noqa: F401  (registers the package's accumulators)
import unineurons.accumulators.comoments  # noqa: F401
import unineurons.analyses.interventions  # noqa: F401
from unineurons.accumulators.base import REGISTRY, check_accumulator

EXPECTED = {"Moments", "CoMoments", "LayerCov", "TopK", "ConditionalMoments", "PositionStats", "ContextSums",
            "LMMetrics"}


def test_every_accumulator_is_registered():
    assert set(REGISTRY) == EXPECTED, f"registered: {sorted(REGISTRY)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulator_laws(name, seed):
    check_accumulator(name, seed=seed)


def test_the_check_catches_a_broken_merge():
    """A merge that keeps only the other state must fail the check (the check can fail)."""
    from unineurons.accumulators.moments import Moments

    make, batches = REGISTRY["Moments"](0)

    class Forgetful(Moments):
        def update(self, x):
            Moments.merge(self, Moments(self.d).update(x))  # one pass stays correct
            return self

        def merge(self, other):  # last writer wins: wrong
            return self.load_state_dict(other.state_dict())

    REGISTRY["Forgetful"] = lambda seed: (lambda: Forgetful(5), batches)
    try:
        with pytest.raises(AssertionError, match="split\\+merge"):
            check_accumulator("Forgetful")
    finally:
        del REGISTRY["Forgetful"]


def test_moments_match_scipy_in_column_blocks(monkeypatch):
    import numpy as np
    import scipy.stats as st
    import torch

    from unineurons.accumulators.moments import Moments

    x = torch.randn(500, 7, dtype=torch.float64) ** 3 * 2 + 1e3  # skewed, heavy-tailed, large mean
    monkeypatch.setattr(Moments, "BLOCK", 3)  # 7 columns in blocks of 3, 3, 1
    acc = Moments(7)
    for chunk in x.split(61):
        acc.update(chunk)
    r = acc.result()
    xn = x.numpy()
    np.testing.assert_allclose(r["mean"], xn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(r["var"], xn.var(0), rtol=1e-9)
    np.testing.assert_allclose(r["skew"], st.skew(xn), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(r["kurt"], st.kurtosis(xn, fisher=False), rtol=1e-8)
    np.testing.assert_allclose(r["min"], xn.min(0))
    np.testing.assert_allclose(r["max"], xn.max(0))
