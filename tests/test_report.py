"""The report: figure data and captions against pandas on the tables, the browser's data, the
window activations against a direct forward pass, escaping, the CLI.

The run directory is made by the real stages (correlate, analyze, ablate, intervene) on three
tiny GPT-2 "seeds": seed 1 and 2 are seed 0 with the MLP neurons of every layer permuted (the
same function, so their matches are known) and some neurons re-drawn (so they are not
universal). Tables the stages leave empty on random models (entropy) or that another command
writes (dynamics) are made by hand with their documented columns, the dynamics ones through the
dynamics stage's own table functions. Token strings of the most universal neuron's contexts and
vocabulary carry HTML/JS payloads: the report must show them as text.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _apirun import BROKEN, D_MLP, permuted_models

from unineurons.errors import UnineuronsError
from unineurons.report import ReportConfig, build_report
from unineurons.report.browser import browser_data, context_neurons, round_sig, script_json
from unineurons.report.figures import Tables, layer_list, short_names
from unineurons.report.plots_corr import family_counts, layer_summary, role_counts
from unineurons.report.plots_dynamics import persistence_matrix
from unineurons.report.plots_effects import ablation_summary, family_examples, intervention_curves
from unineurons.report.windows import window_activations
from unineurons.rundir import RunDir

XSS = ["<script>window.__xss=1</script>", "<img src=x onerror=\"window.__xss=2\">",
       "</textarea><b>bold</b>", "</script><script>window.__xss=3</script>", "&amp; <!--"]
_CACHE: dict[str, Path] = {}


def _seed_models(root: Path, tokenizer: Path) -> list[str]:
    """Seed 0 and its permuted copies (safetensors + tokenizer folders): the same models as
    the API tests' (``_apirun.permuted_models``)."""
    return permuted_models(root, tokenizer)[0]


def _hand_tables(run: RunDir, ref: str, univ: pd.DataFrame) -> None:
    """entropy.parquet rows and the dynamics tables (through the dynamics table functions)."""
    from unineurons.analyses.dynamics_tables import (
        emergence_table,
        first_universal_table,
        persistence_table,
    )

    rows = []
    for kind, (layer, neuron), slope in (("candidate", (1, 5), -0.3), ("random", (1, 7), 0.01),
                                         ("random", (1, 9), -0.02)):
        for k in (0.0, 1.0, 2.0, 4.0):
            rows.append({"model": ref, "layer": layer, "neuron": neuron, "kind": kind,
                         "scale": 2.0, "value": 2.0 * k, "loss": 6.0 + 0.01 * k,
                         "entropy": 6.0 + slope * k, "delta_loss": 0.01 * k,
                         "delta_entropy": slope * k, "delta_final_norm_scale": -0.1 * k})
    run.write_table("entropy", pd.DataFrame(rows))
    # universal sets over three steps: the final set grows from a persistent core
    n = pd.read_parquet(run.table_path("neurons"))
    n = n[n["model"] == ref]
    final = set(zip(univ["layer"], univ["neuron"], strict=True))
    marked, layers = [], []
    for i, step in enumerate((10, 20, 30)):
        keep = {x for j, x in enumerate(sorted(final)) if j % 3 < i + 1}
        for r in n.itertuples():
            marked.append({"step": step, "member": "seed0", "layer": r.layer, "neuron": r.neuron,
                           "is_universal": (r.layer, r.neuron) in keep,
                           "excess_corr": r.excess_corr * (i + 1) / 3})
        for layer in (0, 1):
            layers.append({"step": step, "member": "seed0", "model": ref, "layer": layer,
                           "neurons": D_MLP})
    marked = pd.DataFrame(marked)
    first = first_universal_table(marked)
    run.write_table("emergence", emergence_table(pd.DataFrame(layers), marked))
    run.write_table("persistence", persistence_table(marked))
    run.write_table("trajectories", marked.merge(first[["member", "layer", "neuron",
                                                        "universal_final"]]))


