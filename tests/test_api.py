"""The public API: the package root's surface, the CLI and the API writing the same tables, the
Run's tables and universality, a Neuron against its tables and a direct forward pass, HTML
escaping, and the TransformerLens / Hugging Face names."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _apirun import ABLATE, ANALYZE, BROKEN, CORRELATE, api_run, copy_run

import unineurons as un
from unineurons.cli import main
from unineurons.errors import UnineuronsError


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_tokenizer, tiny_store):
    return api_run(tmp_path_factory.mktemp("api"), tiny_tokenizer, tiny_store)


@pytest.fixture(scope="module")
def run(shared) -> un.Run:
    return un.open_run(shared[0])


def _cli(*args: str) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 0


# ---- the surface ---------------------------------------------------------------------------

def test_import_is_light_and_all_names_resolve():
    code = ("import sys, unineurons as u; print('torch' in sys.modules, 'pandas' in sys.modules);"
            "print(all(getattr(u, n) is not None for n in u.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False", "True"]
    for name in ("correlate", "analyze", "ablate", "intervene", "dynamics", "report",
                 "train_zoo", "build_tokens", "train_tokenizer", "plan", "open_run"):
        assert callable(getattr(un, name)), name
        assert name in un.__all__
    with pytest.raises(AttributeError):
        un.no_such_name  # noqa: B018


def test_correlate_and_report_stay_callable_after_their_subpackages_load():
    import unineurons.correlate.engine  # noqa: F401 - sets unineurons.correlate to the package
    import unineurons.report.build  # noqa: F401
    from unineurons import api

    assert callable(un.correlate) and callable(un.report)
    assert inspect.signature(un.correlate) == inspect.signature(api.correlate)
    assert un.correlate.engine.run_correlate is not None  # still the subpackage too
    with pytest.raises(UnineuronsError, match="at least two"):
        un.correlate(models=["a"], tokens="t", out="never")
    assert not Path("never").exists()


def test_every_public_function_documents_returns_errors_and_paper():
    from unineurons import api

    for name in api.__all__:
        doc = inspect.getdoc(getattr(api, name)) or ""
        assert "Raises:" in doc and "Returns:" in doc and "Args:" in doc, name
    for name in ("correlate", "analyze", "ablate", "intervene", "dynamics"):
        assert "Gurnee et al." in getattr(api, name).__doc__ or \
            "Nandan et al." in getattr(api, name).__doc__, name


def _same_default(cli, cfg) -> bool:
    """A CLI option's default against its config field's ('a,b' against ['a', 'b'])."""
    if isinstance(cli, str) and isinstance(cfg, (list, tuple)):
        cli = cli.split(",")

        def norm(x):
            try:
                return float(x)
            except (TypeError, ValueError):
                return str(x)

        return [norm(x) for x in cli] == [norm(x) for x in cfg]
    return cli == cfg


def test_api_keywords_default_to_the_cli_defaults():
    """The API's keywords are the config fields, whose defaults must be the command's."""
    import typer

    from unineurons.analyses.ablate import AblateConfig
    from unineurons.analyses.analyze import AnalyzeConfig
    from unineurons.analyses.dynamics import DynamicsConfig
    from unineurons.analyses.interventions import InterveneConfig
    from unineurons.cli import app
    from unineurons.correlate.config import CorrelateConfig
    from unineurons.report.build import ReportConfig

    commands = typer.main.get_command(app).commands
    flipped = {"keep_newline": "drop_newline"}  # --keep-newline sets drop_newline=False
    checked = 0
    for name, cls in (("correlate", CorrelateConfig), ("analyze", AnalyzeConfig),
                      ("ablate", AblateConfig), ("intervene", InterveneConfig),
                      ("dynamics", DynamicsConfig), ("report", ReportConfig)):
        for p in commands[name].params:
            field = cls.model_fields.get(flipped.get(p.name, p.name))
            if field is None or field.is_required() or p.name == "ablate":
                continue  # arguments and options that are not config fields
            want = (not field.default) if p.name in flipped else field.default
            assert _same_default(p.default, want), f"{name} --{p.name}: {p.default!r} != {want!r}"
            checked += 1
    assert checked > 60


# ---- CLI and API write the same tables -----------------------------------------------------

def test_cli_and_api_write_the_same_tables(shared, tmp_path, tiny_store):
    path, models, _ = shared
    cli_run = tmp_path / "cli"
    _cli("correlate", *[x for m in models for x in ("--model", m)], "--tokens", tiny_store,
         "--out", cli_run, "--n-tokens", CORRELATE["n_tokens"], "--batch-size",
         CORRELATE["batch_size"])
    _cli("analyze", cli_run, "--top-k", ANALYZE["top_k"], "--batch-size", ANALYZE["batch_size"])
    _cli("ablate", cli_run, "--sizes", ",".join(map(str, ABLATE["sizes"])), "--random-draws",
         ABLATE["random_draws"], "--n-tokens", ABLATE["n_tokens"], "--batch-size",
         ABLATE["batch_size"])
    api, cli = un.open_run(path), un.open_run(cli_run)
    names = ["neurons", "matches", "layers", "top_contexts", "families", "vocab", "properties",
             "ablations"] + [t for t in ("layer_similarity", "partner_kinds") if t in api.tables]
    assert set(names) <= set(cli.tables)
    for name in names:
        pd.testing.assert_frame_equal(api.table(name), cli.table(name), obj=name)
    for stage in ("correlate", "analyze"):
        assert api.manifest[stage]["config"] == cli.manifest[stage]["config"], stage


def test_config_object_with_overrides_equals_keywords(shared, tmp_path, tiny_store):
    from unineurons.correlate.config import CorrelateConfig

    _, models, _ = shared
    cfg = CorrelateConfig(models=models[:2], tokens=str(tiny_store), n_tokens=256, threshold=0.9)
    a = un.correlate(config=cfg, out=tmp_path / "a", threshold=0.3)
    b = un.correlate(models=[Path(m) for m in models[:2]], tokens=tiny_store, out=tmp_path / "b",
                     n_tokens=256, threshold=0.3)
    assert a.manifest["correlate"]["config"] == b.manifest["correlate"]["config"]
    assert a.manifest["correlate"]["config"]["threshold"] == 0.3
    pd.testing.assert_frame_equal(a.neurons, b.neurons)
    assert a.result.plan is not None and not a.result.reused
    with pytest.raises(UnineuronsError, match="config must be of type AblateConfig, not CorrelateConfig"):
        un.ablate(a, config=cfg)
    with pytest.raises(UnineuronsError, match="bogus"):
        un.correlate(models=models, tokens=tiny_store, out=tmp_path / "c", bogus=1)
    assert not (tmp_path / "c").exists()
    with pytest.raises(UnineuronsError, match="out"):
        un.correlate(models=models, tokens=tiny_store)
    with pytest.raises(UnineuronsError, match="needs a run directory"):
        un.analyze()
    with pytest.raises(UnineuronsError, match="drop out="):
        un.analyze(a, out=tmp_path / "d")
    with pytest.raises(UnineuronsError, match="needs out="):
        un.analyze(models=models[0], tokens=tiny_store)
    with pytest.raises(UnineuronsError, match="top-k|top_k"):
        un.analyze(a, top_k=0)
    assert un.open_run(a).path == a.path


def test_family_options_expand_to_the_members(shared, tmp_path, tiny_store):
    _, models, _ = shared
    f = tmp_path / "families.toml"
    f.write_text('[families.mine]\ndescription = "seed 0 and its permuted copies"\nmembers = [\n'
                 + "".join(f'  {{ seed = {i}, id = "{m}" }},\n' for i, m in enumerate(models))
                 + "]\n")
    run = un.correlate(family="mine", seeds=[2, 0], families_file=f, tokens=tiny_store,
                       out=tmp_path / "run", n_tokens=256)
    assert run.models == [models[2], models[0]]
    with pytest.raises(UnineuronsError, match="--family"):
        un.correlate(models=models, seeds="0-1", tokens=tiny_store, out=tmp_path / "x")
    with pytest.raises(UnineuronsError, match="no seed family"):
        un.analyze(run, family="nope", families_file=f)


def test_plan_equals_the_estimate_the_cli_builds(shared):
    from unineurons.correlate.config import CorrelateConfig
    from unineurons.correlate.estimate import estimate

    _, models, _ = shared
    got = un.plan(models, n_tokens=10_000, ctx=64, flops_per_s=1e9, pairs="all")
    want = estimate(CorrelateConfig(models=models, tokens="-", memory_budget="80GB", pairs="all"),
                    10_000, 64, rate=1e9)
    assert got.plan.peak_bytes == want.plan.peak_bytes and got.seconds == want.seconds


# ---- Run ------------------------------------------------------------------------------------

def test_run_reads_tables_lazily_and_names_the_missing_command(run, tmp_path):
    assert run.neurons is run.neurons  # read once
    pd.testing.assert_frame_equal(run.neurons, pd.read_parquet(run.path / "neurons.parquet"))
    assert {"neurons", "matches", "layers", "ablations", "interventions"} <= set(run.tables)
    other = un.open_run(copy_run(run.path, tmp_path / "copy"))
    with pytest.raises(UnineuronsError, match="unineurons dynamics"):
        other.emergence  # noqa: B018
    (other.path / "interventions.parquet").unlink()
    with pytest.raises(UnineuronsError, match=r"no interventions.parquet.*unineurons intervene"):
        other.interventions  # noqa: B018
    with pytest.raises(AttributeError):
        other.not_a_table  # noqa: B018
    extra = pd.DataFrame({"model": ["m"], "layer": [0], "score": [1.5]})
    extra.to_parquet(other.path / "my_scores.parquet")
    pd.testing.assert_frame_equal(other.my_scores, extra)  # any table another tool adds
    old = other.layers
    other._rd.write_table("layers", old.assign(universal=-1))  # a stage rewrites the table
    assert (other.layers["universal"] == -1).all()
    with pytest.raises(UnineuronsError, match="not a unineurons run"):
        un.open_run(tmp_path)


def test_universal_paper_and_calibrated(run, shared, tmp_path):
    _, models, _ = shared
    n = run.neurons
    want = n[n["is_universal"].fillna(False).astype(bool)].sort_values("excess_corr",
                                                                       ascending=False)
    got = run.universal()
    assert list(zip(got.layer, got.neuron, strict=True)) == \
        list(zip(want.layer, want.neuron, strict=True))
    assert (got["model"] == models[0]).all() and len(got) >= 40
    assert not got["neuron"].isin(BROKEN).any()  # the re-drawn neurons are not universal
    # the correlate stage writes the calibrated criterion (q < fdr against the rotation null)
    cal_rows = run.universal("calibrated")
    flagged = n[n["is_universal_calibrated"].fillna(False).astype(bool)]
    assert sorted(zip(cal_rows.layer, cal_rows.neuron, strict=True)) == \
        sorted(zip(flagged.layer, flagged.neuron, strict=True))
    with pytest.raises(UnineuronsError, match="criterion"):
        run.universal("strict")  # type: ignore[arg-type]
    assert len(flagged)  # the permuted copies share every live neuron
    for _, r in flagged.head(3).iterrows():  # the Neuron says the same as the table
        nr = run.neuron(f"L{int(r.layer)}.N{int(r.neuron)}", model=r.model)
        assert nr.is_universal_calibrated is True and nr.is_universal == bool(r.is_universal)
    older = un.open_run(copy_run(run.path, tmp_path / "older"))
    older._rd.write_table("neurons", n.drop(columns=["is_universal_calibrated"]))
    with pytest.raises(UnineuronsError, match="is_universal_calibrated"):
        older.universal("calibrated")  # a run made without the calibrated criterion
    other = un.open_run(copy_run(run.path, tmp_path / "calib"))
    cal = n.assign(is_universal_calibrated=n["is_universal"] & (n["layer"] == 1))
    other._rd.write_table("neurons", cal)
    got = other.universal("calibrated")
    assert len(got) and (got["layer"] == 1).all() and got["is_universal_calibrated"].all()
    assert len(other.universal("calibrated", model=0)) == len(got)


# ---- Neuron --------------------------------------------------------------------------------

def test_neuron_matches_contexts_and_vocabulary_against_the_tables(run, shared):
    _, models, perms = shared
    top = run.universal().iloc[0]
    nr = run.neuron(f"L{top.layer}.N{top.neuron}")
    assert (nr.layer, nr.index, nr.model) == (top.layer, top.neuron, models[0])
    assert nr.stats["excess_corr"] == top.excess_corr and nr.is_universal
    m = nr.matches
    assert list(m["partner"]) == models[1:]
    for r, perm in zip(m.itertuples(), perms, strict=True):
        j = int(torch.argsort(perm[nr.layer])[nr.index])  # where the neuron went in the copy
        assert r.partner_address == f"L{nr.layer}.N{j}"
        assert r.max_corr == pytest.approx(1.0, abs=1e-4)
        assert r.excess == pytest.approx(r.max_corr - r.baseline_corr)
    tc = run.top_contexts
    tc = tc[(tc.model == nr.model) & (tc.layer == nr.layer) & (tc.neuron == nr.index)]
    c = nr.contexts
    assert list(c["value"]) == list(tc.sort_values("rank")["value"]) and len(c) == ANALYZE["top_k"]
    for r in c.itertuples():
        assert r.before + r.token + r.after == "".join(r.tokens)
        assert r.tokens[r.focus] == r.token
    v = run.vocab
    v = v[(v.model == nr.model) & (v.layer == nr.layer) & (v.neuron == nr.index) & (v.side == "out")]
    top_v = v[v.direction == "top"].sort_values("rank")
    assert list(nr.promoted["token_id"]) == list(top_v["token_id"])
    assert (np.diff(nr.promoted["cosine"]) <= 0).all() and (np.diff(nr.suppressed["cosine"]) >= 0).all()
    d = nr.card_data(n_contexts=2, n_tokens=3)
    assert len(d["contexts"]) == 2 and len(d["promoted"]) == 3 and not d["missing"]
    assert repr(nr).startswith(f"Neuron(L{nr.layer}.N{nr.index} of ")


def test_neuron_activations_and_cosines_against_the_analyze_stage(run):
    top = run.universal().iloc[0]
    nr = run.neuron(f"L{top.layer}.N{top.neuron}")
    a = nr.activations(n_tokens=None)  # the run's tokens, the run's mask: what analyze saw
    assert a.dtype == np.float32
    assert a.mean() == pytest.approx(nr.stats["act_mean"], rel=1e-4, abs=1e-6)
    assert a.max() == pytest.approx(nr.stats["act_max"], rel=1e-5)
    assert a.var() == pytest.approx(nr.stats["act_var"], rel=1e-3)
    assert a.max() == pytest.approx(nr.contexts["value"].iloc[0], rel=1e-5)
    cos = nr.vocab_cosines()
    order = np.argsort(-cos, kind="stable")[: len(nr.promoted)]
    np.testing.assert_array_equal(np.sort(order), np.sort(nr.promoted["token_id"].to_numpy()))
    np.testing.assert_allclose(np.sort(cos)[::-1][: len(nr.promoted)], nr.promoted["cosine"],
                               rtol=1e-5, atol=1e-6)


def test_neuron_plot_panels(run, monkeypatch):
    nr = run.neuron("L1.N20")
    fig = nr.plot(n_tokens=256)
    ax_v, ax_a = fig.axes
    n_act = nr.activations(n_tokens=256).size
    assert sum(p.get_height() for p in ax_a.patches) == n_act
    assert sum(p.get_height() for p in ax_v.patches) == nr.vocab_cosines().size

    def refuse(*a, **k):
        raise UnineuronsError("weights changed")

    monkeypatch.setattr(un.Run, "loaded_model", refuse)
    fig = nr.plot(n_tokens=256)
    ax_v, ax_a = fig.axes
    assert len(ax_v.patches) == 2 * min(5, len(nr.promoted))  # the extremes of vocab.parquet
    assert "weights changed" in ax_a.texts[0].get_text() and not ax_a.patches


def test_neuron_and_model_errors(run, shared):
    _, models, _ = shared
    with pytest.raises(UnineuronsError, match="not of the form"):
        run.neuron("3.12")
    with pytest.raises(UnineuronsError, match="2 layers x 64 neurons"):
        run.neuron("L2.N0")
    with pytest.raises(UnineuronsError, match="not part of run"):
        run.neuron("L0.N0", model="elsewhere")
    with pytest.raises(UnineuronsError, match="out of range"):
        run.neuron("L0.N0", model=3)
    assert run.neuron("L0.N5", model=2).model == models[2]
    assert run.neuron("l0.n5", model=str(Path(models[1]) / ".")).model == models[1]


def test_html_cards_escape_corpus_text(run, tmp_path):
    other = un.open_run(copy_run(run.path, tmp_path / "xss"))
    top = other.universal().iloc[0]
    evil = "<script>alert(1)</script>"
    tc = other.top_contexts.copy()
    hit = np.nonzero(((tc.model == top.model) & (tc.layer == top.layer)
                      & (tc.neuron == top.neuron)).to_numpy())[0]
    for i in hit:
        toks = list(tc.at[i, "window_tokens"])
        toks[0] = evil
        toks[tc.at[i, "position"] - tc.at[i, "window_start"]] = "<b onmouseover=x>"
        tc.at[i, "window_tokens"] = toks
    other._rd.write_table("top_contexts", tc)
    v = other.vocab.copy()
    v.loc[(v.model == top.model) & (v.layer == top.layer) & (v.neuron == top.neuron), "token"] = evil
    other._rd.write_table("vocab", v)
    html = other.neuron(f"L{top.layer}.N{top.neuron}")._repr_html_()
    assert "<script" not in html and "<b onmouseover" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<mark" in html and "&lt;b onmouseover=x&gt;</mark>" in html
    page = other._repr_html_()
    assert "run.neurons" in page and "<script" not in page


# ---- names for other tools -----------------------------------------------------------------

def test_transformer_lens_and_hf_names(run, shared):
    from unineurons.analyses.interventions import load_run_model

    _, models, _ = shared
    t = run.to_transformer_lens_names(["L1.N12", "L0.N3"])
    assert list(t["tl_hook"]) == ["blocks.1.mlp.hook_post", "blocks.0.mlp.hook_post"]
    assert list(t["tl_index"]) == [12, 3]
    assert list(t["hf_module"]) == ["transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_proj"]
    m = load_run_model({"spec": models[0]})
    for r in t.itertuples():
        assert m.model.get_submodule(r.hf_module) is m.adapter.out_proj(r.layer)
    u = run.to_transformer_lens_names()  # the universal neurons by default
    assert list(u["address"]) == list(run.universal()["address"])


def test_hf_module_paths_of_every_architecture():
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    from unineurons.interop import name_table
    from unineurons.models.adapters import get_adapter

    cfgs = {"gpt2": GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=32, vocab_size=64),
            "gpt_neox": GPTNeoXConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=64),
            "llama": LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=64)}
    for kind, cfg in cfgs.items():
        model = AutoModelForCausalLM.from_config(cfg)
        t = name_table(pd.DataFrame({"model": ["m"], "layer": [1], "neuron": [7]}),
                       {"models": [{"spec": "m", "model_type": kind}]})
        assert model.get_submodule(t.at[0, "hf_module"]) is get_adapter(model).out_proj(1), kind
        assert t.at[0, "tl_hook"] == "blocks.1.mlp.hook_post"


def test_export_csv_and_json(run, tmp_path):
    text = run.export(tmp_path / "u.csv")
    back = pd.read_csv(tmp_path / "u.csv")
    assert text == (tmp_path / "u.csv").read_text()
    u = run.universal()
    assert list(back["address"]) == list(u["address"]) and list(back["tl_index"]) == list(u["neuron"])
    np.testing.assert_allclose(back["excess_corr"], u["excess_corr"], rtol=1e-6)
    doc = json.loads(run.export(format="json", all_neurons=True))
    assert doc["criterion"] == "all" and doc["n"] == len(run.neurons) == len(doc["neurons"])
    first = doc["neurons"][0]
    assert first["tl_hook"] == "blocks.0.mlp.hook_post" and "hf_module" in first
    partner = [r for r in doc["neurons"] if r["model"] != run.reference][0]
    assert partner["excess_corr"] is None  # NaN becomes null (partners have no correlations)
    with pytest.raises(UnineuronsError, match="format"):
        run.export(format="xml")  # type: ignore[arg-type]


# ---- the other stages ----------------------------------------------------------------------

def test_report_and_dynamics_through_the_api(shared, tmp_path, tiny_store):
    import shutil

    path, models, _ = shared
    res = un.report(copy_run(path, tmp_path / "rep"), figures=False, models=False)
    assert res.index.is_file() and res.n_neurons > 0
    for step in (1, 2):
        for i, m in enumerate(models[:2]):
            shutil.copytree(m, tmp_path / "fam" / f"s{i}" / f"step{step}")
    dyn = un.dynamics(tmp_path / "dyn", model_template=str(tmp_path / "fam" / "{name}" / "step{step}"),
                      names=["s0", "s1"], steps=[2, 1], tokens=tiny_store, n_tokens=256,
                      universal="top:0.1")
    assert dyn.result.steps == [1, 2]
    assert set(dyn.emergence["step"]) == {1, 2} and len(dyn.persistence)
    assert dyn.step(2).neurons["model"].iloc[0].endswith("step2")
    with pytest.raises(UnineuronsError, match="no step 3"):
        dyn.step(3)
    with pytest.raises(UnineuronsError, match="not a zoo|zoo"):
        un.Zoo(tmp_path / "fam")
