"""Every phase of every command shows a progress bar with its rate (issue 15).

Real commands run end to end through the CLI on the tiny fixtures, each under
:func:`unineurons.progress.record_bars`; the tests name the phases each command must show a
bar for, with a total and a unit. A phase that loses its bar fails here. The bars' rendering
(``N unit/s``) and their nesting are tested on their own.
"""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from unineurons import progress as progress_mod
from unineurons.cli import main
from unineurons.progress import BarRecord, format_rate, progress, record_bars, set_quiet, track

# ---- rendering and nesting -----------------------------------------------------------------

def test_format_rate_reads_as_count_per_second():
    assert format_rate(1234.4, "neurons") == "1,234 neurons/s"
    assert format_rate(41.26, "layers") == "41.3 layers/s"
    assert format_rate(0.41234, "layer pairs") == "0.412 layer pairs/s"
    assert format_rate(None, "tokens") == "? tokens/s"


@pytest.fixture
def drawn(monkeypatch):
    """Bars drawn (not quiet) into a string buffer, returned by calling the fixture."""
    buf = io.StringIO()
    monkeypatch.setattr(progress_mod, "_console",
                        lambda: Console(file=buf, width=200, force_terminal=False))
    set_quiet(False)
    yield buf.getvalue
    set_quiet(True)  # conftest keeps the suite quiet


def test_a_bar_renders_its_rate_in_its_unit(drawn):
    with progress("vocabulary moments", 4000, unit="neurons") as bar:
        for _ in range(4):
            time.sleep(0.02)
            bar.advance(1000)
    line = next(x for x in drawn().splitlines() if "vocabulary moments" in x)
    assert "4000/4000" in line
    rate = re.search(r"([\d,.]+) neurons/s", line)
    assert rate, line
    # 4000 neurons in at least 0.08 s: at most 50,000 neurons/s (never "?" once finished)
    assert 0 < float(rate.group(1).replace(",", "")) <= 50_000


def test_nested_bars_share_one_display_and_each_keeps_its_line(drawn, monkeypatch):
    monkeypatch.setattr(progress_mod, "KEEP_NESTED_S", 0.0)  # every nested line kept
    with progress("outer phase", 2, unit="blocks") as outer:
        for i in range(2):
            with progress(f"inner phase {i}", 10, unit="rotations") as inner:
                inner.advance(10)
            outer.advance(1)
    assert progress_mod._LIVE is None and progress_mod._OPEN == 0  # the display is closed
    text = drawn()
    for name, unit in (("outer phase", "blocks"), ("inner phase 0", "rotations"),
                       ("inner phase 1", "rotations")):
        lines = [x for x in text.splitlines() if x.startswith(name)]
        assert lines and re.search(rf"[\d,.]+ {unit}/s", lines[-1]), (name, text)


def test_short_or_failed_nested_bars_leave_no_line(drawn, monkeypatch):
    """A nested phase shorter than KEEP_NESTED_S, or one ended by an exception, is dropped
    from the scrollback (a per-block phase under --split-half would flood it); the display
    still closes."""
    monkeypatch.setattr(progress_mod, "KEEP_NESTED_S", 0.05)
    with progress("outer phase", 3, unit="blocks") as outer:
        with progress("quick inner", 1, unit="rotations") as inner:
            inner.advance(1)
        with progress("slow inner", 1, unit="rotations") as inner:
            time.sleep(0.1)
            inner.advance(1)
        with pytest.raises(RuntimeError), progress("failed inner", 1, unit="rotations") as inner:
            time.sleep(0.1)
            raise RuntimeError("boom")
        outer.advance(3)
    assert progress_mod._LIVE is None and progress_mod._OPEN == 0
    lines = drawn().splitlines()
    assert any(x.startswith("slow inner") for x in lines)
    assert not any(x.startswith(("quick inner", "failed inner")) for x in lines)


def test_record_bars_lists_bars_even_when_quiet():
    with record_bars() as outer, progress("a", 3, unit="steps"), record_bars() as inner:
        assert list(track([1, 2], "b", unit="models")) == [1, 2]
    assert outer == [BarRecord("a", 3, "steps"), BarRecord("b", 2, "models")]
    assert inner == [BarRecord("b", 2, "models")]


# ---- every command's phases ----------------------------------------------------------------

def _cli(records: dict, name: str, *argv: str) -> None:
    with record_bars() as rec, pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code in (0, None), f"{name} failed"
    records[name] = rec


