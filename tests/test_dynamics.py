"""Training dynamics: the persistence / first-step / emergence tables against hand-made universal
sets and set arithmetic, and the whole analysis on a real micro zoo (API, CLI, pipeline)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unineurons.analyses.dynamics import (
    DynamicsConfig,
    expand_template,
    run_dynamics,
    with_defaults,
    zoo_step_models,
)
from unineurons.analyses.dynamics_tables import (
    emergence_table,
    first_universal_table,
    parse_universal,
    persistence_table,
    universal_mask,
)
from unineurons.cli import main
from unineurons.errors import UnineuronsError
from unineurons.io import prepare_out_dir
from unineurons.rundir import RunDir
from unineurons.zoo import train_zoo

STEPS = [10, 20]

# ---- pure functions ------------------------------------------------------------------------

#: Hand-made U_t of member "a" (layers 0 and 1, 4 neurons each) and "b" (empty at step 1).
SETS = {
    "a": {1: {(0, 0), (0, 1), (0, 3), (1, 2)}, 2: {(0, 1), (1, 2), (1, 3)},
          5: {(0, 1), (0, 3), (1, 3)}},
    "b": {1: set(), 2: {(0, 0)}, 5: {(0, 0)}},
}


def _table(sets: dict = SETS) -> pd.DataFrame:
    rows = [{"member": m, "step": t, "layer": layer, "neuron": n, "is_universal": (layer, n) in u}
            for m, by in sets.items() for t, u in by.items()
            for layer in range(2) for n in range(4)]
    # row order must not matter
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_persistence_matches_set_arithmetic():
    got = persistence_table(_table()).set_index(["member", "layer", "step", "later_step"])
    n_rows = 0
    for m, by in SETS.items():
        steps = sorted(by)
        for layer in (-1, 0, 1):
            def sub(t, layer=layer, by=by):
                return {x for x in by[t] if layer == -1 or x[0] == layer}
            for i, t in enumerate(steps):
                for t2 in steps[i:]:
                    a, b = sub(t), sub(t2)
                    r = got.loc[(m, layer, t, t2)]
                    n_rows += 1
                    assert (r.n_universal, r.n_universal_later) == (len(a), len(b))
                    assert (r.n_persist, r.n_union) == (len(a & b), len(a | b))
                    if a:
                        assert r.p_persist == pytest.approx(len(a & b) / len(a))
                    else:  # nothing that could persist: NaN, not 0
                        assert np.isnan(r.p_persist)
                    if a | b:
                        assert r.jaccard == pytest.approx(len(a & b) / len(a | b))
                    else:
                        assert np.isnan(r.jaccard)
    assert n_rows == len(got) == 2 * 3 * 6  # members x layers x pairs t <= t'
    # hand-computed values
    assert got.loc[("a", -1, 1, 5)].p_persist == pytest.approx(0.5)
    assert got.loc[("a", -1, 1, 5)].jaccard == pytest.approx(2 / 5)
    assert got.loc[("a", -1, 2, 5)].p_persist == pytest.approx(2 / 3)
    assert got.loc[("a", 1, 1, 5)].p_persist == 0.0
    assert got.loc[("b", -1, 1, 2)].jaccard == 0.0 and np.isnan(got.loc[("b", -1, 1, 2)].p_persist)
    # a step with itself: 1 whenever U_t is non-empty
    same = got.reset_index()
    same = same[(same.step == same.later_step) & (same.n_universal > 0)]
    assert (same.p_persist == 1).all() and (same.jaccard == 1).all()


def test_first_universal_hand_made():
    got = first_universal_table(_table()).set_index(["member", "layer", "neuron"])
    na = pd.NA
    expect = {  # (universal_steps, first_step, stable_from, universal_final)
        ("a", 0, 0): (1, 1, na, False), ("a", 0, 1): (3, 1, 1, True),
        ("a", 0, 2): (0, na, na, False), ("a", 0, 3): (2, 1, 5, True),
        ("a", 1, 2): (2, 1, na, False), ("a", 1, 3): (2, 2, 2, True),
        ("b", 0, 0): (2, 2, 2, True), ("b", 1, 0): (0, na, na, False),
    }
    for key, (n, first, stable, final) in expect.items():
        r = got.loc[key]
        assert r.universal_steps == n and bool(r.universal_final) is final
        assert (r.first_step is na) if first is na else r.first_step == first
        assert (r.stable_from is na) if stable is na else r.stable_from == stable
    assert len(got) == 2 * 2 * 4
    assert str(got["first_step"].dtype) == "Int64" and str(got["stable_from"].dtype) == "Int64"


def test_universal_mask_threshold_and_top_share():
    excess = np.array([0.5, 0.6, np.nan, 0.6, 0.1, 0.7])
    layer, neuron = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 0, 1, 2])
    # strict >, NaN never universal
    assert universal_mask(excess, layer, neuron, "threshold", 0.5).tolist() == \
        [False, True, False, True, False, True]
    # ceil(0.3 * 6) = 2: the 0.7, then the tie at 0.6 goes to the lower layer
    assert universal_mask(excess, layer, neuron, "top:0.3", 0.5).tolist() == \
        [False, True, False, False, False, True]
    assert universal_mask(excess, layer, neuron, "top:1", 0.5).tolist() == \
        [True, True, False, True, True, True]  # all finite ones; the NaN stays out
    # 0.1 * 30 is 3.0000000000000004 in floats: still 3 neurons, not 4
    e30 = np.linspace(0, 1, 30)
    assert universal_mask(e30, np.zeros(30), np.arange(30), "top:0.1", 0.5).sum() == 3
    assert parse_universal("top:0.05") == ("top", 0.05)
    for bad in ("top:0", "top:1.5", "top:x", "best", ""):
        with pytest.raises(UnineuronsError, match="not understood"):
            parse_universal(bad)


def test_emergence_recounts_universal_per_layer():
    layers = pd.DataFrame({"model": ["m10", "m10", "m20", "m20"], "layer": [0, 1, 0, 1],
                           "neurons": 4, "universal": 99, "universal_share": 9.9,
                           "mean_excess_corr": [0.1, 0.2, 0.3, 0.4], "step": [10, 10, 20, 20],
                           "member": "a"})
    marked = _table({"a": {10: {(0, 0), (0, 1)}, 20: {(1, 3)}}})
    got = emergence_table(layers.iloc[::-1], marked)
    assert got[["step", "layer", "universal"]].values.tolist() == \
        [[10, 0, 2], [10, 1, 0], [20, 0, 0], [20, 1, 1]]
    assert got["universal_share"].tolist() == [0.5, 0.0, 0.0, 0.25]
    assert got["mean_excess_corr"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert list(got.columns[:7]) == ["step", "member", "model", "layer", "neurons", "universal",
                                     "universal_share"]


def test_expand_template_and_config_validation():
    got = expand_template("org/{name}@checkpoint-{step}", ["x21", "b49"], [10, 400])
    assert got == {10: ["org/x21@checkpoint-10", "org/b49@checkpoint-10"],
                   400: ["org/x21@checkpoint-400", "org/b49@checkpoint-400"]}
    assert expand_template("z/{name}/step{step:04d}", ["a", "b"], [7]) == {7: ["z/a/step0007",
                                                                              "z/b/step0007"]}
    with pytest.raises(UnineuronsError, match="must contain"):
        expand_template("org/{name}", ["a", "b"], [1])
    cfg = DynamicsConfig(model_template="o/{name}@c-{step}", names=["a", "b"], steps=[30, 10])
    assert cfg.steps == [10, 30]  # analysed in training order
    t = "o/{name}@{step}"
    bad = [
        (dict(zoo="z", model_template=t, names=["a", "b"], steps=[1]), "either zoo or"),
        (dict(model_template="o/{name}", names=["a", "b"], steps=[1]), "must contain"),
        (dict(model_template="o/{name}/{step}/{rev}", names=["a", "b"], steps=[1]), "found rev"),
        (dict(zoo="z", names=["a", "b"]), "give model_template too"),
        (dict(model_template=t, names=["a", "b"]), "needs steps"),
        (dict(model_template=t, names=["a"], steps=[1]), "at least two names"),
        (dict(model_template=t, names=["a", "a"], steps=[1]), "given twice"),
        (dict(model_template=t, names=["a", "b"], seeds=[0, 1], steps=[1]), "seeds are zoo"),
        (dict(zoo="z", steps=[1, 1]), "given twice"),
        (dict(zoo="z", universal="top:2"), "not understood"),
        (dict(zoo="z", device="tpu"), "device"),
        (dict(zoo="z", memory_budget="lots"), "memory size"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            DynamicsConfig(**kw)


def test_with_defaults_fills_only_what_is_unset():
    d = with_defaults(DynamicsConfig(), "Z", "T", reference_seed=3)
    assert (d.zoo, d.tokens, d.reference_seed) == ("Z", "T", 3)
    d = with_defaults(DynamicsConfig(reference_seed=1, tokens="mine"), "Z", "T", reference_seed=3)
    assert (d.zoo, d.tokens, d.reference_seed) == ("Z", "mine", 1)
    tpl = DynamicsConfig(model_template="o/{name}@{step}", names=["a", "b"], steps=[1])
    assert with_defaults(tpl, "Z", "T").zoo is None


# ---- a real micro zoo ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tiny_store, tiny_heldout_store, tmp_path_factory) -> Path:
    """Three micro seeds with two layers, checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("dyn_zoo") / "zoo"
    return train_zoo(tiny_store, out, preset="micro", seeds=(0, 1, 2), steps=20,
                     checkpoints=(10,), heldout=tiny_heldout_store, workers=1, n_layer=2)


