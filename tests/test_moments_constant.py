"""Constant input to the accumulators that divide by a variance (issue 17): variance 0 and
NaN shape statistics, as scipy, for every dtype; the smallest real spread is not constant."""

from __future__ import annotations

import pytest
import torch


# ---- the Moments accumulator and every accumulator that divides by a variance ---------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [14.3, -3.7e4, 2.5e-6, 0.0])
def test_constant_input_gives_nan_shape_statistics(dtype, value):
    import numpy as np
    from scipy import stats

    from unineurons.accumulators.moments import Moments

    x = torch.full((7, 3), value, dtype=dtype)
    x[:, 2] = torch.linspace(-1, 2, 7, dtype=dtype)  # a varying column next to the constant ones
    acc = Moments(3).update(x[:3]).merge(Moments(3).update(x[3:]))  # and across a merge
    r = acc.result()
    ref = x.double().numpy()
    assert r["var"][:2].tolist() == [0.0, 0.0]
    assert torch.isnan(r["skew"][:2]).all() and torch.isnan(r["kurt"][:2]).all()
    import warnings

    with warnings.catch_warnings():  # scipy says NaN too (with a precision-loss warning)
        warnings.simplefilter("ignore")
        assert np.isnan(stats.skew(ref[:, 0])) and np.isnan(stats.kurtosis(ref[:, 0]))
    np.testing.assert_allclose(r["skew"][2].item(), stats.skew(ref[:, 2]), atol=1e-9)
    np.testing.assert_allclose(r["kurt"][2].item(), stats.kurtosis(ref[:, 2], fisher=False),
                               rtol=1e-9)
    np.testing.assert_allclose(r["var"][2].item(), ref[:, 2].var(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_smallest_real_spread_of_a_dtype_is_not_constant(dtype):
    import numpy as np
    from scipy import stats

    from unineurons.accumulators.moments import Moments

    a = torch.tensor(14.3, dtype=dtype)
    b = torch.nextafter(a, torch.tensor(100.0, dtype=dtype)) if dtype == torch.float32 else \
        (a.float() * (1 + torch.finfo(dtype).eps)).to(dtype)
    assert b != a
    x = torch.stack([a, a, b, a, b, a, a]).unsqueeze(1)
    r = Moments(1).update(x).result()
    ref = x.double().numpy()[:, 0]
    assert r["var"].item() > 0
    np.testing.assert_allclose(r["skew"].item(), stats.skew(ref), rtol=1e-6)


def test_conditional_moments_of_a_constant_neuron():
    import numpy as np

    from unineurons.accumulators.conditional import ConditionalMoments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x[:, 1] = 14.3
    y = torch.randint(-1, 2, (40,), generator=g)
    r = ConditionalMoments(2, 3).update(x[:17], y[:17]).merge(
        ConditionalMoments(2, 3).update(x[17:], y[17:])).result()
    assert r["vr"][:, 1].tolist() == [0.0, 0.0] and r["var"][1].item() == 0.0
    xs = x.numpy()
    for f in range(2):
        for j in (0, 2):
            on = (y == f).numpy()
            within = (on.mean() * xs[on, j].var() + (1 - on.mean()) * xs[~on, j].var())
            np.testing.assert_allclose(r["vr"][f, j].item(), 1 - within / xs[:, j].var(),
                                       rtol=1e-9)
