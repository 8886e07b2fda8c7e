"""Seed families by name (issue 12, item 5): the built-in registry's content, the step and seed
syntax, user files, and ``--family`` on the commands."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unineurons.errors import UnineuronsError
from unineurons.models.seed_families import (
    SEED_FAMILIES_ENV,
    expand_steps,
    get_seed_family,
    load_seed_families,
    parse_seeds,
)

PYTHIA_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143001, 1000))


def test_builtin_registry_names_the_published_models():
    fams = load_seed_families()
    small = fams["crfm-gpt2-small"]
    assert small.specs(step=400000) == [
        "stanford-crfm/alias-gpt2-small-x21@checkpoint-400000",
        "stanford-crfm/battlestar-gpt2-small-x49@checkpoint-400000",
        "stanford-crfm/caprica-gpt2-small-x81@checkpoint-400000",
        "stanford-crfm/darkmatter-gpt2-small-x343@checkpoint-400000",
        "stanford-crfm/expanse-gpt2-small-x777@checkpoint-400000"]
    medium = fams["crfm-gpt2-medium"]
    assert [m.id for m in medium.members] == [
        f"stanford-crfm/{n}-gpt2-medium-x{s}" for n, s in
        zip(["arwen", "beren", "celebrimbor", "durin", "eowyn"], [21, 49, 81, 343, 777], strict=True)]
    assert medium.seeds == (21, 49, 81, 343, 777)
    # CRFM: every 10 steps to 100, 50 to 2000, 100 to 20000, 1000 to 400000
    want = (set(range(10, 101, 10)) | set(range(150, 2001, 50)) | set(range(2100, 20001, 100))
            | set(range(21000, 400001, 1000)))
    assert set(small.steps) == want and {30, 750, 1850, 9900, 34000, 344000} <= want
    for size in ("14m", "31m", "70m", "160m", "410m"):
        f = fams[f"pythia-{size}"]
        assert f.specs() == [f"EleutherAI/pythia-{size}"] + [
            f"EleutherAI/pythia-{size}-seed{k}" for k in range(1, 10)]
        assert list(f.steps) == PYTHIA_STEPS and len(f.steps) == 154
        assert f.revision_for(143000) == "step143000" and f.final_step == 143000
    assert fams["pythia-160m"].specs(parse_seeds("0-2"), 143000) == [
        "EleutherAI/pythia-160m@step143000", "EleutherAI/pythia-160m-seed1@step143000",
        "EleutherAI/pythia-160m-seed2@step143000"]
    for kind in ("data", "weight"):
        f = fams[f"pythia-160m-{kind}-seed"]
        assert f.specs() == ["EleutherAI/pythia-160m"] + [
            f"EleutherAI/pythia-160m-{kind}-seed{k}" for k in (1, 2, 3)]
    assert (fams["pythia-410m"].n_layers, fams["pythia-410m"].d_mlp) == (24, 4096)
    assert (fams["crfm-gpt2-small"].n_layers, fams["crfm-gpt2-small"].d_mlp) == (12, 3072)


def test_unknown_seed_step_family_are_clear_errors():
    f = get_seed_family("pythia-160m")
    with pytest.raises(UnineuronsError, match="has no seed 10; its seeds are 0, 1, 2"):
        f.specs(parse_seeds("0-10"))
    with pytest.raises(UnineuronsError, match="no checkpoint at step 1500; nearest: 1000, 2000"):
        f.specs(step=1500)
    with pytest.raises(UnineuronsError, match="no seed family 'pythia-161m'; known: .*pythia-160m"):
        get_seed_family("pythia-161m")
    with pytest.raises(UnineuronsError, match="seed 2 twice"):
        f.select([2, 2])
    # --seeds order is kept: the first is the reference
    assert [m.seed for m in f.select([3, 0])] == [3, 0]


@pytest.mark.parametrize("text,want", [("0-9", list(range(10))), ("21,49", [21, 49]),
                                       ("0,2,5-7", [0, 2, 5, 6, 7]), (" 4 ", [4])])
def test_parse_seeds(text, want):
    assert parse_seeds(text) == want


@pytest.mark.parametrize("bad", ["", "a", "3-1", "1-", "1,,x"])
def test_parse_seeds_rejects(bad):
    with pytest.raises(UnineuronsError):
        parse_seeds(bad)


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(1, 60)),
                min_size=1, max_size=4), st.lists(st.integers(0, 999), max_size=5))
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)  # shared, loaded CPUs
def test_expand_steps_matches_range_union(ranges, singles):
    items = [f"{a}-{a + b}:{e}" for a, b, e in ranges] + singles
    want = set(singles)
    for a, b, e in ranges:
        want |= set(range(a, a + b + 1, e))
    assert expand_steps(items, "t") == tuple(sorted(want))


@pytest.mark.parametrize("bad", ["10-5:1", "1-9:0", "x", "1:2", True])
def test_expand_steps_rejects(bad):
    with pytest.raises(UnineuronsError):
        expand_steps([bad], "t")


USER = """
[families.my-zoo]
description = "two local seeds"
members = [{{ seed = 0, id = "{a}" }}, {{ seed = 1, id = "{b}" }}]

