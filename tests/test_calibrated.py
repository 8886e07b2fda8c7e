"""Calibrated universality: the rotation null against numpy, p/q values against direct
computations, and calibration on planted cases (no privileged match, shared features, a copy)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from unineurons.correlate.calibrate import (
    MIN_EXCEED,
    TAIL_FRAC,
    TAIL_MAX,
    TAIL_MIN,
    bh_qvalues,
    block_null,
    calibrated_columns,
    loo_studentized,
    null_pvalues,
)
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.correlate.maxcorr import block_results
from unineurons.correlate.plan import ModelShape, null_bytes, null_flops, plan_units
from unineurons.correlate.rotation import random_orthogonal, rotation_for
from unineurons.io import load_tensors

FDR = 0.01


@functools.cache
def _rot(seed: int, layer: int, r: int, d: int) -> torch.Tensor:
    return random_orthogonal(d, torch.Generator().manual_seed(10_000 * seed + 100 * layer + r))


def _acts(g: np.random.Generator, n: int, L: int, d: int, k: int = 16) -> np.ndarray:
    """``[n, L*d]``: per layer a rank-k shared signal plus noise, clipped below like a GELU."""
    z = g.standard_normal((n, k))
    return np.concatenate([np.maximum(z @ g.standard_normal((k, d)) / np.sqrt(k)
                                      + 0.7 * g.standard_normal((n, d)), -0.2) for _ in range(L)], 1)


def _rotated(x: np.ndarray, L: int, d: int, seed: int) -> np.ndarray:
    """``x`` with every layer rotated by its own Haar rotation: no privileged basis."""
    return np.concatenate([x[:, li * d:(li + 1) * d] @ _rot(seed + 77, li, 999, d).numpy()
                           for li in range(L)], 1)


def _stats(x: np.ndarray, y: np.ndarray, L: int, d: int):
    tx = torch.from_numpy(x - x.mean(0))
    ty = torch.from_numpy(y - y.mean(0))
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64)
    cov = lambda t: torch.stack([t[:, li * d:(li + 1) * d].T @ t[:, li * d:(li + 1) * d] for li in range(L)])  # noqa: E731
    return tx.T @ ty, n, (tx * tx).sum(0), (ty * ty).sum(0), cov(tx), cov(ty)


def _observed_and_null(x, y, L, d, R=32, seed=0):
    c, n, m2x, m2y, _, covy = _stats(x, y, L, d)
    obs = block_results(c, n, m2x, m2y, k=1, d_rows=d, d_cols=d)["row_topv"][:, 0].numpy()
    null = block_null(c, n, m2x, m2y, n_rot=R, d_rows=d, d_cols=d, col_cov=covy,
                      col_rot=lambda layer, r: _rot(seed, layer, r, d))["row_null"].numpy()
    return obs, null


# ---- the null maxima, p- and q-values against direct computations ----------------------------

def test_block_null_matches_numpy_both_directions():
    g = np.random.default_rng(0)
    L, d, R = 2, 6, 4
    x, y = _acts(g, 300, L, d, k=3), _acts(g, 300, L, d, k=3)
    c, n, m2x, m2y, covx, covy = _stats(x, y, L, d)
    out = block_null(c, n, m2x, m2y, n_rot=R, d_rows=d, d_cols=d, col_cov=covy, row_cov=covx,
                     col_rot=lambda layer, r: _rot(1, layer, r, d),
                     row_rot=lambda layer, r: _rot(2, layer, r, d))
    for r in range(R):
        yr = np.concatenate([y[:, li * d:(li + 1) * d] @ _rot(1, li, r, d).numpy() for li in range(L)], 1)
        xr = np.concatenate([x[:, li * d:(li + 1) * d] @ _rot(2, li, r, d).numpy() for li in range(L)], 1)
        rho_rows = np.corrcoef(x.T, yr.T)[:L * d, L * d:]
        rho_cols = np.corrcoef(xr.T, y.T)[:L * d, L * d:]
        np.testing.assert_allclose(out["row_null"][r].numpy(), rho_rows.max(1), atol=1e-10)
        np.testing.assert_allclose(out["col_null"][r].numpy(), rho_cols.max(0), atol=1e-10)


def test_loo_studentized_matches_a_loop():
    null = np.random.default_rng(1).gumbel(size=(9, 5))
    mean, sd, z = loo_studentized(null)
    np.testing.assert_allclose(mean, null.mean(0))
    np.testing.assert_allclose(sd, null.std(0, ddof=1))
    for r in range(9):
        rest = np.delete(null, r, axis=0)
        np.testing.assert_allclose(z[r], (null[r] - rest.mean(0)) / rest.std(0, ddof=1), rtol=1e-10)


def test_pvalues_match_a_direct_computation():
    g = np.random.default_rng(2)
    R, d = 16, 40
    null = 0.3 + 0.05 * g.gumbel(size=(R, 2 * d))
    obs = 0.3 + 0.05 * g.gumbel(size=2 * d)
    obs[[3, 50]] = [0.9, 0.6]  # far in the tail: the fitted tail's p
    obs[7] = np.nan
    layer = np.repeat([0, 1], d)
    p, mean, sd = null_pvalues(obs, null, layer)
    assert np.isnan(p[7])
    for lay in (0, 1):
        idx = [i for i in np.flatnonzero(layer == lay) if np.isfinite(obs[i])]
        zs = []  # pooled over the layer's neurons with a p-value
        for i in idx:  # leave-one-out studentised null draws, by a loop
            for r in range(R):
                rest = np.delete(null[:, i], r)
                zs.append((null[r, i] - rest.mean()) / rest.std(ddof=1))
        pooled = np.sort(zs)
        M = pooled.size
        k = int(min(max(TAIL_MIN, TAIL_FRAC * M), TAIL_MAX, M - 1))
        u = pooled[M - k - 1]
        c, _, scale = stats.genpareto.fit(pooled[M - k:] - u, floc=0.0)
        if c < 0:
            c, scale = 0.0, float((pooled[M - k:] - u).mean())
        for i in idx:
            z = (obs[i] - null[:, i].mean()) / null[:, i].std(ddof=1)
            count = int((pooled >= z).sum())
            want = (1 + count) / (1 + M)
            if count < MIN_EXCEED and z > u:
                want = k / M * stats.genpareto.sf(z - u, c, scale=scale)
            assert p[i] == pytest.approx(want, rel=1e-6, abs=1e-300), (lay, i)
    assert p[3] < 1e-4 < 1 / (1 + R * d) and p[50] < 1e-2  # beyond what R x d draws resolve


def test_bh_qvalues_match_numpy():
    p = np.random.default_rng(3).uniform(size=40) ** 3
    p[[4, 9]] = np.nan
    q = bh_qvalues(p)
    ok = np.isfinite(p)
    ps = p[ok]
    order = np.argsort(ps)
    m = ps.size
    raw = ps[order] * m / np.arange(1, m + 1)
    adj = np.minimum(np.minimum.accumulate(raw[::-1])[::-1], 1.0)
    want = np.empty(m)
    want[order] = adj
    np.testing.assert_allclose(q[ok], want, rtol=1e-12)
    assert np.isnan(q[[4, 9]]).all()


# ---- calibration on planted cases -----------------------------------------------------------

def test_rotated_copy_gives_uniform_pvalues_and_no_discoveries():
    """The partner is the model's own activations rotated per layer: no neuron has a
    privileged match, so p-values are uniform and the calibrated share stays <= FDR."""
    L, d = 2, 96
    ps = []
    for seed in range(4):
        x = _acts(np.random.default_rng(seed), 2500, L, d)
        # the same null rotations for every data set: their data differ
        obs, null = _observed_and_null(x, _rotated(x, L, d, seed), L, d)
        cols = calibrated_columns(obs, [null], np.repeat(np.arange(L), d), FDR)
        assert cols["is_universal_calibrated"].mean() <= FDR
        ps.append(cols["p_value"])
    p = np.concatenate(ps)
    assert np.isfinite(p).all()
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert np.mean(p < 0.05) == pytest.approx(0.05, abs=0.025)


def test_planted_shared_features_are_found():
    L, d, n_shared = 3, 96, 12
    g = np.random.default_rng(5)
    x = _acts(g, 2500, L, d)
    y = _rotated(x, L, d, 5)
    planted = np.zeros(L * d, bool)
    for lay in range(L):
        cols = slice(lay * d, lay * d + n_shared)
        y[:, cols] = x[:, cols] + 0.6 * x[:, cols].std(0) * g.standard_normal((x.shape[0], n_shared))
        planted[cols] = True
    obs, null = _observed_and_null(x, y, L, d)
    cols = calibrated_columns(obs, [null], np.repeat(np.arange(L), d), FDR)
    flag = cols["is_universal_calibrated"]
    assert flag[planted].all()
    assert flag[~planted].mean() <= FDR
    # the paper's fixed threshold would find none of them here: their excess is below 0.5
    excess = obs - null.mean(0)
    assert (excess[planted] < 0.5).all()


# ---- the correlate stage end to end ---------------------------------------------------------

@pytest.fixture(scope="module")
def copy_pair(tmp_path_factory, make_gpt2) -> list[Path]:
    root = tmp_path_factory.mktemp("cal")
    a = make_gpt2(root / "a", 0)
    b = make_gpt2(root / "b", 1)
    shutil.copytree(a, root / "a_copy")
    return [a, root / "a_copy", b]


def test_byte_copy_has_every_live_neuron(copy_pair, tiny_store, tmp_path):
    cfg = CorrelateConfig(models=[str(copy_pair[0]), str(copy_pair[1])], tokens=str(tiny_store),
                          n_tokens=2048, batch_size=4, null_rotations=16)
    res = run_correlate(cfg, tmp_path / "run")
    df = res.neurons
    for col in ("p_value", "q_value", "is_universal_calibrated", "null_mean_corr", "null_sd_corr",
                "is_universal", "excess_corr"):
        assert col in df
    live = ~df["zero_var"]
    assert live.sum() > 0
    assert df.loc[live, "is_universal_calibrated"].all()
    assert not df.loc[~live, "is_universal_calibrated"].any()
    lay = res.layers
    assert {"universal", "universal_share", "universal_calibrated",
            "universal_calibrated_share"} <= set(lay.columns)
    assert lay["universal_calibrated"].sum() == int(live.sum())
    # the pair file keeps the null draws
    pair, _ = load_tensors(next((tmp_path / "run" / "pairs").glob("*.safetensors")), "pair")
    assert pair["null_max_corr"].shape == (16, len(df))


def test_two_seeds_paper_criterion_unchanged_and_qvalues_are_bh(copy_pair, tiny_store, tmp_path):
    base = dict(models=[str(copy_pair[0]), str(copy_pair[2])], tokens=str(tiny_store),
                n_tokens=2048, batch_size=4)
    with_null = run_correlate(CorrelateConfig(**base, null_rotations=8), tmp_path / "a").neurons
    paper = run_correlate(CorrelateConfig(**base, null_rotations=0), tmp_path / "b").neurons
    assert "p_value" not in paper
    for col in ("max_corr", "baseline_corr", "excess_corr", "is_universal"):
        pd.testing.assert_series_equal(with_null[col], paper[col])
    p = with_null["p_value"].to_numpy()
    ok = np.isfinite(p)
    np.testing.assert_allclose(with_null["q_value"].to_numpy()[ok],
                               stats.false_discovery_control(p[ok], method="bh"))
    # the same null draws in every run: keyed by the seed and the partner's weights
    r0 = rotation_for(0, "k", 1, 8, draw=3)
    assert torch.equal(r0, rotation_for(0, "k", 1, 8, draw=3))
    assert not torch.equal(r0, rotation_for(0, "k", 1, 8))


def test_planner_counts_the_null_and_refuses_few_rotations(monkeypatch):
    # at these tiny shapes the similarity/matching working memory is the largest temporary;
    # take it out so the null rotation's working copies are what the comparison sees
    monkeypatch.setattr("unineurons.correlate.extras.extras_work_bytes", lambda u, shapes: 0)
    shapes = [ModelShape(2, 64), ModelShape(2, 64)]
    free = plan_units(shapes, "reference", 10**10, 0)
    cal = plan_units(shapes, "reference", 10**10, 0, null_rotations=32)
    assert cal.persistent_bytes - free.persistent_bytes == null_bytes(shapes, "reference", 32)
    assert null_bytes(shapes, "reference", 32) == 32 * 128 * 8
    assert max(cal.work_bytes) > max(free.work_bytes)
    # once per run: the rotated block's GEMM and the partner's rotations, per draw
    assert null_flops(shapes, cal, 32) == 32 * (2.0 * 128 * 128 * 64 + 4.0 * 2 * 64 ** 3)
    assert null_flops(shapes, cal, 32, halves=2) == 3 * null_flops(shapes, cal, 32)
    with pytest.raises(ValueError, match="at least 8 null rotations"):
        CorrelateConfig(models=["a", "b"], tokens="t", null_rotations=3)
    with pytest.raises(ValueError):
        CorrelateConfig(models=["a", "b"], tokens="t", fdr=1.5)


# ---- both criteria downstream: ablation sets, dynamics, report, CLI ---------------------------

def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "layer": [0, 0, 0, 1, 1, 1], "neuron": [0, 1, 2, 0, 1, 2],
        "excess_corr": [0.6, 0.1, 0.2, 0.05, np.nan, 0.3],
        "is_universal": [True, False, False, False, False, False],
        "p_value": [1e-3, 1e-9, 0.5, 1e-9, np.nan, 0.2],
        "is_universal_calibrated": [True, True, False, True, False, False],
    })


def test_ablation_set_universal_calibrated():
    from unineurons.analyses.ablate import build_sets
    from unineurons.errors import UnineuronsError

    sets = build_sets(_table(), 2, 3, ["universal", "universal-calibrated"], [1, 2, "all", 5])
    cal = {s.size: s for s in sets if s.set == "universal-calibrated"}
    # by p-value; the tie at 1e-9 goes to the larger excess (0.1 > 0.05)
    assert cal["1"].neurons == ((0, 1),)
    assert cal["2"].neurons == ((0, 1), (1, 0))
    assert cal["all"].neurons == ((0, 0), (0, 1), (1, 0)) and cal["all"].n_requested == 3
    assert len(cal["5"].neurons) == 3 and cal["5"].n_requested == 5  # capped
    uni = {s.size: s for s in sets if s.set == "universal"}
    assert uni["all"].neurons == ((0, 0),)  # the paper's set is unchanged
    ranked = build_sets(_table(), 2, 3, ["universal-calibrated"], [4], rank_all=True)
    assert ranked[0].neurons == ((0, 0), (0, 1), (1, 0), (1, 2))  # every neuron with a p-value
    with pytest.raises(UnineuronsError, match="null-rotations"):
        build_sets(_table().drop(columns=["p_value"]), 2, 3, ["universal-calibrated"], [1])


def test_dynamics_rule_calibrated():
    from unineurons.analyses.dynamics_tables import parse_universal, universal_mask
    from unineurons.errors import UnineuronsError

    t = _table()
    assert parse_universal("calibrated") == ("calibrated", None)
    got = universal_mask(t.excess_corr.to_numpy(), t.layer.to_numpy(), t.neuron.to_numpy(),
                         "calibrated", 0.5, t.is_universal_calibrated)
    np.testing.assert_array_equal(got, t.is_universal_calibrated.to_numpy())
    paper = universal_mask(t.excess_corr.to_numpy(), t.layer.to_numpy(), t.neuron.to_numpy(),
                           "threshold", 0.5, t.is_universal_calibrated)
    np.testing.assert_array_equal(paper, t.is_universal.to_numpy())
    with pytest.raises(UnineuronsError, match="null-rotations"):
        universal_mask(t.excess_corr.to_numpy(), t.layer.to_numpy(), t.neuron.to_numpy(),
                       "calibrated", 0.5)


def test_report_and_cli_show_both_criteria(copy_pair, tiny_store, tmp_path):
    from typer.testing import CliRunner

    from unineurons.cli import app
    from unineurons.report.plots_corr import _universal_share, layer_summary
    from unineurons.report.tables import Tables
    from unineurons.rundir import RunDir

    out = tmp_path / "run"
    r = CliRunner().invoke(app, [
        "correlate", "-m", str(copy_pair[0]), "-m", str(copy_pair[2]), "--tokens", str(tiny_store),
        "--out", str(out), "--n-tokens", "2048", "--batch-size", "4", "--null-rotations", "8",
        "--split-half"])
    assert r.exit_code == 0, r.output
    assert "calibrated" in r.output and "by the paper's threshold" in r.output
    assert "split half of" in r.output and "Jaccard" in r.output
    run = RunDir.open(out)
    n, lay = run.read_table("neurons"), run.read_table("layers")
    s = layer_summary(n).set_index("layer")
    np.testing.assert_array_equal(s["universal_calibrated"], lay.set_index("layer")["universal_calibrated"])
    np.testing.assert_array_equal(s["universal_calibrated"],
                                  n.groupby("layer")["is_universal_calibrated"].sum())
    drawn = _universal_share(Tables(run), {})
    assert "calibrated (Benjamini-Hochberg" in drawn.caption and "They differ because" in drawn.caption
    assert f"({int(n.is_universal_calibrated.sum())} in all)" in drawn.caption
    bad = CliRunner().invoke(app, [
        "correlate", "-m", str(copy_pair[0]), "-m", str(copy_pair[2]), "--tokens", str(tiny_store),
        "--out", str(tmp_path / "bad"), "--null-rotations", "3"])
    assert bad.exit_code != 0 and not (tmp_path / "bad").exists()
