"""Gaps closed after the merge of the calibrated criteria and the extra analyses: the
``--no-similarity`` switch, the calibrated share per partner kind, the report figures under both
universality criteria and the split-half figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.correlate.plan import ModelShape, plan_units
from unineurons.report import ReportConfig, build_report

MATCH_COLS = ("assigned_neuron", "assigned_corr", "mutual_best", "mutual_best_baseline")


def test_no_similarity_skips_cka_and_matching_and_the_report_builds(tmp_path, make_gpt2,
                                                                     tiny_store):
    paths = [str(make_gpt2(tmp_path / f"s{i}", 40 + i)) for i in range(2)]
    kw = dict(models=paths, tokens=str(tiny_store), n_tokens=1024, batch_size=4,
              null_rotations=8, checkpoint_tokens=10**9)
    on = run_correlate(CorrelateConfig(**kw), tmp_path / "on")
    assert (on.run.path / "layer_similarity.parquet").is_file()
    assert set(MATCH_COLS) <= set(pd.read_parquet(on.run.path / "matches.parquet").columns)
    off = run_correlate(CorrelateConfig(**kw, similarity=False), tmp_path / "off")
    assert not (off.run.path / "layer_similarity.parquet").exists()
    m_off = pd.read_parquet(off.run.path / "matches.parquet")
    assert not set(MATCH_COLS) & set(m_off.columns)
    assert "mutual_best_share" not in pd.read_parquet(off.run.path / "layers.parquet").columns
    # everything else is the same numbers
    m_on = pd.read_parquet(on.run.path / "matches.parquet")
    np.testing.assert_allclose(m_off["max_corr"], m_on["max_corr"])
    n_on, n_off = (pd.read_parquet(r.run.path / "neurons.parquet") for r in (on, off))
    np.testing.assert_allclose(n_off["p_value"], n_on["p_value"])
    rep = build_report(off.run.path, ReportConfig(models=False, browser=False, formats=("png",)))
    assert rep.index.is_file()
    skipped = {s.id: s.reason for s in rep.skipped}
    assert "layer_cka" in skipped and "mutual_best" in skipped


def test_planner_stops_counting_similarity_memory(monkeypatch):
    """On real shapes a block's own bytes exceed the similarity/matching temporaries, so make
    those huge: counted with similarity on (the budget is too small), not counted off."""
    from unineurons.correlate import extras
    from unineurons.errors import UnineuronsError

    shapes = [ModelShape(n_layers=2, d_mlp=64, d_model=32)] * 2
    budget = 2**24
    off = plan_units(shapes, "reference", budget, 0, null_rotations=8, similarity=False)
    monkeypatch.setattr(extras, "extras_work_bytes", lambda u, s: 2**30)
    assert plan_units(shapes, "reference", budget, 0, null_rotations=8,
                      similarity=False).work_bytes == off.work_bytes
    with pytest.raises(UnineuronsError, match="memory budget"):
        plan_units(shapes, "reference", budget, 0, null_rotations=8, similarity=True)
    assert max(off.work_bytes) < 2**30


def test_calibrated_share_per_partner_kind(tmp_path, make_gpt2, tiny_store):
    """A byte copy of the reference as its same-init partner: every live neuron is calibrated
    universal against that kind; the random other-init models give (almost) none. With every
    partner declared one kind, the per-kind counts are the run's own is_universal_calibrated."""
    import json
    import shutil

    from unineurons.correlate.partner_kinds import write_partner_kinds

    ref = make_gpt2(tmp_path / "ref", 50)
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    others = [make_gpt2(tmp_path / f"o{i}", 51 + i) for i in range(2)]
    paths = [ref, copy, *others]
    for p, (i, d) in zip(paths, [(0, 0), (0, 1), (1, 0), (1, 1)], strict=True):
        (p / "member.json").write_text(json.dumps({"init_seed": i, "data_seed": d}))
    cfg = CorrelateConfig(models=[str(p) for p in paths], tokens=str(tiny_store), n_tokens=2048,
                          batch_size=4, null_rotations=16, fdr=0.05, similarity=False,
                          checkpoint_tokens=10**9)
    res = run_correlate(cfg, tmp_path / "run")
    pk = pd.read_parquet(tmp_path / "run" / "partner_kinds.parquet").set_index(
        ["partner_kind", "layer"])
    assert {"universal_calibrated", "universal_calibrated_share", "fdr"} <= set(pk.columns)
    n = res.neurons[res.neurons["model"] == str(ref)]
    live = (~n["zero_var"]).groupby(n["layer"]).sum()
    for layer in (0, 1):
        assert pk.loc[("same-init", layer), "universal_calibrated"] == live[layer]
        for kind in ("same-data", "both-different"):
            assert pk.loc[(kind, layer), "universal_calibrated_share"] <= 0.15
    # the kind's test is the run's own calibrated test on that kind's partners only: a run
    # of the reference against the two other-init models alone (their rotations are keyed by
    # the weights, so the null is the same) gives the same p-values
    from unineurons.correlate.partner_kinds import kind_calibrated_neurons
    from unineurons.rundir import RunDir

    alone = run_correlate(CorrelateConfig(**{**cfg.model_dump(), "models": [str(ref), *map(
        str, others)]}), tmp_path / "alone").neurons
    alone = alone[alone["model"] == str(ref)].sort_values(["layer", "neuron"])
    seeds = {str(ref): (0, 0), str(copy): (0, 1), str(others[0]): (1, 1), str(others[1]): (1, 2)}
    run = RunDir.open(tmp_path / "run")
    got = kind_calibrated_neurons(run, run.read_table("matches"), seeds, 0.05)
    got = got[(got["model"] == str(ref)) & (got["partner_kind"] == "both-different")]
    assert len(got) == len(alone) == 128
    np.testing.assert_allclose(got["p_value"], alone["p_value"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got["q_value"], alone["q_value"], rtol=1e-3, atol=1e-5)
    assert alone["p_value"].min() < 0.2 < alone["p_value"].max()  # not all at one end
