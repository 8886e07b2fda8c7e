"""``unineurons show`` and ``unineurons export``: the neuron card in the terminal (its numbers
from the tables, corpus text printed as text, never as rich markup) and the name export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _apirun import api_run, copy_run

import unineurons as un
from unineurons.cli import main


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_tokenizer, tiny_store):
    return api_run(tmp_path_factory.mktemp("api"), tiny_tokenizer, tiny_store)


@pytest.fixture(scope="module")
def run(shared) -> un.Run:
    return un.open_run(shared[0])


def _cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_show_prints_the_card(run, shared, capsys):
    _, models, _ = shared
    top = run.universal().iloc[0]
    addr = f"L{top.layer}.N{top.neuron}"
    rc, out, _ = _cli(capsys, "show", run.path, addr, "--contexts", 3, "--tokens", 4)
    assert rc == 0
    nr = run.neuron(addr)
    assert f"{addr} of {models[0]}" in out and "universal" in out
    for m in nr.matches.itertuples():  # every partner, its best match, ρ and baseline
        assert m.partner in out and m.partner_address in out
        assert f"{m.max_corr:.3f}" in out and f"{m.baseline_corr:.3f}" in out
    assert f"{nr.stats['excess_corr']:.4g}" in out
    if "mutual_best" in nr.matches.columns:  # one-to-one matching, when correlate wrote it
        assert "mutual" in out and "yes" in out  # a permuted copy: its own mutual best match
    for label in ("activation kurtosis", "vocab cos kurtosis", "role", "family"):
        assert label in out
    assert repr(nr.promoted["token"].iloc[0].replace("\n", "⏎")) in out
    assert "top contexts" in out
    if "role_calibrated" in nr.stats.index:  # both role rules, when analyze wrote them
        assert f"calibrated: {nr.stats['role_calibrated']}" in out
    values = [line.split()[1] for line in out.splitlines()
              if len(line.split()) > 1 and _is_float(line.split()[1])]
    assert f"{nr.contexts['value'].iloc[0]:.3g}" in values


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def test_show_prints_markup_in_corpus_text_as_text(run, tmp_path, capsys):
    other = un.open_run(copy_run(run.path, tmp_path / "markup"))
    tc = other.top_contexts.copy()
    nr = other.neuron("L1.N20")
    hit = np.nonzero(((tc.model == nr.model) & (tc.layer == 1) & (tc.neuron == 20)).to_numpy())[0]
    payloads = ["[bold red]x[/bold red]", "[/]", "[link=file:///etc]y[/link]", "\\[z"]
    for i in hit:
        toks = list(tc.at[i, "window_tokens"])
        toks[: len(payloads)] = payloads
        toks[tc.at[i, "position"] - tc.at[i, "window_start"]] = "[/]"
        tc.at[i, "window_tokens"] = toks
    other._rd.write_table("top_contexts", tc)
    rc, out, err = _cli(capsys, "show", other.path, "L1.N20", "--model", 0, "--contexts", 1)
    assert rc == 0, err
    assert "".join(payloads) in out  # every character printed, markup not interpreted


def test_show_model_option_and_errors(run, shared, capsys):
    _, models, _ = shared
    rc, out, _ = _cli(capsys, "show", run.path, "L0.N3", "--model", 2)
    assert rc == 0 and f"L0.N3 of {models[2]}" in out
    assert "not in this run: matches" in out  # partners have no correlations of their own
    rc, out, _ = _cli(capsys, "show", run.path, "L0.N3", "--model", models[1])
    assert rc == 0 and f"L0.N3 of {models[1]}" in out
    rc, _, err = _cli(capsys, "show", run.path, "L7.N3")
    assert rc == 1 and err.count("\n") == 1 and "is not a neuron of" in err
    rc, _, err = _cli(capsys, "show", run.path, "L0.N3", "--model", "nope")
    assert rc == 1 and "not part of run" in err


def test_export_command_equals_the_api(run, tmp_path, capsys):
    rc, out, _ = _cli(capsys, "export", run.path)
    assert rc == 0 and out == run.export()
    rc, out, _ = _cli(capsys, "export", run.path, "--format", "json", "--out", tmp_path / "u.json")
    assert rc == 0 and f"{len(run.universal())} neurons written" in out
    doc = json.loads((tmp_path / "u.json").read_text())
    assert [r["address"] for r in doc["neurons"]] == list(run.universal()["address"])
    rc, out, _ = _cli(capsys, "export", run.path, "--criterion", "calibrated")
    assert rc == 0 and out == run.export(criterion="calibrated")
    assert not (tmp_path / "nothing").exists()


def test_export_with_no_paper_universal_neuron_points_at_the_calibrated_set(run, tmp_path, capsys):
    other = un.open_run(copy_run(run.path, tmp_path / "none"))
    n = other.neurons
    other._rd.write_table("neurons", n.assign(is_universal=n["is_universal"] & False))
    rc, out, err = _cli(capsys, "export", other.path)
    assert rc == 0 and out.count("\n") == 1  # the header only
    k = int(n["is_universal_calibrated"].fillna(False).astype(bool).sum())
    assert k > 0 and f"{k} pass the calibrated criterion (--criterion calibrated)" in err
    rc, out, err = _cli(capsys, "export", run.path)
    assert rc == 0 and "note:" not in err
