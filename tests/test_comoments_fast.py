"""The float32 co-moment path (rank-2 terms in float32, one float64 pass per fold) against
exact float64, on activations with large means, drifting means and long runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unineurons.accumulators.comoments import CoMoments, sum64


def _data(n_folds: int, fold: int, d: int, offset: float, drift: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_folds * fold, d, generator=g, dtype=torch.float64)
    x = z * torch.logspace(-1, 1, d, dtype=torch.float64) + offset  # scales 0.1 .. 10
    y = 0.7 * z.flip(1) + 0.3 * torch.randn(n_folds * fold, d, generator=g, dtype=torch.float64) - offset
    # the means drift fold to fold by up to ``drift`` standard deviations
    step = drift * torch.randn(n_folds, 1, d, generator=g, dtype=torch.float64)
    x = (x.reshape(n_folds, fold, d) + step * x.std(0)).reshape(-1, d)
    return x, y


@pytest.mark.parametrize("offset,drift", [(0.0, 0.0), (1e3, 0.0), (1e4, 3.0), (-50.0, 20.0)])
def test_float32_path_bounded_against_float64(offset, drift):
    n_folds, fold, d = 300, 64, 24  # a long run of small folds
    x, y = _data(n_folds, fold, d, offset, drift, seed=1)
    acc = CoMoments(d, d, compute_dtype=torch.float32)
    for i in range(n_folds):
        sl = slice(i * fold, (i + 1) * fold)
        acc.update(x[sl].float(), y[sl].float())
    xf, yf = x.float().double(), y.float().double()  # the float32 inputs, exactly
    xc, yc = xf - xf.mean(0), yf - yf.mean(0)
    ref = xc.T @ yc
    scale = torch.outer(xc.norm(dim=0), yc.norm(dim=0))
    err = float(((acc.c - ref) / scale).abs().max())  # error in units of ρ
    assert err < 2e-7, err  # measured: ~1e-8 (the float32 GEMM rounding)
    torch.testing.assert_close(acc.mean_x, xf.mean(0), rtol=1e-9, atol=1e-6 * float(xf.std()))
    torch.testing.assert_close(acc.mean_y, yf.mean(0), rtol=1e-9, atol=1e-6 * float(yf.std()))
    assert float(acc.n) == n_folds * fold


def test_float32_path_agrees_with_float64_compute():
    """The same folds through the float64 path and the float32 path give the same ρ."""
    x, y = _data(40, 100, 16, 300.0, 5.0, seed=2)
    accs = {dt: CoMoments(16, 16, compute_dtype=dt) for dt in (torch.float32, torch.float64)}
    for i in range(40):
        for dt, acc in accs.items():
            acc.update(x[i * 100:(i + 1) * 100].to(dt), y[i * 100:(i + 1) * 100].to(dt))
    a32, a64 = accs[torch.float32], accs[torch.float64]
    assert float((a32.c - a64.c).abs().max() / a64.c.abs().max()) < 1e-5
    torch.testing.assert_close(a32.mean_x, a64.mean_x, rtol=1e-9, atol=1e-6)


def test_sum64_matches_float64_sum():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 7, generator=g) * 5 + 2
    exact = x.double().sum(0)
    np.testing.assert_allclose(sum64(x).numpy(), exact.numpy(), rtol=0, atol=1e-6 * float(x.abs().sum()))
    torch.testing.assert_close(sum64(x.double()), exact, rtol=1e-14, atol=1e-12)


def test_workspace_gives_the_same_bits():
    """A reused float32 workspace (the engine's, one per pass) changes no bit of the result,
    also when it is larger than the block and shared by blocks of other shapes."""
    x, y = _data(12, 40, 6, 1e3, 2.0, seed=3)
    z = y[:, :4] * 2 + 5
    fresh, reused = CoMoments(6, 6), CoMoments(6, 6)
    other, other_ref = CoMoments(6, 4), CoMoments(6, 4)
    work = torch.full((6 * 6 + 7,), float("nan"))  # stale contents must not leak in
    for i in range(12):
        sl = slice(i * 40, (i + 1) * 40)
        xs, ys, zs = x[sl].float(), y[sl].float(), z[sl].float()
        fresh.update(xs, ys)
        reused.update(xs, ys, work)
        other_ref.update(xs, zs)
        other.update(xs, zs, work)
    assert torch.equal(fresh.c, reused.c) and torch.equal(other.c, other_ref.c)
    assert torch.equal(fresh.mean_x, reused.mean_x) and torch.equal(fresh.n, reused.n)


def test_given_sums_match_summing_the_block():
    """The engine sums each model's rows once per fold and slices them for every block: the
    same result as the block summing its own slice (bitwise for an aligned slice, to the last
    float32 bit of a sum for a misaligned one such as layer 1 of a 65-wide model)."""
    x, y = _data(5, 30, 130, 50.0, 1.0, seed=4)
    for rows in (slice(0, 64), slice(65, 130)):
        ref, given = CoMoments(rows.stop - rows.start, 130), CoMoments(rows.stop - rows.start, 130)
        for i in range(5):
            xs, ys = x[i * 30:(i + 1) * 30].float(), y[i * 30:(i + 1) * 30].float()
            sx, sy = xs.mean(0).double(), ys.mean(0).double()
            xs, ys = (xs - sx.float()), (ys - sy.float())
            ref.update_shifted(sx[rows], sy, xs[:, rows], ys)
            given.update_shifted(sx[rows], sy, xs[:, rows], ys, sums=(sum64(xs)[rows], sum64(ys)))
        if rows.start == 0:
            assert torch.equal(ref.c, given.c) and torch.equal(ref.mean_x, given.mean_x)
        scale = float(ref.c.abs().max())
        assert float((ref.c - given.c).abs().max()) <= 1e-6 * scale
        torch.testing.assert_close(ref.mean_x, given.mean_x, rtol=1e-6, atol=1e-9)


def test_bfloat16_path_one_float64_pass():
    """bf16 products (float32 accumulation on CUDA, bf16 output on CPU) with the rank-2 terms
    added in float32: correlations within bf16 precision of exact float64, and the same as
    adding the rank-2 terms in float64 to float32 rounding."""
    n_folds, fold, d = 20, 64, 12
    x, y = _data(n_folds, fold, d, 1e3, 3.0, seed=6)
    acc = CoMoments(d, d, compute_dtype=torch.bfloat16)
    two_pass = CoMoments(d, d, compute_dtype=torch.bfloat16)
    ref = CoMoments(d, d, compute_dtype=torch.float64)
    from unineurons.accumulators.comoments import _cross, shift_of, shifted

    for i in range(n_folds):
        sl = slice(i * fold, (i + 1) * fold)
        acc.update(x[sl].float(), y[sl].float())
        ref.update(x[sl], y[sl])
        # the previous bf16 update: product into float64, then the rank-2 terms in float64
        xs_, ys_ = x[sl].float(), y[sl].float()
        sx, sy = shift_of(xs_), shift_of(ys_)
        bx, by = shifted(xs_, sx, torch.bfloat16), shifted(ys_, sy, torch.bfloat16)
        sum_x, sum_y = sum64(bx), sum64(by)
        nb, na = fold, float(two_pass.n)
        dx, dy = sx + sum_x / nb - two_pass.mean_x, sy + sum_y / nb - two_pass.mean_y
        two_pass.c.add_(_cross(bx, by)).addmm_(
            torch.stack([-sum_x / nb, dx * (na * nb / (na + nb))], 1), torch.stack([sum_y, dy], 0))
        two_pass.mean_x += dx * (nb / (na + nb))
        two_pass.mean_y += dy * (nb / (na + nb))
        two_pass.n = two_pass.n + nb

    def rho(a):
        c = a.c.numpy()
        return c / np.sqrt(np.outer((x - x.mean(0)).pow(2).sum(0).numpy(),
                                    (y - y.mean(0)).pow(2).sum(0).numpy()))

    assert np.abs(rho(acc) - rho(ref)).max() < 2e-3  # bf16 inputs (measured 2.4e-4)
    np.testing.assert_allclose(rho(acc), rho(two_pass), atol=1e-6)