@pytest.fixture(scope="module")
def bars(tmp_path_factory, tiny_corpus, tiny_tokenizer, tiny_store, tiny_heldout_store,
         make_gpt2) -> dict[str, list[BarRecord]]:
    """Per command, the bars it opened: every command of the CLI that has long phases, run
    once on tiny inputs (a few hundred tokens, two 2-layer models)."""
    root = tmp_path_factory.mktemp("phases")
    rec: dict[str, list[BarRecord]] = {}
    _cli(rec, "tokenizer train", "tokenizer", "train", "--source", tiny_corpus,
         "--vocab-size", "300", "--max-chars", "20000", "--out", str(root / "tok"))
    _cli(rec, "tokens build", "tokens", "build", "--source", tiny_corpus, "--tokenizer",
         str(tiny_tokenizer), "--ctx", "32", "--n-tokens", "512", "--out", str(root / "store"))
    _cli(rec, "tokens info", "tokens", "info", str(tiny_store))
    _cli(rec, "zoo train", "zoo", "train", "--tokens", str(tiny_store), "--out",
         str(root / "zoo"), "--preset", "micro", "--seeds", "0,1", "--steps", "4",
         "--checkpoints", "2", "--workers", "1")
    models = [str(make_gpt2(root / f"m{s}", s)) for s in (0, 1)]
    run = str(root / "run")
    _cli(rec, "correlate", "correlate", "--model", models[0], "--model", models[1], "--tokens",
         str(tiny_store), "--out", run, "--n-tokens", "512", "--null-rotations", "8")
    _cli(rec, "analyze", "analyze", run, "--n-tokens", "256", "--batch-size", "16",
         "--role-null-quantile", "0.99", "--role", "null_directions=1000",
         # one entropy candidate whatever the random weights: its confirmation runs too
         "--role", "entropy_min_null_frac=0", "--role", "entropy_norm_quantile=0",
         "--role", "entropy_max_candidates=1", "--role", "entropy_n_random=1",
         "--role", "entropy_n_contexts=2", "--role", "entropy_values=0,1")
    _cli(rec, "ablate", "ablate", run, "--method", "mean", "--sizes", "1,4", "--random-draws",
         "1", "--n-tokens", "128", "--batch-size", "16")
    _cli(rec, "intervene", "intervene", run, "--neuron", "L0.N1", "--values", "0,1",
         "--random-baseline", "1", "--n-tokens", "128")
    _cli(rec, "dynamics", "dynamics", "--zoo", str(root / "zoo"), "--tokens",
         str(tiny_heldout_store), "--out", str(root / "dyn"), "--n-tokens", "256",
         "--null-rotations", "8", "--batch-size", "16")
    _cli(rec, "report", "report", run, "--formats", "png", "--dpi", "50",
         "--max-context-neurons", "8")
    return rec


#: Per command, the phases (bar descriptions, by prefix) whose time grows with the tokens,
#: neurons, blocks, rotations, checkpoints, figures or pages.
PHASES = {
    "tokenizer train": ["reading ", "training BPE"],
    "tokens build": ["reading ", "tokenizing ", "hashing tokens.npy"],
    "tokens info": ["verifying "],
    "zoo train": ["zoo micro x2"],
    "correlate": ["loading models", "verifying ", "baseline rotations", "correlate pass 1/1",
                  "summarising pass 1/1", "max correlations", "ceiling correlations",
                  "calibrated null", "layer similarity", "one-to-one matching",
                  "correlate tables"],
    "analyze": ["loading models", "analyze", "neuron statistics and top contexts",
                "vocabulary moments (out) of ", "vocabulary moments (in) of ", "top tokens of ",
                "unembedding null space of ", "null-space share of ", "activation scales of ",
                "entropy neurons of ", "attention scores of ", "role null of "],
    "ablate": ["mean activations of ", "ablating in "],
    "intervene": ["intervening on "],
    "dynamics": ["dynamics", "correlate pass 1/1", "summarising pass 1/1", "calibrated null",
                 "correlate tables"],
    "report": ["figures", "window activations of ", "checking windows of ",
               "neuron pages: top contexts", "neuron pages: vocabulary"],
}


#: Phases whose total is unknown when they start: the first read of a corpus (its size is
#: what the read finds out); a later read of the same source knows it.
OPEN_ENDED = {"reading "}


@pytest.mark.parametrize("command", sorted(PHASES))
def test_each_phase_has_a_bar_with_total_and_unit(bars, command):
    got = bars[command]
    for phase in PHASES[command]:
        hits = [b for b in got if b.description.startswith(phase)]
        assert hits, f"{command}: no bar for phase {phase!r}; bars: {[b.description for b in got]}"
        for b in hits:
            assert b.unit and b.unit.strip(), b
            if phase not in OPEN_ENDED:
                assert b.total is not None and b.total > 0, b


def test_only_the_first_reading_of_a_corpus_is_open_ended(bars):
    open_ended = {b.description for rec in bars.values() for b in rec if b.total is None}
    assert all(d.startswith("reading ") for d in open_ended), open_ended
    assert all(b.unit for rec in bars.values() for b in rec)

