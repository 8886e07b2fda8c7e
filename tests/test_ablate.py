"""Group ablations: set construction, mean ablation, rows, headline and the CLI end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from unineurons.analyses.ablate import (
    AblateConfig,
    _split,
    ablate_model,
    build_sets,
    headline,
    neuron_means,
    parse_method,
    summarize,
)
from unineurons.cli import main
from unineurons.errors import UnineuronsError
from unineurons.models.load import load_model
from unineurons.rundir import RunDir
from unineurons.stream import MaskConfig, token_mask
from unineurons.tokens import TokenStore

N_TOK = 256  # 4 contexts of 64
ABLATION_COLUMNS = ["model", "set", "method", "layer", "size", "draw", "n_requested", "n_ablated",
                    "capped", "n_above_threshold", "loss", "delta_loss", "kl", "entropy",
                    "delta_entropy", "top1_acc", "efficiency", "delta_loss_lo", "delta_loss_hi",
                    "delta_entropy_lo", "delta_entropy_hi", "n_targets", "delta_loss_boot"]


def make_gpt2(path: Path, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 (d_model 32, d_mlp 64, vocab 512) saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=512, n_positions=64,
                     bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


def fake_neurons(model: str, n_layers: int, d_mlp: int, universal: dict, seed: int = 0
                 ) -> pd.DataFrame:
    """neurons.parquet rows: excess in [-0.2, 0.4) except the ``universal`` {(l, i): excess}."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for i in range(d_mlp):
            e = universal.get((layer, i), float(rng.uniform(-0.2, 0.4)))
            rows.append({"model": model, "layer": layer, "neuron": i, "excess_corr": e,
                         "is_universal": e > 0.5})
    return pd.DataFrame(rows)


UNI = {(0, 1): 0.9, (2, 3): 0.8, (2, 5): 0.7, (1, 0): 0.6}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_model(str(make_gpt2(tmp_path_factory.mktemp("m") / "gpt2")), with_tokenizer=False)


@pytest.fixture(scope="module")
def data(tiny_store):
    store = TokenStore.open(tiny_store)
    return np.asarray(store.contexts(N_TOK)), store.manifest["tokenizer"]


