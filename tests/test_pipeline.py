"""The pipeline config, stage reuse and the micro demo end to end through the CLI."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from unineurons.cli import main
from unineurons.errors import UnineuronsError
from unineurons.pipeline import builtin_config, load_config


def test_builtin_configs_validate():
    for name in ("demo", "micro"):
        cfg = load_config(text=builtin_config(name))
        assert cfg.tokenizer and cfg.tokens and cfg.zoo and cfg.correlate
    assert load_config(text=builtin_config("demo")).zoo.seeds == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("text, key", [
    ("out='x'\n[zoo]\npreset='tiny'\nsedes=[1]\n", "zoo.sedes"),
    ("out='x'\n[zoo]\nseeds=[1]\n", "zoo.seeds"),
    ("out='x'\n[tokens]\nctx='long'\n", "tokens.ctx"),
    ("out='x'\ncolour='red'\n", "colour"),
    ("out='x'\n[correlate]\npairs='some'\n", "correlate.pairs"),
])
def test_bad_config_names_the_key(text, key, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(UnineuronsError, match=f"key '{key}'"):
        load_config(p)


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("out = [unclosed\n")
    with pytest.raises(UnineuronsError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(UnineuronsError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_micro_demo_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--config", "micro", "--out", str(out)])
    assert e.value.code in (0, None)
    text = capsys.readouterr().out
    assert "universal neurons of" in text and "Everything is in" in text
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state) >= {"tokenizer", "tokens", "zoo", "correlate"}
    neurons = pd.read_parquet(out / "run" / "neurons.parquet")
    assert {"max_corr", "baseline_corr", "excess_corr", "is_universal"} <= set(neurons.columns)
    ranked = neurons[neurons.excess_corr.notna()]
    assert len(ranked) and ranked.model.str.contains("seed0").all()  # reference mode
    assert neurons.model.str.contains("/zoo/seed").all()  # analyze adds every seed's neurons
    # a second demo reuses every finished stage
    with pytest.raises(SystemExit):
        main(["demo", "--config", "micro", "--out", str(out)])
    text = capsys.readouterr().out
    for stage in state:
        assert f"stage {stage}: done earlier, reused" in text
    assert json.loads((out / "pipeline.json").read_text()) == state


FAMILY = 'out = "{out}"\n[correlate]\nfamily = "pythia-70m"\ntokens = "{store}"\n'


def test_correlate_section_takes_a_seed_family(tmp_path, monkeypatch):
    """[correlate] family / seeds / step / families_file: the members --family gives, the
    given store for correlate, analyze and ablate; no zoo needed."""
    from unineurons import pipeline
    from unineurons.correlate import engine
    from unineurons.models.seed_families import SEED_FAMILIES_ENV

    monkeypatch.delenv(SEED_FAMILIES_ENV, raising=False)
    base = FAMILY.format(out=tmp_path / "out", store=tmp_path / "store")
    c = load_config(text=base + 'seeds = [2, 0]\nstep = 512\n').correlate
    assert c.family_specs() == ["EleutherAI/pythia-70m-seed2@step512",
                                "EleutherAI/pythia-70m@step512"]
    assert load_config(text=base + 'seeds = "0-1"\nstep = 0\n').correlate.family_specs() == [
        "EleutherAI/pythia-70m@step0", "EleutherAI/pythia-70m-seed1@step0"]
    fams = tmp_path / "fams.toml"
    fams.write_text('[families.mine]\nmembers = [{ seed = 3, id = "org/a" }, '
                    '{ seed = 4, id = "org/b" }]\n')
    text = base.replace("pythia-70m", "mine") + f'families_file = ["{fams}"]\n'
    assert load_config(text=text).correlate.family_specs() == ["org/a", "org/b"]
    # the stage hash of a config without the keys is the one it had before them
    assert not set(pipeline.FAMILY_KEYS) & set(load_config(
        text=builtin_config("micro")).correlate.model_dump())

    cfg = load_config(text=base + 'seeds = [1, 0]\n[analyze]\nn_tokens = 64\n'
                      '[ablate]\nsizes = [1]\nn_tokens = 64\n')
    got: list = []
    monkeypatch.setattr(engine, "run_correlate", lambda cc, out, resume: got.append(cc))
    monkeypatch.setattr("unineurons.analyses.analyze.analyze_run",
                        lambda run, an, resume: got.append(an))
    monkeypatch.setattr("unineurons.rundir.RunDir.open", classmethod(lambda cls, p: p))
    monkeypatch.setattr("unineurons.analyses.ablate.run_ablations", lambda run, a: got.append(a))
    pipeline.run_pipeline(cfg, say=lambda *a: None)
    assert got[0].models == ["EleutherAI/pythia-70m-seed1", "EleutherAI/pythia-70m"]
    assert [x.tokens for x in got] == [str(tmp_path / "store")] * 3


@pytest.mark.parametrize("extra, message", [
    ('family = "nope"\n', "key 'correlate': no seed family 'nope'; known: "),
    ('seeds = [0, 10]\n', "family pythia-70m has no seed 10"),
    ('seeds = "x"\n', "key 'correlate': seeds: 'x' is not a seed or a range like 0-9"),
    ('step = 1500\n', "family pythia-70m has no checkpoint at step 1500"),
    ('reference_seed = 1\n', "reference_seed picks a zoo seed; with family the first of seeds"),
])
def test_bad_family_keys_are_one_clear_line(extra, message, tmp_path):
    text = FAMILY.format(out=tmp_path / "out", store=tmp_path / "store") + extra
    with pytest.raises(UnineuronsError) as e:
        load_config(text=text.replace('family = "pythia-70m"\n', "")
                    if extra.startswith("family") else text)
    assert message in str(e.value) and "\n" not in str(e.value) and "--" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ('[zoo]\nseeds = [0, 1]\n[correlate]\nseeds = [0, 1]\n', "give family = NAME too"),
    ('[zoo]\nseeds = [0, 1]\n[correlate]\nfamilies_file = ["f.toml"]\n', "give family = NAME too"),
    ('[correlate]\nfamily = "pythia-70m"\n', "needs tokens = DIR: a token store built with"),
    ('[correlate]\nn_tokens = 100\n', "[correlate] needs a [zoo] section"),
])
def test_family_keys_without_a_family_or_tokens(text, message):
    with pytest.raises(UnineuronsError, match=re.escape(message)):
        load_config(text=text)