@pytest.fixture(scope="module")
def dyn(zoo, tiny_heldout_store, tmp_path_factory):
    """run_dynamics at threshold 0 (about half the neurons universal: non-trivial sets)."""
    cfg = DynamicsConfig(zoo=str(zoo), tokens=str(tiny_heldout_store), threshold=0.0,
                         batch_size=16)
    return cfg, run_dynamics(cfg, tmp_path_factory.mktemp("dyn") / "run")


def test_zoo_step_models_and_errors(zoo):
    members, steps, models = zoo_step_models(zoo, None, 1, None)
    assert members == ["seed1", "seed0", "seed2"] and steps == STEPS
    assert models[10] == [str(zoo / f"seed{s}" / "step10") for s in (1, 0, 2)]
    with pytest.raises(UnineuronsError, match="seed 0 has no checkpoint at step 15"):
        zoo_step_models(zoo, None, 0, [10, 15])
    with pytest.raises(UnineuronsError, match="--reference-seed 5 is not among"):
        zoo_step_models(zoo, [0, 1], 5, None)
    with pytest.raises(UnineuronsError, match="at least two seeds"):
        zoo_step_models(zoo, [0], 0, None)
    with pytest.raises(UnineuronsError, match="has no seed 9"):
        zoo_step_models(zoo, [0, 9], 0, None)


