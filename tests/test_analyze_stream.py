"""``unineurons analyze``: streamed statistics and top contexts against a direct capture of
every activation, neuron subsets, and the stage end to end (CLI; a fake correlate run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from unineurons.accumulators import TopK
from unineurons.accumulators.topk import context_windows
from unineurons.analyses.analyze import STAT_COLUMNS, AnalyzeConfig, analyze_run, select_neurons
from unineurons.analyses.analyze_tables import properties_table
from unineurons.errors import UnineuronsError
from unineurons.rundir import RunDir
from unineurons.stream import MaskConfig, token_mask
from unineurons.tokens import TokenStore


def tiny_model(path: Path, tokenizer: Path, seed: int, n_layer: int = 2) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_inner=64, vocab_size=512,
                     n_positions=64, bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    for f in Path(tokenizer).iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("analyze_models")
    return [tiny_model(root / f"seed{s}", tiny_tokenizer, s) for s in (0, 1)]


def capture_all(spec: str, store: TokenStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every kept activation and pre-activation ``[n, L*d_mlp]`` and its (row, position)."""
    from unineurons.models.load import load_model

    m = load_model(spec)
    ctxs = torch.from_numpy(np.asarray(store.contexts()).astype(np.int64))
    acts, pres = [], []
    with torch.no_grad(), m.adapter.capture(pre_activation=True) as st:
        m.model(input_ids=ctxs)
        acts = torch.cat([st[layer] for layer in range(m.adapter.n_layers)], dim=-1)  # [B,T,Ld]
        pres = torch.cat([st[-1 - layer] for layer in range(m.adapter.n_layers)], dim=-1)
    keep = token_mask(ctxs, store.manifest["tokenizer"], MaskConfig())
    rows, pos = torch.nonzero(keep, as_tuple=True)
    return acts[keep].double().numpy(), pres[keep].double().numpy(), np.stack([rows, pos], 1)