[families.pythia-160m]
description = "replaced"
revision = "step{{step}}"
steps = [5]
members = [{{ seed = 0, id = "x/y" }}]
"""


def test_user_file_adds_and_replaces(tmp_path, monkeypatch):
    f = tmp_path / "fams.toml"
    f.write_text(USER.format(a=tmp_path / "a", b=tmp_path / "b"))
    fams = load_seed_families([f])
    assert fams["my-zoo"].specs() == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert fams["pythia-160m"].specs(step=5) == ["x/y@step5"]
    assert "crfm-gpt2-small" in fams  # built-ins stay
    with pytest.raises(UnineuronsError, match="no checkpoint naming"):
        fams["my-zoo"].specs(step=5)
    monkeypatch.setenv(SEED_FAMILIES_ENV, str(f))
    assert get_seed_family("my-zoo").seeds == (0, 1)
    monkeypatch.setenv(SEED_FAMILIES_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(UnineuronsError, match="nope.toml .UNINEURONS_SEED_FAMILIES. does not exist"):
        load_seed_families()


@pytest.mark.parametrize("body,msg", [
    ('[families.x]\nmembers = []', "needs members"),
    ('[families.x]\nmembers = [{ seed = 0 }]', "is not { seed"),
    ('[families.x]\nmembers = [{ seed = 0, id = "a" }, { seed = 0, id = "b" }]', "same seed"),
    ('[families.x]\nrevision = "main"\nmembers = [{ seed = 0, id = "a" }]', "must contain {step}"),
    ('[families.x]\ncolour = 1\nmembers = [{ seed = 0, id = "a" }]', "unknown field 'colour'"),
    ('[families.x]\nmembers = [{ seed = 0, id = "a@main" }]', "plain hub id"),
    ('[x]\n', "must hold \\[families.NAME\\] tables only"),
    ('[families.x\n', "not valid TOML"),
])
def test_bad_user_file(tmp_path, body, msg):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(UnineuronsError, match=msg):
        load_seed_families([f])


def test_families_command_lists_members_sizes_steps(capsys):
    from unineurons.cli import main

    with pytest.raises(SystemExit) as e:
        main(["families"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("crfm-gpt2-small", "crfm-gpt2-medium", "pythia-14m", "pythia-410m",
                 "pythia-160m-data-seed", "pythia-160m-weight-seed"):
        assert name in out
    assert "154: 0..143000" in out and "608: 10..400000" in out and "checkpoint-{step}" in out
    with pytest.raises(SystemExit):
        main(["families", "pythia-160m"])
    out = capsys.readouterr().out
    assert "EleutherAI/pythia-160m-seed9" in out and "12 layers x 3072" in out


def test_cli_family_options_need_a_family(tmp_path, capsys):
    from unineurons.cli import main

    with pytest.raises(SystemExit) as e:
        main(["correlate", "--tokens", str(tmp_path), "--out", str(tmp_path / "r"),
              "--seeds", "0-2"])
    assert e.value.code == 1
    assert "give --family NAME too" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["correlate", "--tokens", str(tmp_path), "--out", str(tmp_path / "r")])
    assert e.value.code == 1
    assert "--model SPEC (repeat) or --family NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["correlate", "--tokens", str(tmp_path), "--out", str(tmp_path / "r"),
              "--family", "pythia-160m", "--step", "1500"])
    assert e.value.code == 1
    assert "no checkpoint at step 1500" in capsys.readouterr().err


def test_dynamics_family_template():
    from unineurons.analyses.dynamics import expand_template
    from unineurons.cli.families import family_template

    tpl, names = family_template("crfm-gpt2-small", "21,49", [100, 400000], None)
    assert expand_template(tpl, names, [100]) == {100: [
        "stanford-crfm/alias-gpt2-small-x21@checkpoint-100",
        "stanford-crfm/battlestar-gpt2-small-x49@checkpoint-100"]}
    with pytest.raises(UnineuronsError, match="no checkpoint at step 105"):
        family_template("crfm-gpt2-small", None, [105], None)
    with pytest.raises(UnineuronsError, match="needs --steps"):
        family_template("pythia-70m", None, None, None)


class _Stop(UnineuronsError):
    """Raised by the faked stage once it has seen its arguments; the CLI turns it into exit 1."""


def _capture(monkeypatch, module: str, name: str, seen: dict):
    import importlib
    import os

    from unineurons.models.checkpoint import SAFETENSORS_ONLY_ENV

    def fake(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs, strict=os.environ.get(SAFETENSORS_ONLY_ENV))
        raise _Stop

    monkeypatch.setattr(importlib.import_module(module), name, fake)


def test_analyze_ablate_dynamics_expand_the_family(tmp_path, monkeypatch):
    """The family reaches each stage as model specs (seeds in the order given, the step's
    revision), and --safetensors-only holds while the stage runs."""
    from unineurons.cli import main

    monkeypatch.delenv(SEED_FAMILIES_ENV, raising=False)
    seen: dict = {}
    _capture(monkeypatch, "unineurons.analyses.analyze", "analyze_models", seen)
    with pytest.raises(SystemExit):
        main(["analyze", "--family", "pythia-70m", "--seeds", "2,0", "--step", "512",
              "--tokens", str(tmp_path), "--out", str(tmp_path / "a"), "--safetensors-only"])
    assert seen["args"][0] == ["EleutherAI/pythia-70m-seed2@step512", "EleutherAI/pythia-70m@step512"]
    assert seen["strict"] == "1"
    from unineurons.models.checkpoint import SAFETENSORS_ONLY_ENV

    assert SAFETENSORS_ONLY_ENV not in __import__("os").environ  # released with the command

    seen.clear()
    _capture(monkeypatch, "unineurons.analyses.ablate", "run_ablations", seen)
    monkeypatch.setattr("unineurons.rundir.RunDir.open", classmethod(lambda cls, p: p))
    with pytest.raises(SystemExit):
        main(["ablate", str(tmp_path), "--family", "crfm-gpt2-small", "--seeds", "49",
              "--step", "400000"])
    assert seen["args"][1].models == ["stanford-crfm/battlestar-gpt2-small-x49@checkpoint-400000"]
    assert seen["strict"] is None

    seen.clear()
    _capture(monkeypatch, "unineurons.analyses.dynamics", "run_dynamics", seen)
    with pytest.raises(SystemExit):
        main(["dynamics", "--family", "pythia-160m-data-seed", "--seeds", "0-1",
              "--steps", "1000,143000", "--tokens", str(tmp_path), "--out", str(tmp_path / "d")])
    cfg = seen["args"][0]
    assert cfg.model_template == "{name}@step{step}" and cfg.steps == [1000, 143000]
    assert cfg.names == ["EleutherAI/pythia-160m", "EleutherAI/pythia-160m-data-seed1"]


def test_plan_expands_the_family(tmp_path, monkeypatch, capsys):
    """``plan --family`` plans the members ``correlate --family`` would load (step 0 too:
    Pythia publishes it), and the API's ``plan(family=...)`` the same."""
    import unineurons as un
    from unineurons.cli import main

    monkeypatch.delenv(SEED_FAMILIES_ENV, raising=False)
    seen: dict = {}
    _capture(monkeypatch, "unineurons.correlate.estimate", "estimate", seen)
    with pytest.raises(SystemExit) as e:
        main(["plan", "--family", "pythia-70m", "--seeds", "2,0", "--step", "0",
              "--flops-per-s", "1e9"])
    assert e.value.code == 1
    assert seen["args"][0].models == ["EleutherAI/pythia-70m-seed2@step0",
                                      "EleutherAI/pythia-70m@step0"]
    seen.clear()
    with pytest.raises(_Stop):
        un.plan(["x/y"], family="crfm-gpt2-small", seeds=[49], step=400000)
    assert seen["args"][0].models == [
        "x/y", "stanford-crfm/battlestar-gpt2-small-x49@checkpoint-400000"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["plan"])
    assert e.value.code == 1 and "--model SPEC (repeat) or --family NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", "--family", "pythia-70m", "--step", "1500"])
    assert e.value.code == 1 and "no checkpoint at step 1500" in capsys.readouterr().err
    with pytest.raises(UnineuronsError, match="give the models"):
        un.plan()
