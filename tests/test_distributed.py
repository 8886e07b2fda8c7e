"""The Ray backend of correlate: shard states merge exactly, Ray runs equal local runs, a failed
shard is retried, and a killed run resumes from its finished shards.

The Ray tests share one local Ray instance (2 CPUs, a module-scoped fixture) and its worker
pool; without ``ray`` installed only the Ray-free tests run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from unineurons.correlate.config import CorrelateConfig
from unineurons.correlate.distributed import TASK, correlate_job
from unineurons.correlate.engine import _PassState, plan_for, run_correlate
from unineurons.correlate.plan import ModelShape
from unineurons.errors import UnineuronsError
from unineurons.models.load import load_model
from unineurons.rundir import RunDir
from unineurons.sharding import FAULT_ENV, ShardWorker, release_workers, require_ray, shard_ranges
from unineurons.stream import activation_stream
from unineurons.tokens import TokenStore

N_TOK = 2048  # 32 contexts of 64: 8 shards of 4 contexts with 2 workers


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, make_gpt2) -> list[str]:
    """Three random 2-layer GPT-2s (d_mlp 64)."""
    root = tmp_path_factory.mktemp("dist_seeds")
    return [str(make_gpt2(root / f"s{i}", i)) for i in range(3)]


def _cfg(models, store, **kw) -> CorrelateConfig:
    base = dict(models=list(models), tokens=str(store), n_tokens=N_TOK, batch_size=2,
                accumulate_tokens=128, checkpoint_tokens=10**9)
    base.update(kw)
    return CorrelateConfig(**base)


def _assert_same_tables(a: Path, b: Path, atol: float) -> None:
    """neurons and matches of two runs agree to ``atol``; argmax indices exactly."""
    na, nb = pd.read_parquet(a / "neurons.parquet"), pd.read_parquet(b / "neurons.parquet")
    # calibrated p-values step by 1 / (1 + pooled null draws): rounding can move a neuron by a
    # step (correlate/calibrate.py); compared at that resolution, q through the flags
    cal = [c for c in ("p_value", "q_value", "is_universal_calibrated") if c in na]
    if cal:
        np.testing.assert_allclose(na.p_value, nb.p_value, atol=3e-3)
        assert (na.is_universal_calibrated == nb.is_universal_calibrated).mean() > 0.99
        na, nb = na.drop(columns=cal), nb.drop(columns=cal)
    pd.testing.assert_frame_equal(na, nb, check_exact=False, atol=atol, rtol=0)
    ma, mb = pd.read_parquet(a / "matches.parquet"), pd.read_parquet(b / "matches.parquet")
    pd.testing.assert_frame_equal(ma, mb, check_exact=False, atol=atol, rtol=0)
    assert (ma.argmax_neuron == mb.argmax_neuron).all() and (ma.argmax_layer == mb.argmax_layer).all()


# ---- without Ray -------------------------------------------------------------------------------

def test_shard_ranges_cover_the_gaps():
    assert shard_ranges(0, 32, [], 8) == [(i, i + 4) for i in range(0, 32, 4)]
    r = shard_ranges(4, 33, [(8, 12), (20, 24)], 4)
    covered = sorted(r + [(8, 12), (20, 24)])
    assert covered[0][0] == 4 and covered[-1][1] == 33
    assert all(x[1] == y[0] for x, y in zip(covered, covered[1:], strict=False))  # contiguous, no overlap
    assert max(b - a for a, b in r) <= -(-21 // 4)
    assert shard_ranges(0, 10, [(0, 10)], 4) == []
    assert shard_ranges(0, 3, [], 8) == [(0, 1), (1, 2), (2, 3)]  # never an empty shard


def test_missing_ray_and_misplaced_options_are_clear_errors(monkeypatch, seeds, tiny_store, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(UnineuronsError, match=r"pip install 'unineurons\[ray\]'"):
        require_ray()
    with pytest.raises(UnineuronsError, match=r"unineurons\[ray\]"):
        run_correlate(_cfg(seeds[:2], tiny_store, backend="ray"), tmp_path / "run")
    with pytest.raises(ValueError, match="workers only apply with --backend ray"):
        _cfg(seeds[:2], tiny_store, workers=2)


def _worker_job(seeds, store, **kw):
    cfg = _cfg(seeds, store, backend="ray", **kw)
    models = [load_model(s) for s in seeds]
    shapes = [ModelShape(m.adapter.n_layers, m.adapter.d_mlp) for m in models]
    plan = plan_for(cfg, shapes, 64)
    return cfg, models, shapes, plan, correlate_job(cfg, models, shapes, 128, "hash")


def _extra(units) -> dict:
    return {"units": [dataclasses.asdict(u) for u in units], "fresh_layercov": True}


def test_shard_states_merge_to_the_direct_covariance(seeds, tiny_store):
    """Shards run by the worker code (in-process, no Ray) and merged by the driver's code give
    the covariance numpy computes from the captured activations."""
    cfg, models, shapes, plan, job = _worker_job(seeds[:2], tiny_store, dtype="float64")
    units = plan.passes[0]
    w = ShardWorker()
    merged = _PassState(units, shapes, "cpu", torch.float64, None)
    for c0, c1 in ((0, 5), (5, 6), (6, 32)):  # uneven shards, one of a single context
        data = w.run(TASK, job, "pass0", c0, c1, _extra(units))
        from safetensors.torch import load

        merged.merge_from(load(data).__getitem__)
    store = TokenStore.open(tiny_store)
    acts = [[], []]
    for b in activation_stream(models, store.contexts(N_TOK), store.manifest["tokenizer"], batch_size=7):
        for i in range(2):
            acts[i].append(b.acts[i].double().numpy())
    x, y = (np.concatenate(a) for a in acts)
    pair = next(u for u in units if u.kind == "pair")
    co = merged.co[pair.key()].result()
    assert int(co["n"]) == x.shape[0]
    np.testing.assert_allclose(co["cov"].numpy(), np.cov(x.T, y.T, bias=True)[:128, 128:], atol=1e-10)
    lc = merged.layercov[1].result()["cov"].numpy()
    np.testing.assert_allclose(lc[1], np.cov(y[:, 64:].T, bias=True), atol=1e-10)


def test_worker_refuses_other_files(seeds, tiny_store):
    cfg, models, shapes, plan, job = _worker_job(seeds[:2], tiny_store)
    extra = _extra(plan.passes[0])
    bad = {**job, "weights": [job["weights"][0], "0" * 64]}
    with pytest.raises(UnineuronsError, match="other weights than on the driver"):
        ShardWorker().run(TASK, bad, "pass0", 0, 2, extra)
    bad = {**job, "token_sha256": "0" * 64}
    with pytest.raises(UnineuronsError, match="differs from the driver's"):
        ShardWorker().run(TASK, bad, "pass0", 0, 2, extra)
    with pytest.raises(ValueError, match="not a unineurons shard function"):
        ShardWorker().run("os:system", job, "pass0", 0, 2, extra)


# ---- on a local Ray instance -------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU local Ray instance; ``faults`` is the fault-injection folder its workers read."""
    ray = pytest.importorskip("ray")
    faults = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_ENV] = str(faults)  # the raylet inherits it, and so every worker
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "faults": faults}
    finally:
        release_workers()
        ray.shutdown()
        del os.environ[FAULT_ENV]


