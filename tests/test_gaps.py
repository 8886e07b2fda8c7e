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
