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
    from unineurons import api

    off = api.correlate(paths, tiny_store, tmp_path / "off", similarity=False,
                        **{k: v for k, v in kw.items() if k not in ("models", "tokens")}).result
    assert off.run.manifest()["correlate"]["config"]["similarity"] is False
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


def test_calibrated_share_per_partner_kind(tmp_path, make_gpt2, tiny_store, capsys):
    """A byte copy of the reference as its same-init partner: every live neuron is calibrated
    universal against that kind; the random other-init models give (almost) none. With every
    partner declared one kind, the per-kind counts are the run's own is_universal_calibrated."""
    import json
    import shutil

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
    from unineurons.report.figures import make_figures
    from unineurons.rundir import RunDir

    drawn, _ = make_figures(RunDir.open(tmp_path / "run"), ("png",), 40, only=["partner_kinds"])
    assert "calibrated L0 100.0%, L1 100.0%" in drawn[0].caption  # same-init: the copy
    from unineurons.cli import main

    with pytest.raises(SystemExit) as e:
        main(["zoo", "partner-kinds", str(tmp_path / "run")])
    assert e.value.code in (0, None)
    assert "calibrated 100.0%" in capsys.readouterr().out
    # the kind's test is the run's own calibrated test on that kind's partners only: a run
    # of the reference against the two other-init models alone (their rotations are keyed by
    # the weights, so the null is the same) gives the same p-values
    from unineurons.correlate.partner_kinds import kind_calibrated_neurons

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


# ---- report figures under both criteria (hand-made tables with the documented columns) -----

SETS = {"universal": 0.30, "universal-calibrated": 0.20, "non-universal": 0.05, "random": 0.02}


def _ablation_rows(rng, extra: dict | None = None) -> list[dict]:
    rows = []
    for name, per in SETS.items():
        for n in (1, 4):
            for draw in range(2 if name == "random" else 1):
                dl = per * n + 0.01 * draw
                rows.append({"model": "m0", "set": name, "method": "zero", "layer": -1,
                             "size": str(n), "draw": draw, "n_requested": n, "n_ablated": n,
                             "delta_loss": dl, "kl": dl, "efficiency": dl / n,
                             "delta_loss_boot": list(dl + rng.normal(0, 0.02, 64)),
                             **(extra or {})})
    return rows


@pytest.fixture
def fig_run(tmp_path):
    from unineurons.rundir import RunDir

    rng = np.random.default_rng(0)
    run = RunDir.create(tmp_path / "run")
    run.update_manifest(models=[{"spec": "m0"}], correlate={"config": {"threshold": 0.5}},
                        dynamics={"reference": "seed0", "universal": {"rule": "top",
                                                                      "share": 0.05}})
    run.write_table("ablations", pd.DataFrame(_ablation_rows(rng)))
    run.write_table("dynamics_ablations", pd.DataFrame(
        [r | {"step": s, "member": "seed0"} for s in (10, 20) for r in _ablation_rows(rng)]))
    em = []
    for s, (u, c) in zip((10, 20), ((2, 8), (4, 16)), strict=True):
        for layer in (0, 1):
            em.append({"step": s, "member": "seed0", "model": "m0", "layer": layer,
                       "neurons": 64, "universal": u + layer, "universal_share": (u + layer) / 64,
                       "universal_calibrated": c, "universal_calibrated_share": c / 64})
    run.write_table("emergence", pd.DataFrame(em))
    run.write_table("split_half", pd.DataFrame({
        "model": "m0", "layer": [0, 1], "neurons": 64, "kept_tokens_h0": 1000,
        "kept_tokens_h1": 990, "universal_h0": [3, 0], "universal_h1": [5, 0],
        "jaccard": [0.6, np.nan], "universal_calibrated_h0": [10, 12],
        "universal_calibrated_h1": [9, 14], "jaccard_calibrated": [0.8, 0.75],
        "excess_corr_r": [0.91, 0.82], "max_corr_r": [0.95, 0.9]}))
    return run


def _draw(run, fig_id):
    from unineurons.report import figures as F
    from unineurons.report.figures import STYLE, Tables, make_figures

    make_figures(run, ("png",), 40, only=[fig_id])  # registers every figure, writes the file
    assert (run.figures_dir / f"{fig_id}.png").is_file()
    spec = next(s for s in F.FIGURES if s.id == fig_id)
    import matplotlib

    with matplotlib.rc_context(STYLE):
        return spec.fn(Tables(run), {})


def _errorbars(fig) -> dict:
    from matplotlib.container import ErrorbarContainer

    return {c.get_label(): c for ax in fig.axes for c in ax.containers
            if isinstance(c, ErrorbarContainer)}


