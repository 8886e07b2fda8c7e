"""Initialisation vs data order: the seed grid zoo, its members' seeds, and universality per
partner kind (against a direct computation from matches.parquet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from unineurons.cli import main
from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.engine import run_correlate
from unineurons.correlate.partner_kinds import model_seeds, partner_kind, write_partner_kinds
from unineurons.errors import UnineuronsError
from unineurons.zoo import train_zoo, zoo_checkpoints
from unineurons.zoo.config import check_members, grid_members, member_seeds, parse_pairs

STEPS = 4


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def grid(tiny_store, tmp_path_factory) -> Path:
    """A 2 x 2 micro grid (init 0,1 x data 0,1), 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("grid") / "zoo"
    return train_zoo(tiny_store, out, preset="micro", seeds=grid_members([0, 1], [0, 1]),
                     steps=STEPS, checkpoints=(2,), workers=1)


def test_members_names_and_errors():
    assert grid_members([0, 2], [1]) == ["init0-data1", "init2-data1"]
    assert grid_members([0, 1], [0, 1], parse_pairs("1:0, 0:1")) == ["init1-data0", "init0-data1"]
    assert member_seeds("init3-data7") == (3, 7) and member_seeds(5) == (5, 5)
    with pytest.raises(UnineuronsError, match="not in --init-seeds x --data-seeds"):
        grid_members([0], [0], [(0, 1)])
    with pytest.raises(UnineuronsError, match="given twice"):
        grid_members([0, 0], [1])
    with pytest.raises(UnineuronsError, match="INIT:DATA"):
        parse_pairs("0-1")
    with pytest.raises(UnineuronsError, match="not both"):
        check_members([0, "init0-data1"])
    with pytest.raises(UnineuronsError, match="neither a seed"):
        check_members(["seed3"])


def test_grid_members_differ_in_init_or_data_only(grid, tiny_store, tmp_path):
    ck = zoo_checkpoints(grid)
    assert sorted(ck) == ["init0-data0", "init0-data1", "init1-data0", "init1-data1"]
    for m in ck:
        assert json.loads((grid / m / "member.json").read_text()) == dict(
            zip(("init_seed", "data_seed"), member_seeds(m), strict=True))
        info = json.loads((ck[m][STEPS] / "zoo_checkpoint.json").read_text())
        assert (info["init_seed"], info["data_seed"]) == member_seeds(m)
        assert model_seeds(ck[m][STEPS]) == member_seeds(m)
    # init{S}-data{S} is exactly the plain seed S (the existing --seeds behaviour)
    plain = train_zoo(tiny_store, tmp_path / "plain", preset="micro", seeds=(1,), steps=STEPS,
                      checkpoints=(2,), workers=1)
    assert _same(zoo_checkpoints(plain)[1][STEPS], ck["init1-data1"][STEPS])
    assert model_seeds(zoo_checkpoints(plain)[1][STEPS]) == (1, 1)
    # every pair of members ends different
    names = sorted(ck)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not _same(ck[a][STEPS], ck[b][STEPS])


def test_init_seed_sets_the_weights_and_data_seed_the_order(grid, monkeypatch):
    from unineurons.zoo import train as train_mod

    spec_json = json.loads((grid / "zoo.json").read_text())
    assert spec_json["seeds"] == ["init0-data0", "init0-data1", "init1-data0", "init1-data1"]
    seen = []
    real = train_mod._Order

    class Spy(real):  # records the seed the data order is drawn from
        def __init__(self, seed, n_rows, batch_size):
            seen.append(seed)
            super().__init__(seed, n_rows, batch_size)

    monkeypatch.setattr(train_mod, "_Order", Spy)
    from unineurons.zoo.config import ZooConfig
    from unineurons.zoo.run import _plan

    cfg = ZooConfig.from_preset("micro", steps=STEPS)
    spec, _, tok = _plan(spec_json["tokens"], grid, cfg, STEPS, (2, STEPS), None)
    m01 = train_mod.build_model(spec, "init0-data1").state_dict()
    m00 = train_mod.build_model(spec, "init0-data0").state_dict()
    m10 = train_mod.build_model(spec, "init1-data0").state_dict()
    assert all(torch.equal(m01[k], m00[k]) for k in m00)
    assert not all(torch.equal(m10[k], m00[k]) for k in m00)
    train_mod.train_seed(spec, "init1-data0", tokenizer=tok)  # finished: only sets up
    assert seen == [0]