def test_tables_equal_each_steps_run(dyn):
    cfg, res = dyn
    assert res.steps == STEPS and res.members == ["seed0", "seed1", "seed2"]
    universal = {}
    for t in STEPS:
        sub = RunDir.open(res.run.path / "steps" / f"step{t}")
        layers = sub.read_table("layers")
        em = res.emergence[res.emergence.step == t]
        # emergence rows are the step's layers.parquet (same threshold: same counts)
        pd.testing.assert_frame_equal(em[list(layers.columns)].reset_index(drop=True), layers,
                                      check_dtype=False)
        neurons = sub.read_table("neurons")
        tr = res.trajectories[res.trajectories.step == t].reset_index(drop=True)
        cols = ["layer", "neuron", "address", "model", "excess_corr", "max_corr",
                "baseline_corr", "is_universal"]
        pd.testing.assert_frame_equal(tr[cols], neurons[cols])
        universal[t] = {(int(a), int(b)) for a, b in
                        zip(neurons.layer[neurons.is_universal], neurons.neuron[neurons.is_universal],
                            strict=True)}
    assert all(0 < len(u) < 256 for u in universal.values())  # non-trivial sets
    p = res.persistence.set_index(["member", "layer", "step", "later_step"])
    inter = universal[10] & universal[20]
    assert p.loc[("seed0", -1, 10, 20)].p_persist == pytest.approx(len(inter) / len(universal[10]))
    assert p.loc[("seed0", -1, 10, 20)].jaccard == \
        pytest.approx(len(inter) / len(universal[10] | universal[20]))
    assert (p.xs(10, level="later_step").p_persist == 1).all()  # the step with itself
    first = res.first_universal.set_index(["layer", "neuron"])
    for key in [(a, b) for a in range(2) for b in range(128)]:
        r = first.loc[key]
        stable = 10 if key in inter else 20 if key in universal[20] else pd.NA
        assert (r.stable_from is pd.NA) if stable is pd.NA else r.stable_from == stable
        assert bool(r.universal_final) == (key in universal[20])
    # the manifest records what was run, and the config round-trips
    m = res.run.manifest()["dynamics"]
    assert DynamicsConfig(**m["config"]) == cfg and m["steps"] == STEPS and m["final_step"] == 20
    assert m["runs"]["10"]["models"] == [str(Path(cfg.zoo) / f"seed{s}" / "step10")
                                         for s in range(3)]
    assert m["universal"] == {"rule": "threshold", "threshold": 0.0}
    for name in ("emergence", "persistence", "first_universal", "trajectories"):
        assert res.run.has_table(name)
    assert not res.run.has_table("dynamics_ablations")