def _ray_stats(run: Path) -> dict:
    return RunDir.open(run).manifest()["correlate_ray"]["passes"]


@pytest.mark.slow
def test_ray_equals_local_over_several_passes_and_retries(cluster, seeds, tiny_store, tmp_path):
    faults = cluster["faults"]
    (faults / "pass0.shard8.raise").touch()  # that worker raises once
    (faults / "pass1.shard20.exit").touch()  # that worker's process dies once; Ray restarts it
    # 200 KB for co-moments (a pair is 128 KB): the plan takes several passes, and only the
    # first one accumulates the layer covariances
    n_params = sum(p.numel() for p in load_model(seeds[0]).model.parameters())
    free = plan_for(_cfg(seeds, tiny_store, pairs="all", memory_budget="1TB"),
                    [ModelShape(2, 64, n_params)] * 3, 64)
    budget = str(200_000 + free.persistent_bytes + free.stream_bytes + max(free.work_bytes))
    run_correlate(_cfg(seeds, tiny_store, pairs="all"), tmp_path / "local")
    res = run_correlate(_cfg(seeds, tiny_store, pairs="all", backend="ray", workers=2,
                             memory_budget=budget), tmp_path / "ray")
    assert len(res.plan.passes) > 1
    assert not list(faults.iterdir())
    # float32 products: other shard and fold boundaries change the rounding, not the result
    _assert_same_tables(tmp_path / "local", tmp_path / "ray", atol=1e-6)
    stats = _ray_stats(tmp_path / "ray")
    assert len(stats) == len(res.plan.passes)
    assert all(s["shards"] == 8 and s["computed_shards"] == 8 for s in stats.values())
    assert [s["retries"] for s in stats.values()][:2] == [1, 1]
    assert not list((tmp_path / "ray" / "state").glob("*.safetensors"))


