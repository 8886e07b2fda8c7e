"""One-to-one matching (Hungarian) and mutual best matches against direct scipy / loops."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.correlate.matching import assign, mutual_best, unit_matching
from unineurons.correlate.rotation import rotation_for
from unineurons.models.load import load_model
from unineurons.stream import activation_stream
from unineurons.tokens import TokenStore


def _brute_mutual(rho):
    rows = np.zeros(rho.shape[0], bool)
    cols = np.zeros(rho.shape[1], bool)
    f = np.where(np.isfinite(rho), rho, -np.inf)
    for i in range(rho.shape[0]):
        if not np.isfinite(rho[i]).any():
            continue
        j = int(np.argmax(f[i]))
        if int(np.argmax(f[:, j])) == i:
            rows[i] = cols[j] = True
    return rows, cols


@settings(max_examples=40, deadline=None)
@given(da=st.integers(1, 6), db=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_assignment_is_the_optimum_and_mutual_best_matches_loops(da, db, seed):
    rng = np.random.default_rng(seed)
    rho = np.tanh(rng.standard_normal((da, db)))
    rc, rcorr, cr, ccorr = assign(rho)
    r, c = linear_sum_assignment(rho, maximize=True)
    assert rho[r, c].sum() == pytest.approx(rcorr[rcorr == rcorr].sum(), abs=1e-12)
    assert (rc >= 0).sum() == min(da, db) == (cr >= 0).sum()
    for i in range(da):  # the two directions are inverse to each other
        if rc[i] >= 0:
            assert cr[rc[i]] == i and rcorr[i] == ccorr[rc[i]] == rho[i, rc[i]]
    if max(da, db) <= 5:  # and optimal over every one-to-one map (brute force)
        best = max(sum(rho[i, p[i]] for i in range(min(da, db))) if da <= db else
                   sum(rho[p[j], j] for j in range(db))
                   for p in itertools.permutations(range(max(da, db))))
        assert rcorr[rc >= 0].sum() == pytest.approx(best, abs=1e-12)
    rows, cols = mutual_best(torch.from_numpy(rho))
    br, bc = _brute_mutual(rho)
    np.testing.assert_array_equal(rows.numpy(), br)
    np.testing.assert_array_equal(cols.numpy(), bc)
    assert rows.sum() == cols.sum() >= 1  # the global maximum is always mutual


def test_nan_correlations_are_never_assigned():
    rho = np.array([[0.9, np.nan, 0.1], [np.nan, np.nan, np.nan], [0.2, np.nan, 0.8]])
    rc, rcorr, cr, ccorr = assign(rho)
    assert list(rc) == [0, -1, 2] and list(cr) == [0, -1, 2]
    assert np.isnan(rcorr[1]) and np.isnan(ccorr[1])
    rows, cols = mutual_best(torch.from_numpy(rho))
    assert rows.tolist() == [True, False, True] and cols.tolist() == [True, False, True]


def test_unit_matching_against_direct_computation():
    rng = np.random.default_rng(5)
    n, L, da, db = 300, 2, 5, 4
    x = rng.standard_normal((n, L * da))
    y = np.concatenate([x[:, :3] + 0.3 * rng.standard_normal((n, 3)),
                        rng.standard_normal((n, L * db - 3))], 1)
    x[:, 7] = 2.0  # constant neuron in layer 1 of a
    xc, yc = x - x.mean(0), y - y.mean(0)
    cov_a = torch.from_numpy(np.stack([xc[:, i * da:(i + 1) * da].T @ xc[:, i * da:(i + 1) * da]
                                       for i in range(L)]))
    cov_b = torch.from_numpy(np.stack([yc[:, i * db:(i + 1) * db].T @ yc[:, i * db:(i + 1) * db]
                                       for i in range(L)]))
    rot_a = [rotation_for(0, "a", i, da) for i in range(L)]
    rot_b = [rotation_for(0, "b", i, db) for i in range(L)]
    c = torch.from_numpy(xc.T @ yc)
    out = unit_matching(c, torch.tensor(float(n)), 0, L, cov_a, cov_b, rot_a, rot_b)
    for la in range(L):
        xa, yb = x[:, la * da:(la + 1) * da], y[:, la * db:(la + 1) * db]
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.corrcoef(xa.T, yb.T)[:da, da:]
            base_r = np.corrcoef(xa.T, ((yb - yb.mean(0)) @ rot_b[la].numpy()).T)[:da, da:]
            base_c = np.corrcoef(((xa - xa.mean(0)) @ rot_a[la].numpy()).T, yb.T)[:da, da:]
        fin = np.where(np.isfinite(rho), rho, -2.0)
        r, cc = linear_sum_assignment(fin, maximize=True)
        exp = np.full(da, -1)
        exp[r] = cc
        exp[~np.isfinite(rho).any(1)] = -1
        got = out["row_assigned"][la * da:(la + 1) * da].numpy()
        np.testing.assert_array_equal(got, exp)
        np.testing.assert_allclose(out["row_assigned_corr"][la * da:(la + 1) * da].numpy()[got >= 0],
                                   rho[np.arange(da)[got >= 0], got[got >= 0]], atol=1e-12)
        br, bc = _brute_mutual(rho)
        np.testing.assert_array_equal(out["row_mutual"][la * da:(la + 1) * da].numpy(), br)
        np.testing.assert_array_equal(out["col_mutual"][la * db:(la + 1) * db].numpy(), bc)
        np.testing.assert_array_equal(out["row_mutual_base"][la * da:(la + 1) * da].numpy(),
                                      _brute_mutual(base_r)[0])
        np.testing.assert_array_equal(out["col_mutual_base"][la * db:(la + 1) * db].numpy(),
                                      _brute_mutual(base_c)[1])


def test_matches_columns_end_to_end(tmp_path_factory, make_gpt2, tiny_store):
    root = tmp_path_factory.mktemp("match_seeds")
    paths = [make_gpt2(root / f"s{i}", 20 + i) for i in range(2)]
    shutil.copytree(paths[0], root / "copy")
    n_tok = 1024
    cfg = CorrelateConfig(models=[str(p) for p in paths], tokens=str(tiny_store), n_tokens=n_tok,
                          batch_size=4, dtype="float64", pairs="all", checkpoint_tokens=10**9)
    out_dir = tmp_path_factory.mktemp("mrun") / "run"
    run_correlate(cfg, out_dir)
    store = TokenStore.open(tiny_store)
    models = [load_model(str(p)) for p in paths]
    acts = [[], []]
    for b in activation_stream(models, store.contexts(n_tok), store.manifest["tokenizer"], batch_size=5):
        for i, a in enumerate(b.acts):
            acts[i].append(a.double().numpy())
    x, y = (np.concatenate(a) for a in acts)
    m = pd.read_parquet(out_dir / "matches.parquet")
    layers = pd.read_parquet(out_dir / "layers.parquet")
    d = 64
    for la in range(2):
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.corrcoef(x[:, la * d:(la + 1) * d].T, y[:, la * d:(la + 1) * d].T)[:d, d:]
        r, c = linear_sum_assignment(np.where(np.isfinite(rho), rho, -2.0), maximize=True)
        fwd = m[(m.model == str(paths[0])) & (m.layer == la)].sort_values("neuron")
        bwd = m[(m.model == str(paths[1])) & (m.layer == la)].sort_values("neuron")
        np.testing.assert_array_equal(fwd.assigned_neuron.to_numpy()[r], c)
        np.testing.assert_array_equal(bwd.assigned_neuron.to_numpy()[c], r)
        br, bc = _brute_mutual(rho)
        np.testing.assert_array_equal(fwd.mutual_best.to_numpy(bool), br)
        np.testing.assert_array_equal(bwd.mutual_best.to_numpy(bool), bc)
        lay = layers[(layers.model == str(paths[0])) & (layers.layer == la)].iloc[0]
        assert lay.mutual_best_share == pytest.approx(br.mean())
        assert 0 <= lay.baseline_mutual_best_share <= 1