def test_rerun_reuses_every_step(dyn):
    cfg, res = dyn
    again = run_dynamics(cfg, res.run.path)
    assert again.reused == STEPS
    pd.testing.assert_frame_equal(again.persistence, res.persistence)
    pd.testing.assert_frame_equal(again.trajectories, res.trajectories)


def test_template_on_local_folders_and_pairs_all_match_the_zoo_run(dyn, zoo, tmp_path):
    cfg, res = dyn
    tpl = DynamicsConfig(model_template=f"{zoo}/seed{{name}}/step{{step}}", names=["0", "1", "2"],
                         steps=STEPS, tokens=cfg.tokens, threshold=0.0, batch_size=16)
    got = run_dynamics(tpl, tmp_path / "tpl")
    assert got.members == ["0", "1", "2"]
    num = ["universal", "mean_excess_corr", "mean_max_corr", "share_max_gt_0.7"]
    pd.testing.assert_frame_equal(got.emergence[num], res.emergence[num])
    pd.testing.assert_frame_equal(got.persistence.drop(columns="member"),
                                  res.persistence.drop(columns="member"))
    both = run_dynamics(cfg.model_copy(update={"pairs": "all"}), tmp_path / "all")
    assert set(both.persistence.member) == set(both.emergence.member) == {"seed0", "seed1",
                                                                          "seed2"}
    ref = both.trajectories[both.trajectories.member == "seed0"].reset_index(drop=True)
    np.testing.assert_allclose(ref.excess_corr, res.trajectories.excess_corr, atol=1e-5)