def test_partner_kinds_match_direct_computation(grid, tiny_store, tmp_path):
    ck = zoo_checkpoints(grid)
    order = ["init0-data0", "init0-data1", "init1-data0", "init1-data1"]
    cfg = CorrelateConfig(models=[str(ck[m][STEPS]) for m in order], tokens=str(tiny_store),
                          n_tokens=1024, batch_size=4, threshold=0.1, checkpoint_tokens=10**9)
    run_correlate(cfg, tmp_path / "run")
    pk = pd.read_parquet(tmp_path / "run" / "partner_kinds.parquet")
    m = pd.read_parquet(tmp_path / "run" / "matches.parquet")
    ref = str(ck["init0-data0"][STEPS])
    kind_of = {str(ck["init0-data1"][STEPS]): "same-init", str(ck["init1-data0"][STEPS]): "same-data",
               str(ck["init1-data1"][STEPS]): "both-different"}
    assert set(pk.partner_kind) == set(kind_of.values()) and set(pk.model) == {ref}
    for partner, kind in kind_of.items():
        sub = m[(m.model == ref) & (m.partner == partner)]
        ex = (sub.max_corr - sub.baseline_corr).to_numpy()
        for layer in range(1):
            row = pk[(pk.partner_kind == kind) & (pk.layer == layer)].iloc[0]
            e = ex[sub.layer.to_numpy() == layer]
            assert row.n_partners == 1 and row.neurons == len(e)
            assert row.mean_excess_corr == pytest.approx(e.mean(), abs=1e-6)  # float32 columns
            assert row.universal_share == pytest.approx((e > 0.1).mean(), abs=1e-12)
    # per neuron: the excess over that kind's partner, in neurons.parquet
    nn = pd.read_parquet(tmp_path / "run" / "neurons.parquet")
    nn = nn[nn.model == ref].sort_values(["layer", "neuron"])
    for partner, kind in kind_of.items():
        sub = m[(m.model == ref) & (m.partner == partner)].sort_values(["layer", "neuron"])
        np.testing.assert_allclose(nn[f"excess_corr_{kind.replace('-', '_')}"],
                                   sub.max_corr - sub.baseline_corr, atol=1e-6)
    # the explicit mapping (hub families) gives the same table; a missing model is one line
    seeds = {str(ck[mm][STEPS]): member_seeds(mm) for mm in order}
    again = write_partner_kinds(tmp_path / "run", seeds)
    pd.testing.assert_frame_equal(again, pk)
    with pytest.raises(UnineuronsError, match="no init/data seeds"):
        from unineurons.correlate.partner_kinds import partner_kinds_table

        partner_kinds_table(m, {ref: (0, 0)}, 0.5)
    assert partner_kind((0, 0), (0, 0)) == "identical"
    # the report draws the four figures of these tables, numbers in their captions
    from unineurons.report.figures import make_figures
    from unineurons.rundir import RunDir

    ids = ["layer_cka", "neuron_basis", "mutual_best", "partner_kinds"]
    drawn, skipped = make_figures(RunDir.open(tmp_path / "run"), formats=("png",), dpi=50, only=ids)
    assert sorted(d.id for d in drawn) == sorted(ids), skipped
    for d in drawn:
        assert (tmp_path / "run" / d.files[0]).is_file() and any(c.isdigit() for c in d.caption)
    cap = next(d.caption for d in drawn if d.id == "partner_kinds")
    assert "same-init (1 partner(s))" in cap and "both-different" in cap


def test_two_partners_of_a_kind_average(tmp_path):
    """Excess over two same-kind partners is their mean, per neuron, before the threshold."""
    from unineurons.correlate.partner_kinds import partner_kinds_table

    rows = []
    for partner, mx in (("b", [0.9, 0.2]), ("c", [0.5, 0.8]), ("d", [0.4, 0.4])):
        for n, v in enumerate(mx):
            rows.append({"model": "a", "partner": partner, "layer": 0, "neuron": n,
                         "max_corr": v, "baseline_corr": 0.1})
    seeds = {"a": (0, 0), "b": (1, 1), "c": (2, 2), "d": (0, 5)}
    pk = partner_kinds_table(pd.DataFrame(rows), seeds, 0.5)
    both = pk[pk.partner_kind == "both-different"].iloc[0]
    # neuron 0: (0.8 + 0.4) / 2 = 0.6 > 0.5; neuron 1: (0.1 + 0.7) / 2 = 0.4
    assert both.n_partners == 2 and both.universal == 1
    assert both.mean_excess_corr == pytest.approx(np.mean([0.6, 0.4]))
    same_init = pk[pk.partner_kind == "same-init"].iloc[0]
    assert same_init.mean_excess_corr == pytest.approx(0.3) and same_init.universal == 0