def test_ablation_figures_draw_the_calibrated_set_with_intervals(fig_run):
    from unineurons.report.plots_effects import ablation_summary

    d = _draw(fig_run, "ablation_curves")
    bars = _errorbars(d.fig)
    assert "universal-calibrated" in bars and bars["universal-calibrated"].has_yerr
    s = ablation_summary(fig_run.read_table("ablations"))
    c = s[s["set"] == "universal-calibrated"].sort_values("n_ablated")
    assert c["delta_loss_lo"].notna().all()
    want = ", ".join(f"{x:g}→{y:+.3g} [{lo:+.3g}, {hi:+.3g}]" for x, y, lo, hi in
                     zip(c["n_ablated"], c["delta_loss"], c["delta_loss_lo"], c["delta_loss_hi"],
                         strict=True))
    assert f"zero universal-calibrated: {want}" in d.caption
    assert "universal-calibrated: the calibrated universal set" in d.caption
    eff = _draw(fig_run, "ablation_efficiency")
    labels = [t for ax in eff.fig.axes for t in ax.get_legend_handles_labels()[1]]
    assert "universal-calibrated" in labels
    assert "whole model universal-calibrated: 1→0.2, 4→0.2" in eff.caption


def test_dynamics_figures_show_both_criteria(fig_run):
    d = _draw(fig_run, "dynamics_ablations")
    bars = _errorbars(d.fig)
    assert {"universal", "universal-calibrated"} <= set(bars)
    assert bars["universal-calibrated"].has_yerr
    assert "universal-calibrated: step 10 n=4 +0.8 [" in d.caption
    e = _draw(fig_run, "dynamics_emergence")
    labels = e.fig.axes[0].get_legend_handles_labels()[1]
    assert "L0 (calibrated)" in labels and "L1 (top 5% by excess)" in labels
    assert "Dashed: the calibrated criterion" in e.caption
    assert "L1: 10→12.5%, 20→25.0%" in e.caption  # calibrated 8/64, 16/64
    assert "L1: 10→4.7%, 20→7.8%" in e.caption  # the rule's U_t: 3/64, 5/64


def test_split_half_figure(fig_run, tmp_path):
    d = _draw(fig_run, "split_half")
    ax = d.fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [0.0, 0.6, 0.75, 0.8]  # NaN (both halves empty) is no bar
    assert "Jaccard L0 0.60, L1 n/a" in d.caption and "Jaccard L0 0.80, L1 0.75" in d.caption
    assert "excess correlation L0 0.91, L1 0.82" in d.caption
    assert "L0 10/9, L1 12/14" in d.caption
    from unineurons.report.figures import make_figures
    from unineurons.rundir import RunDir

    bare = RunDir.create(tmp_path / "bare")
    bare.update_manifest(models=[{"spec": "m0"}])
    bare.write_table("emergence", fig_run.read_table("emergence"))
    _, skipped = make_figures(bare, ("png",), 40, only=["split_half"])
    assert "unineurons correlate --split-half" in skipped[0].reason


def test_report_summary_shows_both_criteria_side_by_side(tmp_path):
    """The header lists paper and calibrated universal counts, role counts under both rules
    and the sentence on why they differ; run text is escaped."""
    import html as _html

    from unineurons.cli.correlate import CRITERIA_NOTE
    from unineurons.rundir import RunDir

    spec = "m<i>&0"
    run = RunDir.create(tmp_path / "run")
    run.update_manifest(models=[{"spec": spec}], correlate={"config": {
        "threshold": 0.5, "fdr": 0.01, "null_rotations": 32}})
    run.write_table("neurons", pd.DataFrame({
        "model": spec, "layer": [0, 0, 1, 1], "neuron": [0, 1, 0, 1],
        "max_corr": [0.9, 0.4, 0.6, 0.3], "excess_corr": [0.6, 0.1, 0.3, 0.0],
        "is_universal": [True, False, False, False],
        "is_universal_calibrated": [True, False, True, False],
        "role_paper": ["partition", "partition", "prediction", "none"],
        "role_calibrated": ["prediction", "none", "none", "none"]}))
    rep = build_report(run.path, ReportConfig(figures=False, browser=False, models=False))
    page = rep.index.read_text()
    esc = _html.escape(spec, quote=False)
    assert "<i>" not in page and esc in page
    assert f"<dt>universal neurons of {esc}</dt><dd>1 of 4 (25.00%)" in page
    assert (f"<dt>calibrated universal neurons of {esc}</dt><dd>2 of 4 (50.00%), BH q &lt; 0.01 "
            "against each neuron&#39;s null of 32 seeded rotations</dd>") in page
    assert f"<dt>roles of {esc}, paper thresholds</dt><dd>partition 2, prediction 1</dd>" in page
    assert (f"<dt>roles of {esc}, calibrated (beyond random directions)</dt><dd>prediction 1"
            "</dd>") in page
    assert "<dt>why the criteria differ</dt>" in page
    from markupsafe import escape

    assert str(escape(CRITERIA_NOTE[1:])) in page