def test_cli_end_to_end_with_top_share_and_ablations(zoo, tiny_heldout_store, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["dynamics", "--zoo", str(zoo), "--steps", "10,20", "--tokens",
            str(tiny_heldout_store), "--out", str(out), "--universal", "top:0.1",
            "--batch-size", "16", "--ablate", "--ablate-sizes", "4,all", "--ablate-draws", "1",
            "--ablate-n-tokens", "256"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "universal share per layer and step (seed0)" in text
    assert "P(t → 20)" in text and "step 20: " in text
    k = math.ceil(0.1 * 256)  # |U_t| under top:0.1 of 2 x 128 neurons
    em = pd.read_parquet(out / "emergence.parquet")
    assert em.groupby("step")["universal"].sum().tolist() == [k, k]
    abl = pd.read_parquet(out / "dynamics_ablations.parquet")
    assert list(abl.columns[:3]) == ["step", "member", "model"]
    assert sorted(abl.step.unique()) == STEPS
    uni = abl[abl.set == "universal"]
    assert sorted(uni["size"].unique()) == sorted(["4", str(k)])  # 'all' is U_t itself
    assert (uni.loc[uni["size"] == str(k), "n_ablated"] == k).all()
    for t in STEPS:
        sub = pd.read_parquet(out / "steps" / f"step{t}" / "ablations.parquet")
        pd.testing.assert_frame_equal(abl[abl.step == t].drop(columns=["step", "member"])
                                      .reset_index(drop=True), sub)
    # a second run reuses correlations and ablations of every step
    with pytest.raises(SystemExit):
        main(argv)
    capsys.readouterr()
    runs = json.loads((out / "manifest.json").read_text())["dynamics"]["runs"]
    assert all(r["reused"] and r["ablate"]["reused"] for r in runs.values())
    pd.testing.assert_frame_equal(pd.read_parquet(out / "dynamics_ablations.parquet"), abl)


def test_cli_errors_are_one_line(zoo, tiny_heldout_store, tmp_path, capsys):
    base = ["dynamics", "--tokens", str(tiny_heldout_store), "--out", str(tmp_path / "x")]
    for extra, msg in [
        (["--zoo", str(zoo), "--model-template", "a/{name}@{step}", "--names", "a,b",
          "--steps", "1"], "either zoo or model_template"),
        (["--zoo", str(zoo), "--steps", "10,15"], "seed 0 has no checkpoint at step 15"),
        (["--zoo", str(zoo), "--universal", "top:7"], "not understood"),
        (["--names", "a,b"], "give model_template too"),
        ([], "needs a seed family"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip()]
        assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert msg in lines[0]
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(SystemExit) as e:
        main(["dynamics", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for opt in ("--zoo", "--steps", "--model-template", "--names", "--universal", "--ablate"):
        assert opt in out


def test_offline_hub_model_names_the_model(tiny_heldout_store, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # the flag is read when huggingface_hub is imported: set the constant, not the variable
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DynamicsConfig(model_template="stanford-crfm/{name}@checkpoint-{step}",
                         names=["alias-gpt2-small-x21", "battlestar-gpt2-small-x49"],
                         steps=[100], tokens=str(tiny_heldout_store))
    with pytest.raises(UnineuronsError,
                       match="model stanford-crfm/alias-gpt2-small-x21@checkpoint-100: cannot load"):
        run_dynamics(cfg, tmp_path / "hub")


def test_pipeline_dynamics_stage(zoo, tiny_store, tiny_heldout_store, tmp_path, capsys):
    out = prepare_out_dir(tmp_path / "pipe", "pipeline")  # token stores made earlier, as here
    for src, dst in ((tiny_store, "train"), (tiny_heldout_store, "heldout")):
        shutil.copytree(src, out / "tokens" / dst)
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'out = "{out}"\n[zoo]\npreset = "micro"\nseeds = [0, 1]\nsteps = 6\n'
                   'checkpoints = [3, 6]\nworkers = 1\n[dynamics]\nuniversal = "top:0.1"\n')
    with pytest.raises(SystemExit) as e:
        main(["run", str(cfg)])
    assert e.value.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    assert "stage dynamics" in text and "P(t → 6)" in text
    m = json.loads((out / "dynamics" / "manifest.json").read_text())["dynamics"]
    assert m["steps"] == [3, 6] and m["config"]["zoo"] == str(out / "zoo")
    assert m["config"]["tokens"] == str(out / "tokens" / "heldout")
    with pytest.raises(SystemExit):
        main(["run", str(cfg)])
    assert "stage dynamics: done earlier, reused" in capsys.readouterr().out