def test_cli_grid_options(tiny_store, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["zoo", "train", "--tokens", str(tiny_store), "--out", str(tmp_path / "z"),
              "--preset", "micro", "--init-seeds", "0,1"])
    assert e.value.code == 1
    assert "--init-seeds and --data-seeds go together" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    with pytest.raises(SystemExit) as e:
        main(["zoo", "train", "--tokens", str(tiny_store), "--out", str(tmp_path / "z"),
              "--preset", "micro", "--init-seeds", "0", "--data-seeds", "0,1",
              "--grid-pairs", "0:1", "--steps", "2"])
    assert e.value.code in (0, None)
    assert sorted(zoo_checkpoints(tmp_path / "z")) == ["init0-data1"]


def test_seeds_grid_builtin_config():
    from unineurons.pipeline import ZooStage, builtin_config, load_config

    cfg = load_config(text=builtin_config("seeds-grid"))
    assert cfg.zoo is not None and len(cfg.zoo.members()) == 9
    assert cfg.zoo.members()[0] == "init0-data0"
    # configs without a grid hash as before: the new fields stay out of the stage dump
    assert "init_seeds" not in ZooStage().model_dump()
    with pytest.raises(UnineuronsError, match="no built-in config"):
        builtin_config("nope")


def test_run_builtin_cli_errors(tmp_path, capsys):
    for args, msg in ((["run"], "give a CONFIG file or --builtin NAME"),
                      (["run", "--builtin", "nope", "--out", str(tmp_path / "o")],
                       "no built-in config 'nope'")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 1 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dynamics_follows_partner_kinds_over_checkpoints(grid, tiny_store, tmp_path):
    from unineurons.analyses.dynamics import DynamicsConfig, run_dynamics

    order = ["init0-data0", "init0-data1", "init1-data0", "init1-data1"]
    cfg = DynamicsConfig(model_template=f"{grid}/{{name}}/step{{step}}", names=order,
                         steps=[2, STEPS], tokens=str(tiny_store), n_tokens=512, batch_size=4,
                         universal="top:0.1")
    run_dynamics(cfg, tmp_path / "dyn")
    pk = pd.read_parquet(tmp_path / "dyn" / "partner_kinds.parquet")
    assert sorted(pk.step.unique()) == [2, STEPS]
    for t in (2, STEPS):
        one = pd.read_parquet(tmp_path / "dyn" / "steps" / f"step{t}" / "partner_kinds.parquet")
        got = pk[pk.step == t].drop(columns="step").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, one)
    assert set(pk.partner_kind) == {"same-init", "same-data", "both-different"}


def test_partner_kinds_cli_with_explicit_seeds(tmp_path, capsys):
    """Hub families: seeds given on the command line (strings compare as given)."""
    from unineurons.rundir import RunDir

    run = RunDir.create(tmp_path / "run")
    rows = [{"model": "org/m-seed0", "partner": p, "layer": 0, "neuron": n, "max_corr": v,
             "baseline_corr": 0.1}
            for p, vals in (("org/m-data-seed1", [0.9, 0.3]), ("org/m-weight-seed1", [0.2, 0.4]))
            for n, v in enumerate(vals)]
    run.write_table("matches", pd.DataFrame(rows))
    args = ["zoo", "partner-kinds", str(run.path), "--member-seeds", "org/m-seed0=orig:orig",
            "--member-seeds", "org/m-data-seed1=orig:d1", "--member-seeds", "org/m-weight-seed1=w1:orig"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    pk = pd.read_parquet(run.path / "partner_kinds.parquet")
    assert set(pk.partner_kind) == {"same-init", "same-data"}
    assert pk.set_index("partner_kind").loc["same-init", "mean_excess_corr"] == pytest.approx(0.5)
    assert "same-init" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["zoo", "partner-kinds", str(run.path), "--member-seeds", "org/m-seed0"])
    assert e.value.code == 1 and "MODEL=INIT:DATA" in capsys.readouterr().err