def _inject_xss(run: RunDir, ref: str, layer: int, neuron: int) -> None:
    """Put HTML/JS payloads into the token strings of a neuron's contexts and vocabulary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tc = pq.read_table(run.table_path("top_contexts")).to_pandas()
    hit = (tc["model"] == ref) & (tc["layer"] == layer) & (tc["neuron"] == neuron)
    for i in np.nonzero(hit.to_numpy())[0][:2]:
        toks = list(tc.at[i, "window_tokens"])
        for j, payload in enumerate(XSS):
            toks[j] = payload
        tc.at[i, "window_tokens"] = toks
    pq.write_table(pa.Table.from_pandas(tc, preserve_index=False), run.table_path("top_contexts"))
    v = run.read_table("vocab")
    hit = (v["model"] == ref) & (v["layer"] == layer) & (v["neuron"] == neuron)
    v.loc[hit & (v["rank"] <= len(XSS)) & (v["side"] == "out") & (v["direction"] == "top"),
          "token"] = XSS
    run.write_table("vocab", v)
    n = run.read_table("neurons")
    n.loc[(n["model"] == ref) & (n["layer"] == layer) & (n["neuron"] == neuron),
          "family_feature"] = XSS[1]
    run.write_table("neurons", n)


def report_run(tmp_path_factory, tokenizer: Path, store: Path) -> Path:
    """The shared test run directory with its report (built once per session)."""
    if "run" in _CACHE:
        return _CACHE["run"]
    from unineurons.analyses.ablate import AblateConfig, run_ablations
    from unineurons.analyses.analyze import AnalyzeConfig, analyze_run
    from unineurons.analyses.interventions import InterveneConfig, run_interventions
    from unineurons.correlate.config import CorrelateConfig
    from unineurons.correlate.engine import run_correlate

    root = tmp_path_factory.mktemp("report")
    models = _seed_models(root, tokenizer)
    path = root / "run"
    run_correlate(CorrelateConfig(models=models, tokens=str(store), n_tokens=2048, batch_size=8),
                  path)
    analyze_run(path, AnalyzeConfig(top_k=5, batch_size=16))
    run = RunDir.open(path)
    run_ablations(run, AblateConfig(sizes=[1, 4, "all"], random_draws=2, n_tokens=256,
                                    per_layer=True, batch_size=16))
    n = run.read_table("neurons")
    ref = models[0]
    univ = n[(n["model"] == ref) & n["is_universal"]].sort_values("excess_corr", ascending=False)
    top = univ.iloc[0]
    run_interventions(run, InterveneConfig(neurons=[f"L{top.layer}.N{top.neuron}"],
                                           values=[0.0, 1.0, 2.0], random_baseline=2,
                                           n_tokens=256))
    _hand_tables(run, ref, univ)
    _inject_xss(run, ref, int(top.layer), int(top.neuron))
    build_report(path, ReportConfig(formats=("png", "svg"), dpi=60))
    _CACHE["run"] = path
    return path


@pytest.fixture(scope="module")
def run_path(tmp_path_factory, tiny_tokenizer, tiny_store) -> Path:
    return report_run(tmp_path_factory, tiny_tokenizer, tiny_store)


@pytest.fixture(scope="module")
def tables(run_path) -> Tables:
    return Tables(RunDir.open(run_path))


def _univ_top(t: Tables) -> pd.Series:
    n = t["neurons"]
    return n[n["model"] == t.reference].sort_values("excess_corr", ascending=False).iloc[0]


# ---- the fixture is what the tests assume --------------------------------------------------

def test_fixture_has_universal_neurons_and_known_matches(tables):
    n = tables["neurons"]
    ref = n[n["model"] == tables.reference]
    univ = ref[ref["is_universal"]]
    assert set(univ["layer"]) == {0, 1} and len(univ) >= 40  # most unbroken neurons
    assert not univ["neuron"].isin(BROKEN).any()
    m = tables["matches"]
    exact = m[(m["layer"] == 0) & ~m["neuron"].isin(BROKEN)]
    np.testing.assert_allclose(exact["max_corr"], 1.0, atol=1e-4)  # a permuted copy


# ---- figure data and captions against pandas ------------------------------------------------

def test_layer_summary_equals_layers_table_and_pandas(tables):
    ref = tables.reference
    n = tables["neurons"]
    s = layer_summary(n[n["model"] == ref]).set_index("layer")
    lay = tables["layers"].set_index("layer")
    for mine, theirs in (("max_corr", "mean_max_corr"), ("baseline_corr", "mean_baseline_corr"),
                         ("excess_corr", "mean_excess_corr"), ("ceiling_corr", "mean_ceiling_corr"),
                         ("universal_share", "universal_share"), ("share_max", "share_max_gt_0.7"),
                         ("share_baseline", "share_baseline_gt_0.7"), ("universal", "universal")):
        np.testing.assert_allclose(s[mine], lay[theirs], rtol=1e-6, err_msg=mine)  # float32 there
    g = n[n["model"] == ref].groupby("layer")
    np.testing.assert_allclose(s["max_corr"], g["max_corr"].mean(), rtol=1e-12)
    np.testing.assert_array_equal(s["universal"], g["is_universal"].sum())


def test_captions_state_the_numbers_drawn(run_path, tables):
    rep = json.loads((run_path / "manifest.json").read_text())["report"]
    assert set(rep["figures"]) >= {"correlation_by_layer", "universal_share", "vocab_moments",
                                   "roles_by_layer", "families_by_layer", "family_examples",
                                   "vocab_neuron", "entropy_interventions", "interventions",
                                   "ablation_curves", "ablation_efficiency", "dynamics_emergence",
                                   "dynamics_persistence", "dynamics_trajectories"}
    html = (run_path / "report" / "index.html").read_text()
    caps = dict(re.findall(r'<figure id="fig-([\w_]+)".*?<figcaption>(.*?)\n', html, re.S))
    n = tables["neurons"]
    ref = n[n["model"] == tables.reference]
    g = ref.groupby("layer")
    for col in ("max_corr", "baseline_corr", "excess_corr"):
        assert layer_list(g[col].mean()) in caps["correlation_by_layer"]
    assert f"{int(ref.is_universal.sum())} of {len(ref)} neurons exceed" in \
        caps["correlation_by_layer"]
    shares = ", ".join(f"L{k} {100 * v:.1f}%" for k, v in g["is_universal"].mean().items())
    assert shares in caps["universal_share"]
    a = tables["ablations"]
    u = a[(a["model"] == tables.reference) & (a["layer"] == -1) & (a["set"] == "universal")
          & (a["method"] == "zero")]
    for x, y in zip(u["n_ablated"], u["delta_loss"], strict=True):
        assert f"{x:g}→{y:+.3g}" in caps["ablation_curves"]
    r = a[(a["model"] == tables.reference) & (a["layer"] == -1) & (a["set"] == "random")]
    mean = r.groupby("n_requested")["delta_loss"].agg(["mean", lambda s: np.std(s)])
    for m, sd in mean.to_numpy():
        assert f"{m:+.3g}±{sd:.2g}" in caps["ablation_curves"]


def test_counts_match_crosstab(tables):
    n = tables["neurons"]
    ref = n[n["model"] == tables.reference]
    for fn, col in ((role_counts, "role"), (family_counts, "family")):
        mine = fn(ref).set_index(["group", "layer", col])["n"]
        sub = ref[ref[col].notna() & (ref[col] != "none")]
        if col == "role":
            sub = sub[sub[col].isin(["prediction", "suppression", "partition", "entropy",
                                     "attention"])]
        group = np.where(sub["is_universal"], "universal", "other")
        ref_counts = sub.groupby([group, sub["layer"], sub[col]]).size()
        assert mine.sum() == len(sub)
        np.testing.assert_array_equal(mine.sort_index().to_numpy(),
                                      ref_counts.sort_index().to_numpy())


def test_intervention_curves_and_ablation_summary_match_pandas(tables):
    iv = tables["interventions"]
    c = intervention_curves(iv, "value", ["delta_loss"])
    rnd = iv[iv["kind"] == "random"].groupby("value")["delta_loss"]
    got = c[c["group"] == "random"].set_index("value")
    np.testing.assert_allclose(got["delta_loss"], rnd.mean(), rtol=1e-12)
    np.testing.assert_allclose(got["delta_loss_min"], rnd.min(), rtol=1e-12)
    np.testing.assert_allclose(got["delta_loss_max"], rnd.max(), rtol=1e-12)
    s = ablation_summary(tables["ablations"])
    a = tables["ablations"]
    a = a[a["n_ablated"] > 0].groupby(["layer", "set", "size"])["delta_loss"].mean()
    np.testing.assert_allclose(s.set_index(["layer", "set", "size"])["delta_loss"]
                               .sort_index().to_numpy(), a.sort_index().to_numpy(), rtol=1e-12)


def test_persistence_matrix_is_the_table(tables):
    p = tables["persistence"]
    for layer in (-1, 0, 1):
        m = persistence_matrix(p, layer)
        sub = p[p["layer"] == layer]
        for r in sub.itertuples():
            got = m.loc[r.step, r.later_step]
            assert (np.isnan(got) and np.isnan(r.p_persist)) or got == pytest.approx(r.p_persist)
        assert np.isnan(m.loc[30, 10])  # t' < t is not defined
    assert (persistence_matrix(p, -1).to_numpy().diagonal() == 1).all()


def test_family_examples_check_the_feature_on_the_token(tables):
    ex = family_examples(tables)
    assert ex, "the fixture has family neurons"
    tc = tables["top_contexts"]
    for e in ex:
        top = tc[(tc["model"] == tables.reference) & (tc["layer"] == e["layer"])
                 & (tc["neuron"] == e["neuron"])].sort_values("rank")
        assert len(e["top"]) == len(top)
        for got, r in zip(e["top"].itertuples(), top.itertuples(), strict=True):
            tok = r.window_tokens[r.position - r.window_start]
            assert got.token == tok and got.value == r.value
            if e["family"] == "alphabet":
                assert got.holds == tok.lstrip().lower().startswith(e["feature"][-1])


def test_feature_checks_of_each_family():
    from types import SimpleNamespace

    from unineurons.report.plots_effects import _holds

    top = pd.DataFrame({"rank": [0, 1, 2], "value": [3.0, 2.0, 1.0], "position": [5, 2, 1],
                        "window_start": [3, 0, 0],
                        "window_ids": [[7, 9, 4, 1], [4, 4, 9], [9, 7, 3]],
                        "window_tokens": [["a", "b", " Apple", "x"], ["q", "r", " the"],
                                          ["x", "y", "z"]]})
    fams = pd.DataFrame({"model": "m", "layer": 0, "neuron": 1, "feature": ["token=' Apple'",
                                                                            "prev='q'"],
                         "token_id": [4, 9]})

    def holds(fam: str, feature: str) -> list:
        r = SimpleNamespace(layer=0, neuron=1, family_feature=feature)
        return _holds(fam, r, top, fams, "m")["holds"].tolist()

    # activating tokens: ids 4, 9, 7 (' Apple', ' the', 'y'); the tokens before: ids 9, 4, 9
    assert holds("unigram", "token=' Apple'") == [True, False, False]
    assert holds("previous", "prev='q'") == [True, False, True]
    assert holds("alphabet", "starts_with=a") == [True, False, False]
    assert holds("position", "position_peak=5") == [5.0, 2.0, 1.0]


# ---- browser data --------------------------------------------------------------------------

def test_script_json_cannot_end_the_script_element():
    obj = {"t": XSS + ["\u2028", "a>b&c"], "x": [1.5, None]}
    text = script_json(obj)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == obj
    with pytest.raises(ValueError):
        script_json({"nan": float("nan")})  # NaN must have become null before


def test_round_sig():
    x = np.array([123456.0, 0.000123456, -0.987654, 0.0, np.nan, np.inf, 1.0])
    got = round_sig(x, 4)
    assert got[:4] == [123500.0, 0.0001235, -0.9877, 0.0] and got[4] is None and got[5] is None
    rng = np.random.default_rng(0)
    y = rng.normal(size=1000) * 10.0 ** rng.integers(-8, 8, 1000)
    np.testing.assert_allclose(round_sig(y, 4), [float(f"{v:.4g}") for v in y], rtol=1e-12)


def test_browser_data_matches_the_tables(tables):
    data = browser_data(tables, max_context_neurons=10_000, vocab_k=10)
    n = tables["neurons"]
    assert data["neurons"]["n"] == len(n)
    cols = {c["name"]: c for c in data["neurons"]["columns"]}
    order = n.sort_values(["model", "layer", "neuron"], key=lambda c: c.map(
        {m: i for i, m in enumerate(tables.models)}) if c.name == "model" else c)
    np.testing.assert_array_equal(cols["layer"]["values"], order["layer"])
    np.testing.assert_allclose(np.array(cols["excess_corr"]["values"], dtype=float),
                               np.array(round_sig(order["excess_corr"].to_numpy()), dtype=float),
                               rtol=0)
    assert cols["is_universal"]["values"] == [None if pd.isna(v) else int(v)
                                              for v in order["is_universal"]]  # null: partners
    m = tables["matches"]
    assert data["matches"]["argmax_neuron"] == m["argmax_neuron"].tolist()
    top = _univ_top(tables)
    key = f"0:{top.layer}:{top.neuron}"
    items = data["contexts"][key]["items"]
    tc = tables["top_contexts"]
    rows = tc[(tc["model"] == tables.reference) & (tc["layer"] == top.layer)
              & (tc["neuron"] == top.neuron)].sort_values("rank")
    assert [data["strings"][i] for i in items[0][4]] == list(rows.iloc[0]["window_tokens"])
    assert any(s in data["strings"] for s in XSS)
    v = data["vocab"][key]["out_top"]
    assert [data["strings"][i] for i, _ in v[:len(XSS)]] == XSS


def test_context_budget_takes_universal_neurons_and_their_matches_first(tables):
    top = _univ_top(tables)
    chosen = context_neurons(tables, 1)
    assert chosen[tables.reference] == {(int(top.layer), int(top.neuron))}
    m = tables["matches"]
    for r in m[(m["layer"] == top.layer) & (m["neuron"] == top.neuron)].itertuples():
        assert chosen[r.partner] == {(r.argmax_layer, r.argmax_neuron)}


def test_window_activations_match_a_direct_forward(tables, tiny_store):
    from unineurons.analyses.interventions import load_run_model
    from unineurons.tokens import TokenStore

    store = TokenStore.open(tiny_store)
    tc = tables["top_contexts"]
    entry = tables.manifest["models"][1]
    g = tc[tc["model"] == entry["spec"]].reset_index(drop=True)
    keep = (g["neuron"] % 9 == 0).to_numpy()
    m = load_run_model(entry)
    acts = window_activations(m, store.tokens, g, keep, batch_size=3)
    assert all((a is None) != k for a, k in zip(acts, keep, strict=True))
    for i in np.nonzero(keep)[0][:12]:
        r = g.iloc[i]
        x = torch.from_numpy(np.asarray(store.tokens[r.row:r.row + 1]).astype(np.int64))
        seen: dict = {}
        h = m.adapter.out_proj(int(r.layer)).register_forward_pre_hook(
            lambda mod, args, seen=seen: seen.setdefault("a", args[0].detach()))
        try:
            with torch.no_grad():
                m.model(input_ids=x)
        finally:
            h.remove()
        ref = seen["a"][0, r.window_start:r.window_start + len(r.window_ids), r.neuron].numpy()
        np.testing.assert_allclose(acts[i], ref, atol=1e-5)
        assert acts[i][r.position - r.window_start] == pytest.approx(r.value, abs=1e-4)
    bad = g.copy()
    bad.at[int(np.nonzero(keep)[0][0]), "window_ids"] = [7] * len(g.iloc[0]["window_ids"])
    with pytest.raises(UnineuronsError, match="differs from the token store"):
        window_activations(m, store.tokens, bad, keep)


def test_report_embeds_shaded_windows(run_path):
    html = (run_path / "report" / "index.html").read_text()
    block = re.search(r'<script type="application/json" id="unineurons-data">(.*?)</script>',
                      html, re.S).group(1)
    data = json.loads(block)
    assert data["contexts"] and all(it[5] is not None for c in data["contexts"].values()
                                    for it in c["items"])
    for c in data["contexts"].values():
        for it in c["items"]:
            # the top token, recomputed, quantised to 1% of the neuron's scale
            assert abs(it[5][it[1] - it[2]] - 100 * it[0] / c["scale"]) <= 1


# ---- the HTML and the files ----------------------------------------------------------------

def test_html_is_local_and_escaped(run_path):
    html = (run_path / "report" / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == [
        '<script type="application/json" id="unineurons-data">', '<script src="static/browser.js">']
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # no network, no CDN
    for payload in XSS:
        assert payload not in html
    for f in ("static/browser.js", "static/report.css"):
        assert (run_path / "report" / f).is_file()
    js = (run_path / "report" / "static" / "browser.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    for fig in json.loads((run_path / "manifest.json").read_text())["report"]["figures"]:
        for ext in ("png", "svg"):
            assert (run_path / "figures" / f"{fig}.{ext}").stat().st_size > 1000


def test_missing_tables_are_noted_not_drawn(run_path, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_path, copy)
    for name in ("ablations", "emergence", "properties"):
        (copy / f"{name}.parquet").unlink()
    res = build_report(copy, ReportConfig(formats=("png",), dpi=50, models=False,
                                          browser=False, max_context_neurons=0))
    skipped = {s.id: s.reason for s in res.skipped}
    assert "ablations.parquet" in skipped["ablation_curves"] and "unineurons ablate" in \
        skipped["ablation_curves"]
    assert "emergence.parquet" in skipped["dynamics_emergence"]
    assert not list((copy / "figures").glob("ablation_curves.*"))  # the old file is gone
    html = (copy / "report" / "index.html").read_text()
    assert 'id="skip-ablation_curves"' in html and 'id="fig-ablation_curves"' not in html
    assert "histogram over the whole vocabulary not drawn" in html  # models off


def test_dynamics_only_run(run_path, tmp_path):
    dyn = RunDir.create(tmp_path / "dyn")
    for name in ("emergence", "persistence", "trajectories"):
        shutil.copy(run_path / f"{name}.parquet", dyn.path)
    res = build_report(dyn.path, ReportConfig(formats=("png",), dpi=50))
    assert [f.id for f in res.figures] == ["dynamics_emergence", "dynamics_persistence",
                                           "dynamics_trajectories"]
    assert res.n_neurons == 0
    # a correlate run without dynamics tables draws them from a separate dynamics run
    from unineurons.report.figures import make_figures

    main = RunDir.create(tmp_path / "main")
    shutil.copy(run_path / "neurons.parquet", main.path)
    ids = ["dynamics_emergence", "universal_share"]
    drawn, skipped = make_figures(main, ("png",), 50, only=ids)
    assert [f.id for f in drawn] == ["universal_share"] and skipped[0].id == ids[0]
    drawn, _ = make_figures(main, ("png",), 50, only=ids, dynamics=dyn)
    assert [f.id for f in drawn] == ["universal_share", "dynamics_emergence"]
    assert "seed0" in drawn[1].caption


def test_cli_report_and_errors(run_path, tmp_path, capsys):
    from unineurons.cli import main

    copy = tmp_path / "run"
    shutil.copytree(run_path, copy)
    with pytest.raises(SystemExit) as e:
        main(["report", str(copy), "--no-models", "--no-figures", "--max-context-neurons", "3",
              "--vocab-neuron", "1:L1.N3"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "report:" in out and "index.html" in out and "top contexts of 9" in out
    rep = json.loads((copy / "manifest.json").read_text())["report"]
    assert rep["config"]["max_context_neurons"] == 3 and rep["config"]["vocab_neuron"] == "1:L1.N3"
    for args, msg in ((["report", str(tmp_path / "nope")], "not a unineurons run"),
                      (["report", str(copy), "--formats", "gif"], "--formats"),
                      (["report", str(copy), "--vocab-neuron", "3.12"], "--vocab-neuron")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def test_helpers():
    assert short_names(["/a/x/seed0/step30", "/a/x/seed1/step30"]) == {
        "/a/x/seed0/step30": "seed0/step30", "/a/x/seed1/step30": "seed1/step30"}
    assert short_names(["org/m@checkpoint-1"]) == {"org/m@checkpoint-1": "m@checkpoint-1"}
    s = pd.Series([0.5, 0.25], index=[0, 1])
    assert layer_list(s) == "L0 0.5, L1 0.25"
    assert layer_list(pd.Series(np.arange(20) / 20)) == "0 (L0) to 0.95 (L19), mean 0.475"
    with pytest.raises(ValueError, match="MODEL_INDEX"):
        ReportConfig(vocab_neuron="x:L1.N2")
    with pytest.raises(ValueError):
        ReportConfig(formats=())