@pytest.mark.slow
def test_resume_after_killed_ray_run_loads_finished_shards(cluster, seeds, tiny_store, tmp_path):
    run = tmp_path / "killed"
    hang = cluster["faults"] / "pass0.shard4.hang"  # the second shard never finishes
    hang.touch()
    args = [sys.executable, "-c", "from unineurons.cli import main; main()", "correlate",
            *[x for s in seeds for x in ("--model", s)], "--tokens", str(tiny_store),
            "--out", str(run), "--n-tokens", str(N_TOK), "--pairs", "all", "--dtype", "float64",
            "--batch-size", "2", "--accumulate-tokens", "128",
            "--checkpoint-tokens", "256",  # the merged prefix (shard 0) becomes a checkpoint
            "--backend", "ray", "--ray-address", cluster["address"], "--workers", "2"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list((run / "state").glob("pass0.shard*.safetensors"))) >= 6:  # shards 2..7
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline, "the killed run never got to its shards"
    finally:
        proc.kill()
        proc.wait()
        hang.unlink()
    assert not (run / "neurons.parquet").exists()
    cfg = _cfg(seeds, tiny_store, pairs="all", dtype="float64", checkpoint_tokens=256,
               backend="ray", workers=2)
    with pytest.raises(UnineuronsError, match="--resume"):
        run_correlate(cfg, run)
    with safe_open(str(run / "state" / "checkpoint.safetensors"), "pt") as f:
        assert '"cursor": 4' in f.metadata()["progress"]  # shard 0 merged and checkpointed
    run_correlate(cfg, run, resume=True)
    s = _ray_stats(run)["0"]
    # 24 of the 28 contexts past the checkpoint come from files; the 4-context gap is split
    # again, into 4 shards for 2 workers
    assert s["start_context"] == 4 and s["loaded_shards"] == 6 and s["computed_shards"] == 4
    local = tmp_path / "local"
    run_correlate(_cfg(seeds, tiny_store, pairs="all", dtype="float64"), local)
    # float64 products; tables store float32, so agreement is to one float32 ulp
    _assert_same_tables(local, run, atol=1e-7)


# ---- analyze and dynamics on the same machinery --------------------------------------------------

def _analyze_cfg(**kw):
    from unineurons.analyses.analyze import AnalyzeConfig

    base = dict(tokens=None, n_tokens=N_TOK, batch_size=3, top_k=4, unigram_top_n=16,
                roles={"entropy_max_candidates": 0, "entropy_n_random": 0})
    base.update(kw)
    return AnalyzeConfig(**base)


def _analyze_tables(run: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run / f"{name}.parquet")
            for name in ("neurons", "families", "top_contexts")}


def _assert_same_analysis(a: Path, b: Path, atol: float) -> None:
    ta, tb = _analyze_tables(a), _analyze_tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=atol == 0, atol=atol, rtol=0,
                                      obj=name)


def test_analyze_shards_merge_to_one_pass(seeds, tiny_store):
    """Analyze shards run by the worker code and merged in order equal one local pass: moments
    to rounding, top contexts and position counts exactly."""
    from safetensors.torch import load

    from unineurons.analyses.analyze import _vocabulary
    from unineurons.analyses.analyze_pass import TASK as ANALYZE_TASK
    from unineurons.analyses.analyze_pass import AnalyzeState, shard_job
    from unineurons.analyses.families import build_family_features
    from unineurons.features import get_features
    from unineurons.sharding import model_job
    from unineurons.stream import MaskConfig

    cfg = _analyze_cfg()
    models = [load_model(s) for s in seeds[:2]]
    store = TokenStore.open(tiny_store)
    contexts, special = store.contexts(N_TOK), store.manifest["tokenizer"]
    vocab, _ = _vocabulary(special, models)
    feats = build_family_features(contexts, special, vocab, 16, get_features(None, []))
    subsets = [np.arange(0, 128, 3), np.arange(128)]
    mask = MaskConfig()
    one = AnalyzeState(models, feats, subsets, store.ctx, 4, "cpu")
    for batch in activation_stream(models, contexts, special, batch_size=3, pre_activation=True):
        one.update(batch)
    job = {**model_job(models, tiny_store, "cpu"), "config_hash": "h",
           **shard_job(cfg, feats, subsets, mask, contexts.shape[0])}
    merged = AnalyzeState(models, feats, subsets, store.ctx, 4, "cpu")
    w = ShardWorker()
    for c0, c1 in ((0, 7), (7, 8), (8, 32)):
        state = load(w.run(ANALYZE_TASK, job, "analyze", c0, c1, {}))
        merged.merge_from(state.__getitem__, list(state))
    for a, b in zip(one.accs, merged.accs, strict=True):
        for part in ("act", "pre"):
            ra, rb = a.parts()[part].result(), b.parts()[part].result()
            for k in ra:
                torch.testing.assert_close(ra[k], rb[k], rtol=1e-10, atol=1e-12, msg=f"{part}.{k}")
        for k, v in a.top.result().items():
            assert torch.equal(v, b.top.result()[k]), k  # global rows: ties break the same way
        assert torch.equal(a.fam.position.fires, b.fam.position.fires)
        for fam in a.fam.cond:
            torch.testing.assert_close(a.fam.cond[fam].result()["vr"], b.fam.cond[fam].result()["vr"],
                                       rtol=1e-9, atol=1e-10, equal_nan=True)