def vr_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Variance reduction, literally: 1 - [(1-b) Var(x|~y) + b Var(x|y)] / Var(x)."""
    b = y.mean()
    v0 = x[~y].var() if (~y).any() else 0.0
    v1 = x[y].var() if y.any() else 0.0
    return 1 - ((1 - b) * v0 + b * v1) / x.var()


def direct_topk(x: np.ndarray, rows: np.ndarray, pos: np.ndarray, k: int, col: int):
    order = np.lexsort((pos, rows, -x[:, col]))[:k]  # value desc, then row, then position
    return x[order, col], rows[order], pos[order]


# ---- accumulators on synthetic data ------------------------------------------------------------
def test_topk_matches_sort_whatever_the_split():
    rng = np.random.default_rng(0)
    n_rows, t, d, k = 40, 7, 6, 5
    rows = np.repeat(np.arange(n_rows), t)
    pos = np.tile(np.arange(t), n_rows)
    x = rng.integers(0, 5, size=(n_rows * t, d)).astype(np.float64)  # many ties
    x[:, 5] = 0.0  # a dead neuron: every value ties
    xt, rt, pt = torch.from_numpy(x), torch.from_numpy(rows), torch.from_numpy(pos)
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, len(x)), size=6, replace=False))
        parts = [TopK(d, k).update(xt[a:b], rt[a:b], pt[a:b])
                 for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(x)], strict=True)]
        acc = TopK(d, k)
        for i in rng.permutation(len(parts)):  # merge order does not matter
            acc.merge(parts[i])
        res = acc.result()
        for j in range(d):
            v, r, p = direct_topk(x, rows, pos, k, j)
            np.testing.assert_array_equal(res["values"][:, j].numpy(), v)
            np.testing.assert_array_equal(res["rows"][:, j].numpy(), r)
            np.testing.assert_array_equal(res["positions"][:, j].numpy(), p)


def test_topk_fewer_tokens_than_k():
    acc = TopK(2, 4).update(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([5, 5]),
                            torch.tensor([1, 2]))
    res = acc.result()
    assert res["values"][:, 0].tolist() == [3.0, 1.0, float("-inf"), float("-inf")]
    assert res["rows"][:, 1].tolist() == [5, 5, -1, -1]


def test_context_windows():
    ctxs = np.arange(5 * 10).reshape(5, 10)
    wins, starts = context_windows(ctxs, np.array([3, 0, 3]), np.array([1, 9, 5]), 2, 1)
    assert [w.tolist() for w in wins] == [[30, 31, 32], [7, 8, 9], [33, 34, 35, 36]]
    assert starts.tolist() == [0, 7, 3]


# ---- neuron subsets -------------------------------------------------------------------------
def test_select_neurons(tmp_path):
    table = pd.DataFrame({"layer": [0, 0, 1, 1, 1], "neuron": [0, 1, 0, 1, 2],
                          "is_universal": [True, False, False, True, False]})
    sub = select_neurons("m", 2, 3, "universal", table, seed=1)
    assert {0, 4} <= set(sub.tolist()) and len(sub) == 4  # 2 universal + 2 others
    assert select_neurons("m", 2, 3, "universal", table, seed=1).tolist() == sub.tolist()
    assert select_neurons("m", 2, 3, "auto", table).size == 4
    assert select_neurons("m", 2, 3, "all", table).tolist() == list(range(6))
    assert select_neurons("m", 2, 3, "auto", None).tolist() == list(range(6))
    # a model added to a correlate run on its own has no universality values: auto = all
    unknown = table.assign(is_universal=pd.array([pd.NA] * 5, dtype="boolean"))
    assert select_neurons("m", 2, 3, "auto", unknown).tolist() == list(range(6))
    # ranked but nothing above the threshold (a small zoo): auto analyses every neuron
    none_above = table.assign(is_universal=False)
    assert select_neurons("m", 2, 3, "auto", none_above).tolist() == list(range(6))
    assert select_neurons("m", 2, 3, "universal", none_above).size == 0
    assert len(select_neurons("m", 20, 30, "auto", None, max_neurons=50)) == 50
    f = tmp_path / "n.txt"
    f.write_text("L1.N2\n\nL0.N1\nL1.N2\n")
    assert select_neurons("m", 2, 3, str(f), None).tolist() == [1, 5]
    f.write_text("L2.N0\n")
    with pytest.raises(UnineuronsError, match="outside model"):
        select_neurons("m", 2, 3, str(f), None)
    with pytest.raises(UnineuronsError, match="no universality"):
        select_neurons("m", 2, 3, "universal", None)


# ---- end to end ---------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    from unineurons.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_single_model_cli_matches_direct_capture(models, tiny_store, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_cli(["analyze", "--model", str(models[0]), "--tokens", str(tiny_store), "--out",
                  str(out), "--top-k", "4", "--unigram-top-n", "32", "--batch-size", "24"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "neurons per family" in text and "properties.parquet skipped" in text
    assert "neurons per role" in text
    store = TokenStore.open(tiny_store)
    acts, pres, rp = capture_all(str(models[0]), store)
    df = pd.read_parquet(out / "neurons.parquet")
    assert len(df) == acts.shape[1] and (df["model"] == str(models[0])).all()
    # columns in flat order: layer * d_mlp + neuron
    assert (df["layer"] * 64 + df["neuron"]).tolist() == list(range(acts.shape[1]))
    for prefix, x in (("act", acts), ("pre", pres)):
        np.testing.assert_allclose(df[f"{prefix}_mean"], x.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(df[f"{prefix}_var"], x.var(0), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(df[f"{prefix}_skew"], scipy.stats.skew(x, 0), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(df[f"{prefix}_kurt"],
                                   scipy.stats.kurtosis(x, 0, fisher=False), rtol=1e-4)
    np.testing.assert_allclose(df["act_freq"], (pres > 0).mean(0))
    np.testing.assert_allclose(df["act_max"], acts.max(0), rtol=1e-6)
    # every neuron got a family (auto: all neurons of a small model)
    assert df["family"].notna().all() and df["family_score"].between(0, 1).all()

    tc = pd.read_parquet(out / "top_contexts.parquet")
    assert len(tc) == 4 * acts.shape[1]
    ctxs = np.asarray(store.contexts())
    vocab = _vocab(store)
    for col in (0, 17, 70, 127):
        v, r, p = direct_topk(acts, rp[:, 0], rp[:, 1], 4, col)
        sub = tc[(tc["layer"] == col // 64) & (tc["neuron"] == col % 64)].sort_values("rank")
        np.testing.assert_allclose(sub["value"], v, rtol=1e-6)
        assert sub["row"].tolist() == r.tolist() and sub["position"].tolist() == p.tolist()
        for _, row in sub.iterrows():
            lo, hi = max(0, row.position - 24), min(64, row.position + 9)
            assert row.window_start == lo
            assert list(row.window_ids) == ctxs[row.row, lo:hi].tolist()
            assert list(row.window_tokens) == [vocab[i] for i in ctxs[row.row, lo:hi]]
    fam = pd.read_parquet(out / "families.parquet")
    assert len(fam) == 3 * acts.shape[1]
    assert set(fam["family"]) <= {"unigram", "previous", "alphabet", "class", "position"}
    # the stage's scores against a direct computation on the captured activations
    tok, prev = ctxs[rp[:, 0], rp[:, 1]], ctxs[rp[:, 0], rp[:, 1] - 1]
    token_rows = fam[fam["family"].isin(["unigram", "previous"])].head(40)
    assert len(token_rows) >= 10
    for _, r in token_rows.iterrows():
        ids = tok if r.family == "unigram" else prev
        col = acts[:, r.layer * 64 + r.neuron]
        assert r.score == pytest.approx(vr_reference(col, ids == r.token_id), abs=1e-6)
    for col in (3, 90):
        fires = pres[:, col] > 0
        joint = pd.crosstab(rp[:, 1], fires).to_numpy() / len(fires)
        pp, pf = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        mi = (joint[nz] * np.log2(joint[nz] / (pp @ pf)[nz])).sum()
        assert df["position_score"].iloc[col] == pytest.approx(
            mi / -(pf * np.log2(pf)).sum(), abs=1e-9)
    # the weight-based half of the stage ran too (its numbers are tested in its own files)
    assert {"w_in_norm", "vocab_kurt", "attn_max_z"} <= set(df.columns) and df["role"].notna().all()
    for table in ("vocab", "entropy", "attention"):
        assert (out / f"{table}.parquet").is_file()
    man = RunDir.open(out).manifest()
    assert man["models"][0]["spec"] == str(models[0])
    assert AnalyzeConfig(**man["analyze"]["config"]).top_k == 4
    assert len(man["analyze"]["unigram_tokens"]) == 32


def _vocab(store: TokenStore) -> list[str]:
    from unineurons.models.load import load_tokenizer

    tok = load_tokenizer(store.manifest["tokenizer"]["path"])
    return [tok.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tok))]


def test_cli_errors(tmp_path, capsys):
    assert run_cli(["analyze"]) == 1
    assert "needs a RUN directory" in capsys.readouterr().err
    assert run_cli(["analyze", "--model", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "--tokens" in capsys.readouterr().err
    assert run_cli(["analyze", str(tmp_path / "nothing")]) == 1
    assert "not a unineurons run directory" in capsys.readouterr().err


def fake_correlate_run(path: Path, models: list[Path], store: Path) -> tuple[RunDir, set]:
    """A run directory as the correlate stage leaves it, universality made up (seeded)."""
    from unineurons.models.load import load_model

    run = RunDir.create(path)
    entries, rows = [], []
    rng = np.random.default_rng(0)
    universal = set()
    for spec in models:
        m = load_model(str(spec), with_tokenizer=False)
        entries.append({"spec": str(spec), "weights_sha256": m.weights_sha256, **m.info})
        n = m.adapter.n_layers * m.adapter.d_mlp
        univ = rng.random(n) < 0.1
        universal |= {(str(spec), i // 64, i % 64) for i in np.nonzero(univ)[0]}
        mc = rng.random(n)
        rows.append(pd.DataFrame({
            "model": str(spec), "layer": np.arange(n) // 64, "neuron": np.arange(n) % 64,
            "max_corr": mc, "baseline_corr": mc / 2, "excess_corr": mc / 2,
            "is_universal": univ, "ceiling_corr": mc, "excess_norm": mc / 3, "n_partners": 1}))
    run.update_neurons(pd.concat(rows, ignore_index=True))
    st = TokenStore.open(store)
    run.update_manifest(models=entries, tokens={"path": str(store), "sha256": st.sha256,
                                                "n_tokens": 4096, "n_contexts": 64, "ctx": 64})
    return run, universal


def test_analyze_fake_correlate_run(models, tiny_store, tmp_path):
    run, universal = fake_correlate_run(tmp_path / "run", models, tiny_store)
    cfg = AnalyzeConfig(unigram_top_n=16, top_k=2)
    res = analyze_run(run.path, cfg)
    df = pd.read_parquet(run.table_path("neurons"))
    assert {"max_corr", "is_universal", "family", "w_in_norm", *STAT_COLUMNS} <= set(df.columns)
    for spec in map(str, models):
        sub = df[df["model"] == spec]
        analysed = sub[sub["family"].notna()]
        n_univ = int(sub["is_universal"].sum())
        assert len(analysed) == 2 * n_univ  # universal + as many random others
        assert analysed["is_universal"].sum() == n_univ
    # the summary counts universal and other neurons per family
    fam = res.families.set_index("family")
    assert fam["universal"].sum() == len(universal) and fam["total"].sum() == 2 * len(universal)
    # properties: z-scores within (model, layer), against a direct pandas computation
    props = pd.read_parquet(run.table_path("properties"))
    assert props.equals(res.properties)
    m0 = str(models[0])
    g = df[(df["model"] == m0) & (df["layer"] == 1)]
    z = (g["act_var"] - g["act_var"].mean()) / g["act_var"].std(ddof=0)
    row = props[(props["model"] == m0) & (props["layer"] == 1)
                & (props["statistic"] == "act_var")].iloc[0]
    assert row.universal_mean_z == pytest.approx(z[g["is_universal"]].mean())
    assert row.other_mean_z == pytest.approx(z[~g["is_universal"]].mean())
    assert row.n_universal == int(g["is_universal"].sum())
    assert not props["statistic"].isin(["max_corr", "excess_corr", "is_universal"]).any()
    assert RunDir.open(run.path).manifest()["analyze"]["tokens"]["n_tokens"] == 4096
    # a second analyze (through the CLI: one model, a neuron file, chosen and user features)
    # replaces that model's rows and keeps the other model's
    n_tc = len(pd.read_parquet(run.table_path("top_contexts")))
    fam_before = pd.read_parquet(run.table_path("families"))
    (tmp_path / "neurons.txt").write_text("L0.N3\nL1.N60\n")
    (tmp_path / "mine.txt").write_text(" self\n(\n")
    rc = run_cli(["analyze", str(run.path), "--model", m0, "--neurons", str(tmp_path / "neurons.txt"),
                  "--feature", "digit", "--token-class", str(tmp_path / "mine.txt"),
                  "--top-k", "2", "--unigram-top-n", "16", "--role", "prediction_kurt=8",
                  "--role", "entropy_values=0,2"])
    assert rc == 0
    assert len(pd.read_parquet(run.table_path("top_contexts"))) == n_tc
    df2 = pd.read_parquet(run.table_path("neurons"))
    assert len(df2) == len(df)
    fam = pd.read_parquet(run.table_path("families"))
    new = fam[fam["model"] == m0]
    assert sorted(set(zip(new["layer"], new["neuron"], strict=True))) == [(0, 3), (1, 60)]
    assert fam[fam["model"] != m0].equals(fam_before[fam_before["model"] != m0]
                                          .reset_index(drop=True))
    man = RunDir.open(run.path).manifest()["analyze"]
    assert man["class_features"] == ["digit", "mine"]
    assert man["config"]["roles"]["prediction_kurt"] == 8
    assert man["config"]["roles"]["entropy_values"] == [0, 2]


def test_properties_need_universality():
    df = pd.DataFrame({"model": "m", "layer": [0, 0], "neuron": [0, 1], "act_var": [1.0, 2.0]})
    assert properties_table(df) is None


def test_properties_leave_out_universality_measures():
    """p and q values measure universality itself: comparing them between universal and other
    neurons is circular, so they are no properties (nor is any correlation column)."""
    df = pd.DataFrame({"model": "m", "layer": 0, "neuron": range(4), "act_var": [1.0, 2.0, 3.0, 5.0],
                       "is_universal": [True, False, True, False], "p_value": [1e-4, 0.5, 1e-3, 0.9],
                       "q_value": [1e-3, 0.6, 2e-3, 0.9], "excess_corr": [0.6, 0.1, 0.7, 0.0]})
    out = properties_table(df)
    assert out is not None and list(out["statistic"]) == ["act_var"]


def test_family_and_role_counts_show_both_criteria():
    from unineurons.analyses.analyze_tables import summary_counts

    df = pd.DataFrame({"family": ["a", "a", "b", "b", "b"],
                       "is_universal": [True, False, False, False, False],
                       "is_universal_calibrated": [True, True, False, True, False]})
    out = summary_counts(df, "family").set_index("family")
    assert list(out.columns) == ["universal", "calibrated", "other", "total"]
    assert out.loc["a"].tolist() == [1, 2, 1, 2] and out.loc["b"].tolist() == [0, 1, 3, 3]
    paper_only = summary_counts(df.drop(columns="is_universal_calibrated"), "family")
    assert list(paper_only.columns) == ["family", "universal", "other", "total"]