def cli(args: list[str]) -> int:
    """Run the CLI in-process; its exit code (0 when ``main`` returns without exiting)."""
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def manual_loss(m, contexts: np.ndarray, special: dict, fix: dict) -> float:
    """Next-token CE with {(layer, index): value} fixed by a hand-written hook (float64)."""
    handles = []
    for layer in {lay for lay, _ in fix}:
        def hook(_mod, args, layer=layer):
            x = args[0].clone()
            for (lay, i), v in fix.items():
                if lay == layer:
                    x[:, :, i] = v
            return (x,)
        handles.append(m.adapter.out_proj(layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = m.model(input_ids=torch.from_numpy(contexts.astype(np.int64))).logits
    finally:
        for h in handles:
            h.remove()
    valid = torch.from_numpy(~np.isin(contexts[:, 1:], [special["bos_id"], special["eos_id"],
                                                         special["pad_id"]]))
    tgt = torch.from_numpy(contexts[:, 1:].astype(np.int64))[valid]
    return float(F.cross_entropy(logits[:, :-1][valid].double(), tgt))


# ---- config ---------------------------------------------------------------------------------
def test_method_and_config_validation():
    assert parse_method("zero") == ("zero", None)
    assert parse_method("value:-1.5") == ("value", -1.5)
    for bad in ("value:", "value:nan", "ones", "value:x"):
        with pytest.raises(UnineuronsError, match="zero, mean or value:X"):
            parse_method(bad)
    with pytest.raises(ValidationError):
        AblateConfig(method="ones")
    with pytest.raises(ValidationError):
        AblateConfig(sizes=[0, 2])
    with pytest.raises(ValidationError, match="cpu or cuda"):
        AblateConfig(device="gpu0")
    assert AblateConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError):
        AblateConfig(sets=["universal", "bogus"])
    cfg = AblateConfig(sizes=[2, 2, "all"], sets=["random", "random"])
    assert cfg.sizes == [2, "all"] and cfg.sets == ["random"]
    with pytest.raises(ValidationError):
        cfg.seed = 3  # frozen
    assert AblateConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_split_is_largest_remainder_with_cap():
    assert _split(10, np.array([3.0, 1, 0, 2]), 99).tolist() == [5, 2, 0, 3]
    assert _split(10, np.array([3.0, 1, 0, 2]), 4).tolist() == [4, 2, 0, 3]
    assert _split(6, np.array([1.0, 1, 2]), 99).tolist() == [2, 1, 3]  # tie -> lower layer
    assert _split(7, np.ones(3), 99).sum() == 7


# ---- set construction -----------------------------------------------------------------------
def _by(sets, name, size, layer=-1):
    return [s for s in sets if s.set == name and s.size == str(size) and s.layer == layer]


def _layer_counts(neurons, n_layers=3):
    return np.bincount([lay for lay, _ in neurons], minlength=n_layers).tolist()


def test_build_sets_universal_nonuniversal_random():
    t = fake_neurons("m", 3, 8, UNI)
    sizes = [1, 2, 3, "all", 6, 100]
    sets = build_sets(t, 3, 8, ["universal", "non-universal", "random"], sizes, draws=3, seed=0)
    assert len(sets) == len(sizes) * (1 + 1 + 3)
    uni = {size: _by(sets, "universal", size)[0] for size in sizes}
    assert uni[2].neurons == ((0, 1), (2, 3))
    assert uni["all"].neurons == tuple(sorted(UNI)) and uni["all"].n_requested == 4
    assert uni[6].neurons == uni["all"].neurons and uni[6].n_requested == 6  # capped
    low = t[~t["is_universal"]].sort_values("excess_corr")
    for size in (1, 2, 3, "all"):
        counts = _layer_counts(uni[size].neurons)
        for r in _by(sets, "random", size):  # layer-matched to the universal set
            assert _layer_counts(r.neurons) == counts and len(set(r.neurons)) == sum(counts)
        (nu,) = _by(sets, "non-universal", size)
        assert _layer_counts(nu.neurons) == counts
        expect = sorted((lay, int(i)) for lay in range(3)
                        for i in low[low["layer"] == lay]["neuron"][: counts[lay]])
        assert list(nu.neurons) == expect
    # beyond the universal set: its layer proportions [1, 1, 2], largest remainder, capped at 8
    assert all(_layer_counts(r.neurons) == [2, 1, 3] for r in _by(sets, "random", 6))
    big = _by(sets, "random", 100)
    assert all(_layer_counts(r.neurons) == [8, 8, 8] and r.n_requested == 100 for r in big)
    # draws are nested across sizes, differ from each other and repeat with the seed
    for d in range(3):
        chain = [set(_by(sets, "random", s)[d].neurons) for s in (1, 2, 3, "all")]
        assert all(a <= b for a, b in zip(chain, chain[1:], strict=False))
    assert len({r.neurons for r in _by(sets, "random", 6)}) > 1
    again = build_sets(t, 3, 8, ["random"], sizes, draws=3, seed=0)
    assert [s.neurons for s in again] == [s.neurons for s in sets if s.set == "random"]
    other = build_sets(t, 3, 8, ["random"], sizes, draws=3, seed=1)
    assert [s.neurons for s in other] != [s.neurons for s in again]


def test_build_sets_without_universal_neurons_and_rank_all():
    t = fake_neurons("m", 3, 8, {})
    assert not t["is_universal"].any()
    sets = build_sets(t, 3, 8, ["universal", "non-universal", "random"], [4, "all"], draws=2)
    assert all(s.neurons == () for s in _by(sets, "universal", 4))
    assert all(s.neurons == () and s.n_requested == 0 for s in sets if s.size == "all")
    assert all(_layer_counts(s.neurons) == [2, 1, 1] for s in _by(sets, "random", 4))
    assert _layer_counts(_by(sets, "non-universal", 4)[0].neurons) == [2, 1, 1]
    ranked = build_sets(t, 3, 8, ["universal"], [3, "all"], rank_all=True)
    top = t.sort_values("excess_corr", ascending=False).head(3)
    assert set(ranked[0].neurons) == set(zip(top["layer"], top["neuron"], strict=True))
    assert len(ranked[1].neurons) == 24


def test_build_sets_per_layer():
    t = fake_neurons("m", 3, 8, UNI)
    sets = build_sets(t, 3, 8, ["universal", "non-universal", "random"], [1, "all", 20],
                      per_layer=True, draws=2)
    assert _by(sets, "universal", 1, layer=2)[0].neurons == ((2, 3),)
    assert _by(sets, "universal", "all", layer=2)[0].neurons == ((2, 3), (2, 5))
    assert _by(sets, "universal", "all", layer=0)[0].n_requested == 1
    lowest = t[(t["layer"] == 1) & ~t["is_universal"]].sort_values("excess_corr")["neuron"]
    assert _by(sets, "non-universal", 1, layer=1)[0].neurons == ((1, int(lowest.iloc[0])),)
    for r in _by(sets, "random", 20, layer=1):  # capped at the layer's 8 neurons
        assert r.neurons == tuple((1, i) for i in range(8)) and r.n_requested == 20
    for r in _by(sets, "random", "all", layer=2):
        assert len(r.neurons) == 2 and all(lay == 2 for lay, _ in r.neurons)


# ---- rows on a real (tiny) model ------------------------------------------------------------
def test_ablate_model_rows_capping_and_empty_sets(gpt2, data):
    contexts, special = data
    t = fake_neurons(gpt2.name, 2, 64, {(0, 5): 0.9, (1, 7): 0.8, (1, 2): 0.6})
    cfg = AblateConfig(sizes=[1, 3, 10], random_draws=2, method="zero")
    df = ablate_model(gpt2, t.drop(columns="model"), contexts, special, cfg)
    assert list(df.columns) == ABLATION_COLUMNS and len(df) == 3 * (1 + 1 + 2)
    uni = df[df["set"] == "universal"].set_index("size")
    assert uni.loc["3", "n_ablated"] == 3 and not uni.loc["3", "capped"]
    assert uni.loc["10", "capped"] and uni.loc["10", "n_ablated"] == 3
    assert uni.loc["10", "loss"] == uni.loc["3", "loss"]  # the same set, evaluated once
    assert uni.loc["3", "n_above_threshold"] == 3
    clean = manual_loss(gpt2, contexts, special, {})
    zeroed = manual_loss(gpt2, contexts, special, {(0, 5): 0.0, (1, 7): 0.0, (1, 2): 0.0})
    np.testing.assert_allclose(uni.loc["3", "delta_loss"], zeroed - clean, atol=5e-6)
    assert abs(zeroed - clean) > 1e-4
    np.testing.assert_allclose(df["loss"] - df["delta_loss"], clean, rtol=2e-6)
    np.testing.assert_allclose(df["efficiency"], df["delta_loss"] / df["n_ablated"])
    rnd = df[(df["set"] == "random") & (df["size"] == "10")]
    assert (rnd["n_ablated"] == 10).all() and not rnd["capped"].any()
    assert (df[df["set"] == "non-universal"]["n_above_threshold"] == 0).all()
    assert (df["kl"] >= -1e-7).all() and (df["kl"] > 0).any()

    none = fake_neurons(gpt2.name, 2, 64, {}).drop(columns="model")
    df = ablate_model(gpt2, none, contexts, special,
                      AblateConfig(sizes=[2, "all"], random_draws=1, sets=["universal", "random"]))
    empty = df[df["n_ablated"] == 0]
    assert len(empty) == 3  # universal at both sizes, random at "all" (= 0 universal neurons)
    assert (empty["capped"] == (empty["n_requested"] > 0)).all()  # size 2 capped, "all" empty
    assert empty[["loss", "delta_loss", "kl", "efficiency"]].isna().all().all()
    assert df[(df["set"] == "random") & (df["size"] == "2")]["loss"].notna().all()


def test_mean_and_value_ablation_equal_manual_computation(gpt2, data):
    contexts, special = data
    ad = gpt2.adapter
    with torch.no_grad(), ad.capture() as store:
        gpt2.model(input_ids=torch.from_numpy(contexts.astype(np.int64)))
    keep = token_mask(torch.from_numpy(contexts.astype(np.int64)), special, MaskConfig()).numpy()
    acts = np.stack([store[lay].numpy() for lay in range(ad.n_layers)], 2)  # [B, T, L, d_mlp]
    means = acts[keep].astype(np.float64).mean(0)  # [L, d_mlp] over kept positions
    streamed = neuron_means(gpt2, contexts, special, batch_size=3).numpy()
    np.testing.assert_allclose(streamed, means, rtol=1e-5, atol=1e-6)
    # the mask matters: means over every position differ by far more than the tolerance
    assert np.abs(acts.reshape(-1, *means.shape).mean(0) - means).max() > 1e-3
    t = fake_neurons(gpt2.name, 2, 64, {(0, 5): 0.9, (1, 7): 0.8, (1, 2): 0.6})
    cfg = AblateConfig(sizes=["all"], sets=["universal"], method="mean")
    row = ablate_model(gpt2, t.drop(columns="model"), contexts, special, cfg).iloc[0]
    fix = {(lay, i): float(means[lay, i]) for lay, i in [(0, 5), (1, 7), (1, 2)]}
    loss = manual_loss(gpt2, contexts, special, fix)
    np.testing.assert_allclose(row["loss"], loss, rtol=2e-5)
    # the change is small in a random model: compare it directly, to about 1% of itself
    delta = loss - manual_loss(gpt2, contexts, special, {})
    assert abs(delta) > 1e-4
    np.testing.assert_allclose(row["delta_loss"], delta, atol=5e-6)
    cfg = AblateConfig(sizes=[2], sets=["universal"], method="value:2.5")
    row = ablate_model(gpt2, t.drop(columns="model"), contexts, special, cfg).iloc[0]
    expect = manual_loss(gpt2, contexts, special, {(0, 5): 2.5, (1, 7): 2.5})
    np.testing.assert_allclose(row["loss"], expect, rtol=2e-5)


# ---- headline and summary -------------------------------------------------------------------
def _row(set_, n, dl, draw=0, layer=-1, model="m"):
    return {"model": model, "method": "zero", "set": set_, "layer": layer, "size": str(n),
            "draw": draw, "n_requested": n, "n_ablated": n, "delta_loss": dl, "kl": 0.1,
            "efficiency": dl / n}


def test_headline_interpolates_the_random_curve():
    rows = [_row("universal", 5, 0.5), _row("universal", 10, 1.0)]
    for n, dl in [(10, 0.2), (20, 0.4), (40, 0.8), (80, 1.6)]:  # mean of two draws = dl
        rows += [_row("random", n, dl - 0.05, 0), _row("random", n, dl + 0.05, 1)]
    rows += [_row("random", 3, 9.0, layer=1)]  # per-layer rows do not enter the curve
    rows += [{**_row("random", 80, 1.6 + s, d), "size": "all"} for d, s in ((0, -.05), (1, .05))]
    df = pd.DataFrame(rows)
    text = headline(df)
    assert "top 10 universal neurons" in text and "+1.0000 nats" in text
    assert "about 50 (5x)" in text and "mean of 2 draw(s)" in text  # 40 + 0.2/0.8 * 40
    short = df[~((df["set"] == "random") & (df["n_requested"] == 80))]  # "all" rows too
    assert "more than 40 (> 4x)" in headline(short)
    first = pd.DataFrame([_row("universal", 4, 0.3), _row("random", 8, 0.6)])
    assert "about 4 (1x)" in headline(first)  # interpolated from (0, 0)
    first = pd.DataFrame([_row("universal", 4, 0.3), _row("random", 8, 0.9)])
    assert "about 2.67 (0.667x)" in headline(first)
    assert "no universal neurons" in headline(pd.DataFrame([_row("random", 8, 0.6)]))
    summary = summarize(df)
    r80 = summary[(summary["set"] == "random") & (summary["size"] == "80")].iloc[0]
    assert r80["draws"] == 2 and r80["delta_loss"] == pytest.approx(1.6)
    assert r80["delta_loss_std"] == pytest.approx(np.std([1.55, 1.65]))


# ---- the CLI on a fake run directory --------------------------------------------------------
@pytest.fixture
def fake_run(tmp_path, tiny_store):
    specs = [str(make_gpt2(tmp_path / f"s{i}", seed=i)) for i in range(2)]
    run = RunDir.create(tmp_path / "run")
    entries = []
    for spec in specs:
        m = load_model(spec, with_tokenizer=False)
        entries.append({"spec": spec, "weights_sha256": m.weights_sha256, **m.info})
    store = TokenStore.open(tiny_store)
    run.update_manifest(models=entries, tokens={
        "path": str(tiny_store), "sha256": store.sha256, "n_tokens": N_TOK,
        "n_contexts": N_TOK // 64, "ctx": 64})
    run.update_neurons(pd.concat([fake_neurons(specs[0], 2, 64, {(0, 3): 0.9, (1, 4): 0.7}),
                                  fake_neurons(specs[1], 2, 64, {(1, 1): 0.8}, seed=1)]))
    return run, specs


def test_cli_ablate_and_intervene_end_to_end(fake_run, capsys):
    run, specs = fake_run
    args = ["--sizes", "1,all", "--random-draws", "2", "--per-layer", "--n-tokens", "128"]
    assert cli(["ablate", str(run.path), *args]) == 0
    out = capsys.readouterr().out
    assert "universal neurons changes loss" in out and "rows written" in out
    df = run.read_table("ablations")
    assert list(df.columns) == ABLATION_COLUMNS
    assert len(df) == 2 * (2 * 4 + 2 * 2 * 4)  # models x (whole + per layer) x sizes x rows
    assert set(df["model"]) == set(specs) and set(df["layer"]) == {-1, 0, 1}
    assert df[(df["model"] == specs[1]) & (df["set"] == "universal") & (df["layer"] == -1)][
        "n_ablated"].max() == 1
    section = run.manifest()["ablate"]
    assert set(section) == set(specs)
    assert section[specs[0]]["config"]["sizes"] == [1, "all"]
    assert section[specs[0]]["tokens"]["n_tokens"] == 128

    # one model again: its rows are replaced, the other model's rows stay
    args = ["--model", specs[0], "--sizes", "1", "--sets", "universal", "--method", "value:1",
            "--n-tokens", "64"]
    assert cli(["ablate", str(run.path), *args]) == 0
    df = run.read_table("ablations")
    assert (df[df["model"] == specs[0]]["method"] == "value:1").all()
    assert len(df[df["model"] == specs[1]]) == 24

    args = ["--neuron", "L1.N4", "--neuron", "L0.N3", "--values", "-1,0,2", "--random-baseline", "2",
            "--n-tokens", "128"]
    assert cli(["intervene", str(run.path), *args]) == 0
    iv = run.read_table("interventions")
    assert len(iv) == (2 + 2) * 3 and set(iv["model"]) == {specs[0]}
    assert iv.groupby("kind")["address"].nunique().to_dict() == {"random": 2, "target": 2}
    assert (iv[iv["kind"] == "random"]["layer"] == 1).all()
    assert run.manifest()["intervene"][specs[0]]["config"]["values"] == [-1.0, 0.0, 2.0]
    assert "single-neuron interventions" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["ablate", "{run}", "--model", "nowhere"], "is not part of run"),
    (["ablate", "{run}", "--method", "ones"], "zero, mean or value:X"),
    (["ablate", "{run}", "--sizes", "1,x"], "not a positive integer"),
    (["intervene", "{run}", "--neuron", "L9.N0", "--n-tokens", "64"], "L9.N0 does not exist"),
    (["intervene", "{run}", "--neuron", "3"], "not of the form"),
])
def test_cli_user_errors(fake_run, capsys, args, message):
    run, _ = fake_run
    assert cli([a.replace("{run}", str(run.path)) for a in args]) == 1
    assert message in capsys.readouterr().err.replace("\n", "")