def test_analyze_resume_after_kill_equals_uninterrupted(monkeypatch, seeds, tiny_store, tmp_path):
    """A token pass killed after checkpoints resumes to the same tables, bit for bit."""
    from unineurons.analyses.analyze import analyze_models
    from unineurons.analyses.analyze_pass import AnalyzeState

    specs = seeds[:2]
    analyze_models(specs, tmp_path / "whole", _analyze_cfg(tokens=str(tiny_store)))
    cfg = _analyze_cfg(tokens=str(tiny_store), checkpoint_tokens=256)  # every 4 contexts
    real, calls = AnalyzeState.update, {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        # batches of 3 contexts (192 tokens): checkpoints after contexts 6 and 12; the 6th
        # batch (contexts 15..17) dies
        if calls["n"] == 6:
            raise KeyboardInterrupt
        real(self, batch)

    monkeypatch.setattr(AnalyzeState, "update", dying)
    with pytest.raises(KeyboardInterrupt):
        analyze_models(specs, tmp_path / "killed", cfg)
    monkeypatch.setattr(AnalyzeState, "update", real)
    ckpt = tmp_path / "killed" / "state" / "analyze" / "checkpoint.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert '"cursor": 12' in f.metadata()["progress"]
    with pytest.raises(UnineuronsError, match="unfinished analyze pass; add --resume"):
        analyze_models(specs, tmp_path / "killed", cfg)  # never thrown away silently
    with pytest.raises(UnineuronsError, match="different configuration"):
        analyze_models(specs, tmp_path / "killed", _analyze_cfg(tokens=str(tiny_store), top_k=3),
                       resume=True)
    analyze_models(specs, tmp_path / "killed", cfg, resume=True)
    _assert_same_analysis(tmp_path / "whole", tmp_path / "killed", atol=0)
    assert not list((tmp_path / "killed" / "state" / "analyze").iterdir())


@pytest.mark.slow
def test_analyze_ray_equals_local_with_a_retry(cluster, seeds, tiny_store, tmp_path):
    from unineurons.analyses.analyze import analyze_models

    (cluster["faults"] / "analyze.shard12.raise").touch()
    analyze_models(seeds, tmp_path / "local", _analyze_cfg(tokens=str(tiny_store)))
    from unineurons.cli import main

    args = ["analyze", *[x for s in seeds for x in ("--model", s)], "--tokens", str(tiny_store),
            "--out", str(tmp_path / "ray"), "--n-tokens", str(N_TOK), "--batch-size", "3",
            "--top-k", "4", "--unigram-top-n", "16", "--role", "entropy_max_candidates=0",
            "--role", "entropy_n_random=0", "--checkpoint-tokens", "512",
            "--backend", "ray", "--ray-address", cluster["address"], "--workers", "2"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    assert not list(cluster["faults"].iterdir())
    _assert_same_analysis(tmp_path / "local", tmp_path / "ray", atol=1e-9)
    stats = RunDir.open(tmp_path / "ray").manifest()["analyze_ray"]
    assert stats["shards"] == 8 and stats["computed_shards"] == 8 and stats["retries"] == 1
    assert not list((tmp_path / "ray" / "state" / "analyze").iterdir())


@pytest.mark.slow
def test_dynamics_ray_equals_local(cluster, make_gpt2, tiny_store, tmp_path):
    """Every step's correlate stage and ablations on Ray workers give the local tables."""
    from unineurons.analyses.dynamics import DynamicsConfig, run_dynamics

    for i, name in enumerate(("a", "b")):
        for step in (1, 2):
            make_gpt2(tmp_path / f"{name}-{step}", 10 * i + step)
    base = dict(model_template=str(tmp_path / "{name}-{step}"), names=["a", "b"], steps=[1, 2],
                tokens=str(tiny_store), n_tokens=N_TOK, universal="top:0.1", batch_size=2,
                accumulate_tokens=128)
    from unineurons.analyses.ablate import AblateConfig

    base["ablate"] = AblateConfig(sizes=[2, "all"], random_draws=1, batch_size=4)
    local = run_dynamics(DynamicsConfig(**base), tmp_path / "dyn_local")
    ray = run_dynamics(DynamicsConfig(**base, backend="ray", workers=2), tmp_path / "dyn_ray")
    for name in ("emergence", "trajectories", "persistence", "ablations"):
        pd.testing.assert_frame_equal(getattr(local, name), getattr(ray, name), check_exact=False,
                                      atol=1e-6, rtol=0, obj=name)
    for t in (1, 2):
        step = RunDir.open(tmp_path / "dyn_ray" / "steps" / f"step{t}").manifest()
        assert step["correlate_ray"]["passes"]["0"]["computed_shards"] == 8
        assert step["ablate_ray"][str(tmp_path / f"a-{t}")]["computed_shards"] == 8


@pytest.mark.slow
def test_ablate_ray_equals_local_with_a_retry(cluster, seeds, tiny_store, tmp_path):
    """Every patched forward pass on token shards gives the local ablations table."""
    import shutil

    from unineurons.analyses.ablate import AblateConfig, run_ablations
    from unineurons.cli import main

    run_correlate(_cfg(seeds[:2], tiny_store), tmp_path / "local")
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    local = run_ablations(RunDir.open(tmp_path / "local"), AblateConfig(
        sizes=[1, 4, "all"], random_draws=2, rank_all=True, method="mean", batch_size=4))
    (cluster["faults"] / "ablate.shard12.raise").touch()
    with pytest.raises(SystemExit) as exit_:
        main(["ablate", str(tmp_path / "ray"), "--sizes", "1,4,all", "--random-draws", "2",
              "--rank-all", "--method", "mean", "--batch-size", "4", "--backend", "ray",
              "--ray-address", cluster["address"], "--workers", "2"])
    assert exit_.value.code == 0
    assert not list(cluster["faults"].iterdir())
    ray = pd.read_parquet(tmp_path / "ray" / "ablations.parquet")
    # float64 sums in another order; the rank statistics are integer counts
    pd.testing.assert_frame_equal(local, ray, check_exact=False, atol=1e-9, rtol=0)
    assert local["n_ablated"].sum() > 0 and (local["delta_loss"].abs() > 0).any()
    stats = RunDir.open(tmp_path / "ray").manifest()["ablate_ray"][seeds[0]]
    assert stats["computed_shards"] == 8 and stats["retries"] == 1
    assert not list((tmp_path / "ray" / "state" / "ablate").iterdir())


def test_backend_options_are_shared_and_never_change_the_numbers():
    from unineurons.analyses.ablate import AblateConfig
    from unineurons.analyses.analyze import AnalyzeConfig
    from unineurons.analyses.dynamics import DynamicsConfig, _step_ablate, correlate_config
    from unineurons.config import without_backend

    for cls in (AnalyzeConfig, AblateConfig):
        with pytest.raises(ValueError, match="workers only apply with --backend ray"):
            cls(workers=2)
    dyn = DynamicsConfig(model_template="m/{name}@{step}", names=["a", "b"], steps=[1],
                         tokens="t", backend="ray", workers=3, ablate=AblateConfig())
    cc = correlate_config(dyn, ["x", "y"])
    assert (cc.backend, cc.workers) == ("ray", 3)
    step_ablate = _step_ablate(dyn, 64)
    assert (step_ablate.backend, step_ablate.workers) == ("ray", 3)
    local = DynamicsConfig(**{**dyn.model_dump(), "backend": "local", "workers": 1,
                              "ablate": AblateConfig()})
    assert without_backend(local.model_dump()) == without_backend(dyn.model_dump())
    assert without_backend(local.model_dump()) != without_backend(
        DynamicsConfig(**{**local.model_dump(), "seed": 1}).model_dump())
