"""The pipeline config, stage reuse and the micro demo end to end through the CLI."""

from __future__ import annotations

import json

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