def test_similarity_option_reaches_cli_plan_and_pipeline(tmp_path, make_gpt2, monkeypatch, capsys):
    from unineurons import pipeline
    from unineurons.cli import main
    from unineurons.correlate import engine

    paths = [str(make_gpt2(tmp_path / f"s{i}", 60 + i)) for i in range(2)]
    seen = []
    import unineurons.correlate.plan as plan_mod

    real = plan_mod.plan_units
    monkeypatch.setattr(engine, "plan_units", lambda *a, **k: seen.append(k["similarity"])
                        or real(*a, **k))
    for flag in ("--similarity", "--no-similarity"):
        with pytest.raises(SystemExit) as e:
            main(["plan", "-m", paths[0], "-m", paths[1], "--n-tokens", "4096", "--ctx", "64",
                  "--flops-per-s", "1e9", flag])
        assert e.value.code in (0, None)
    assert seen == [True, False]
    capsys.readouterr()
    # a pipeline's [correlate] section: similarity = false reaches the correlate config
    cfg = pipeline.PipelineConfig(zoo={"seeds": [0, 1]}, correlate={"similarity": False})
    monkeypatch.setattr(pipeline, "zoo_models", lambda zoo_dir, seeds, step: paths)
    got = []
    monkeypatch.setattr(engine, "run_correlate", lambda cc, out, resume: got.append(cc))
    pipeline._correlate(cfg, tmp_path / "zoo", tmp_path / "held", tmp_path / "run")
    assert got[0].similarity is False
    assert pipeline.PipelineConfig(zoo={"seeds": [0, 1]}, correlate={}).correlate.similarity


def test_emergence_keeps_the_paper_count_and_the_figure_draws_it(tmp_path):
    from unineurons.analyses.dynamics_tables import emergence_table
    from unineurons.rundir import RunDir

    layers = pd.DataFrame({"step": [10, 10, 20, 20], "member": "seed0", "model": "m0",
                           "layer": [0, 1, 0, 1], "neurons": 4, "universal": [0, 1, 2, 1],
                           "universal_share": [0.0, 0.25, 0.5, 0.25],
                           "universal_calibrated": [1, 1, 3, 2],
                           "universal_calibrated_share": [0.25, 0.25, 0.75, 0.5]})
    rng = np.random.default_rng(1)
    marked = pd.DataFrame([{"step": s, "member": "seed0", "layer": la, "neuron": j,
                            "is_universal": bool(rng.random() < 0.5)}
                           for s in (10, 20) for la in (0, 1) for j in range(4)])
    em = emergence_table(layers, marked)
    np.testing.assert_array_equal(em["universal_paper"], layers["universal"])
    np.testing.assert_allclose(em["universal_paper_share"], layers["universal"] / 4)
    recount = marked.groupby(["step", "layer"])["is_universal"].sum().to_numpy()
    np.testing.assert_array_equal(em["universal"], recount)
    run = RunDir.create(tmp_path / "run")
    run.update_manifest(models=[{"spec": "m0"}], dynamics={
        "reference": "seed0", "universal": {"rule": "calibrated", "fdr": 0.01}})
    run.write_table("emergence", em)
    e = _draw(run, "dynamics_emergence")
    labels = e.fig.axes[0].get_legend_handles_labels()[1]
    assert "L0 (paper)" in labels and "L0 (calibrated (q < 0.01))" in labels
    assert not any(lab.endswith("(calibrated)") for lab in labels)  # the rule itself
    assert "Dotted: the paper's criterion" in e.caption and "L0: 10→0.0%, 20→50.0%" in e.caption


def test_dynamics_passes_similarity_to_each_step():
    from unineurons.analyses.dynamics import DynamicsConfig, correlate_config

    kw = dict(model_template="o/{name}@c-{step}", names=["a", "b"], steps=[10], tokens="T")
    assert correlate_config(DynamicsConfig(**kw), ["x", "y"]).similarity is True
    assert correlate_config(DynamicsConfig(**kw, similarity=False), ["x", "y"]).similarity is False


def test_demo_config_shows_both_criteria():
    from unineurons.pipeline import builtin_config, load_config

    cfg = load_config(text=builtin_config("demo"))
    assert cfg.correlate.null_rotations > 0 and cfg.correlate.split_half
    assert "universal-calibrated" in cfg.ablate.sets
    assert "universal-calibrated" in cfg.dynamics.ablate.sets
    assert cfg.dynamics.null_rotations > 0