def test_changed_weights_and_missing_columns_are_refused(fake_run, capsys):
    run, specs = fake_run
    from safetensors.torch import load_file, save_file

    f = Path(specs[1]) / "model.safetensors"
    w = load_file(f)
    w["transformer.h.0.mlp.c_fc.bias"] = w["transformer.h.0.mlp.c_fc.bias"] + 1
    save_file(w, f, metadata={"format": "pt"})
    assert cli(["ablate", str(run.path), "--model", specs[1], "--n-tokens", "64"]) == 1
    assert "weights changed since the run" in capsys.readouterr().err.replace("\n", "")
    run.write_table("neurons", run.read_table("neurons").drop(columns="excess_corr"))
    assert cli(["ablate", str(run.path), "--n-tokens", "64"]) == 1
    assert "has no excess_corr" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(gpt2, data):
    contexts, special = data
    t = fake_neurons(gpt2.name, 2, 64, {(0, 5): 0.9, (1, 7): 0.8}).drop(columns="model")
    cfg = AblateConfig(sizes=[1, "all", 8], random_draws=2, method="mean")
    cpu = ablate_model(gpt2, t, contexts, special, cfg)
    on_gpu = load_model(gpt2.spec.location, device="cuda", with_tokenizer=False)
    gpu = ablate_model(on_gpu, t, contexts, special, cfg)
    cols = ["loss", "delta_loss", "kl", "entropy"]  # top1 may flip on a near-tie
    np.testing.assert_allclose(gpu[cols].to_numpy(), cpu[cols].to_numpy(), rtol=1e-4, atol=2e-5)
