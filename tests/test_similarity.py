"""Layer similarity (linear CKA, its Gaussian debiasing, ridge R² and the neuron basis) against
direct numpy computations on raw activations; end to end through a correlate run."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.correlate.similarity import cka_from_cov, layer_pair_similarity
from unineurons.models.load import load_model
from unineurons.stream import activation_stream
from unineurons.tokens import TokenStore

N_TOK = 2048


def _cov(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((x - x.mean(0)).T @ (y - y.mean(0)))


def _direct_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s linear CKA on centred activations (n x n Gram matrices)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l_ = xc @ xc.T, yc @ yc.T
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def _pair(rng, n, da=6, db=5, mix=0.7):
    z = rng.standard_normal((n, 3))
    x = np.concatenate([z, rng.standard_normal((n, da - 3))], 1) @ rng.standard_normal((da, da)) + 4.0
    y = np.concatenate([z @ rng.standard_normal((3, 3)) * mix, rng.standard_normal((n, db - 3))], 1)
    return x, y + rng.standard_normal((n, db)) * 0.5 - 7.0


def test_cka_matches_gram_matrix_definition():
    rng = np.random.default_rng(0)
    x, y = _pair(rng, 300)
    cka, _ = cka_from_cov(_cov(x, y), _cov(x, x), _cov(y, y), 300)
    assert cka == pytest.approx(_direct_cka(x, y), rel=1e-10)
    same, _ = cka_from_cov(_cov(x, x), _cov(x, x), _cov(x, x), 300)
    assert same == pytest.approx(1.0)
    # invariant to an orthogonal transform and an isotropic scale of either side
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    cka2, _ = cka_from_cov(_cov(x, 3 * y @ q), _cov(x, x), _cov(3 * y @ q, 3 * y @ q), 300)
    assert cka2 == pytest.approx(cka, rel=1e-10)


def test_debiased_cka_removes_the_small_sample_bias_for_gaussian_data():
    """Independent Gaussian layers: the plain estimator is biased up by about d/n, the debiased
    one averages to 0; dependent ones: the debiased mean is near the population CKA."""
    rng = np.random.default_rng(1)
    d, n, reps = 20, 60, 400
    plain, deb = [], []
    for _ in range(reps):
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        c, cd = cka_from_cov(_cov(x, y), _cov(x, x), _cov(y, y), n)
        plain.append(c)
        deb.append(cd)
    assert np.mean(plain) > 0.2
    assert abs(np.mean(deb)) < 0.02
    # dependent layers with a known population: y = x A + noise, population CKA from Σ
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    s_ab = a  # Cov(x, y) with Σ_xx = I
    s_bb = a.T @ a + np.eye(d)
    pop = (s_ab ** 2).sum() / np.sqrt(d * (s_bb ** 2).sum())
    plain, deb = [], []
    for _ in range(reps):
        x = rng.standard_normal((n, d))
        y = x @ a + rng.standard_normal((n, d))
        c, cd = cka_from_cov(_cov(x, y), _cov(x, x), _cov(y, y), n)
        plain.append(c)
        deb.append(cd)
    assert abs(np.mean(deb) - pop) < 0.03 < abs(np.mean(plain) - pop)


def _direct_ridge(x, y, lam):
    """Ridge of standardised y on standardised x with penalty lam (per token, as in the
    module), by lstsq on the augmented system; returns (in-sample R², GCV R²) means."""
    n = x.shape[0]
    xs = (x - x.mean(0)) / x.std(0)
    ys = (y - y.mean(0)) / y.std(0)
    aug_x = np.concatenate([xs, np.sqrt(n * lam) * np.eye(x.shape[1])])
    aug_y = np.concatenate([ys, np.zeros((x.shape[1], y.shape[1]))])
    beta = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    rss = ((ys - xs @ beta) ** 2).sum(0) / n
    hat = xs @ np.linalg.solve(xs.T @ xs + n * lam * np.eye(x.shape[1]), xs.T)
    df = np.trace(hat) + 1.0  # + the intercept
    return float((1 - rss).mean()), float((1 - rss / (1 - df / n) ** 2).mean())


def test_ridge_and_neuron_r2_match_direct_regressions():
    rng = np.random.default_rng(2)
    n = 400
    x, y = _pair(rng, n, da=8, db=6)
    rot = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    res = layer_pair_similarity(_cov(x, y), _cov(x, x), _cov(y, y), n, rot_a=rot)
    r2_in, r2_gcv = _direct_ridge(x, y, res["ridge_lambda_ab"])
    assert res["ridge_r2_in_ab"] == pytest.approx(r2_in, abs=1e-9)
    assert res["ridge_r2_ab"] == pytest.approx(r2_gcv, abs=1e-9)
    r2_in, r2_gcv = _direct_ridge(y, x, res["ridge_lambda_ba"])
    assert res["ridge_r2_ba"] == pytest.approx(r2_gcv, abs=1e-9)
    # GCV picks the best lambda of the grid: no grid value does better by the direct formula
    from unineurons.correlate.similarity import LAMBDAS

    assert r2_gcv >= max(_direct_ridge(y, x, lam)[1] for lam in LAMBDAS) - 1e-9
    rho = np.corrcoef(x.T, y.T)[:8, 8:]
    assert res["neuron_r2_ab"] == pytest.approx((rho ** 2).max(0).mean(), abs=1e-12)
    assert res["neuron_r2_ba"] == pytest.approx((rho ** 2).max(1).mean(), abs=1e-12)
    xr = x @ rot.numpy()
    rr = np.corrcoef(xr.T, y.T)[:8, 8:]
    assert res["rotated_r2_ab"] == pytest.approx((rr ** 2).max(0).mean(), abs=1e-12)
    assert res["neuron_r2_ab"] <= res["ridge_r2_in_ab"] + 1e-12  # one neuron never beats all


def test_constant_neuron_is_left_out():
    rng = np.random.default_rng(3)
    x, y = _pair(rng, 200)
    y[:, 2] = 1.5
    res = layer_pair_similarity(_cov(x, y), _cov(x, x), _cov(y, y), 200)
    keep = [0, 1, 3, 4]
    rho = np.corrcoef(x.T, y[:, keep].T)[:6, 6:]
    assert res["neuron_r2_ab"] == pytest.approx((rho ** 2).max(0).mean(), abs=1e-12)
    assert np.isfinite(res["ridge_r2_ba"])


# ---- end to end --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_models(tmp_path_factory, make_gpt2):
    root = tmp_path_factory.mktemp("sim_seeds")
    paths = [make_gpt2(root / f"s{i}", 10 + i) for i in range(3)]
    shutil.copytree(paths[0], root / "s0_copy")
    return paths + [root / "s0_copy"]


def _captured(paths, store_path):
    store = TokenStore.open(store_path)
    models = [load_model(str(p)) for p in paths]
    out = [[] for _ in models]
    for b in activation_stream(models, store.contexts(N_TOK), store.manifest["tokenizer"],
                               batch_size=5):
        for i, a in enumerate(b.acts):
            out[i].append(a.double().numpy())
    return [np.concatenate(x) for x in out]


def test_layer_similarity_table_matches_raw_activations(sim_models, tiny_store, tmp_path):
    paths = sim_models[:3]
    cfg = CorrelateConfig(models=[str(p) for p in paths], tokens=str(tiny_store), n_tokens=N_TOK,
                          batch_size=4, dtype="float64", pairs="all", memory_budget="40MB",
                          checkpoint_tokens=10**9)
    res = run_correlate(cfg, tmp_path / "run")
    assert len(res.plan.passes) >= 1
    sim = pd.read_parquet(tmp_path / "run" / "layer_similarity.parquet")
    acts = _captured(paths, tiny_store)
    d = 64
    assert len(sim) == 3 * 2 * 2 * 2  # 3 unordered pairs x both directions x 2 x 2 layers
    for a in range(3):
        for b in range(3):
            if a == b:
                continue
            for la in range(2):
                for lb in range(2):
                    x = acts[a][:, la * d:(la + 1) * d]
                    y = acts[b][:, lb * d:(lb + 1) * d]
                    row = sim[(sim.model == str(paths[a])) & (sim.partner == str(paths[b]))
                              & (sim.layer == la) & (sim.partner_layer == lb)]
                    assert len(row) == 1
                    row = row.iloc[0]
                    assert row.cka == pytest.approx(_direct_cka(x, y), rel=1e-8)
                    ok = y.std(0) > 0
                    rho = np.corrcoef(x[:, x.std(0) > 0].T, y[:, ok].T)[:int((x.std(0) > 0).sum()), :]
                    rho = rho[:, -int(ok.sum()):]
                    assert row.neuron_r2 == pytest.approx((rho ** 2).max(0).mean(), abs=1e-8)
                    assert row.neuron_r2 <= row.ridge_r2_in_sample + 1e-9
    # the same model twice: CKA 1, every neuron its own best predictor
    res2 = run_correlate(CorrelateConfig(models=[str(sim_models[0]), str(sim_models[3])],
                                         tokens=str(tiny_store), n_tokens=N_TOK, batch_size=4,
                                         dtype="float64"), tmp_path / "run2")
    assert res2.neurons is not None
    same = pd.read_parquet(tmp_path / "run2" / "layer_similarity.parquet")
    diag = same[same.layer == same.partner_layer]
    np.testing.assert_allclose(diag.cka, 1.0, atol=1e-9)
    np.testing.assert_allclose(diag.neuron_r2, 1.0, atol=1e-9)
    m = pd.read_parquet(tmp_path / "run2" / "matches.parquet")
    assert (m.assigned_neuron == m.neuron).all() and m.mutual_best.all()
    assert m.mutual_best_baseline.mean() < 1.0  # a rotated copy is not the same basis
