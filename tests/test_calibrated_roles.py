"""Calibrated functional roles (issue 13 item 2): the random-direction null against a direct
numpy / scipy computation, planted prediction and suppression neurons, and random ``w_out``
neurons that the calibrated rule (unlike the paper's fixed thresholds) leaves without a role."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from scipy import stats

from unineurons.analyses.roles import (
    RoleConfig,
    RoleThresholds,
    assign_roles,
    null_directions,
    null_thresholds,
    role_columns,
    vocab_null,
)
from unineurons.analyses.weights import weight_columns
from unineurons.errors import UnineuronsError
from unineurons.models.load import load_model

TOK = 17


def gpt2(path, edit=None, d: int = 32, vocab: int = 128, d_mlp: int = 64, seed: int = 0):
    """A 2-layer GPT-2 (untied unembedding) edited by ``edit(model)``, saved and loaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=d, n_head=2, n_inner=d_mlp, vocab_size=vocab,
                     n_positions=16, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(0.5 + torch.rand(d))  # a scale worth folding
        if edit is not None:
            edit(model)
    model.save_pretrained(path, safe_serialization=True)
    return load_model(str(path), with_tokenizer=False)


def direct_unit_unembed(model) -> np.ndarray:
    """``[d, V]`` unit columns of diag(gamma) W_U centred over the vocabulary then d_model."""
    w = (model.transformer.ln_f.weight[:, None] * model.lm_head.weight.T).detach().double().numpy()
    w = w - w.mean(1, keepdims=True)
    w = w - w.mean(0, keepdims=True)
    return w / np.linalg.norm(w, axis=0, keepdims=True)


def test_null_directions_are_seeded_centred_units():
    a = null_directions(16, 50, seed=3, centre=True)
    assert a.shape == (50, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.ones(50))
    assert a.mean(1).abs().max() < 1e-6  # LayerNorm: only centred directions reach the logits
    assert torch.equal(a, null_directions(16, 50, seed=3, centre=True))
    assert not torch.equal(a, null_directions(16, 50, seed=4, centre=True))
    b = null_directions(16, 50, seed=3, centre=False)
    assert b.mean(1).abs().max() > 1e-3  # RMSNorm: nothing centred


def test_null_statistics_and_quantiles_match_numpy(tmp_path):
    m = gpt2(tmp_path / "m")
    k, q = 2000, 0.99
    null = vocab_null(m, k, seed=5, max_bytes=128 * 48 * 300)  # several blocks
    dirs = null_directions(32, k, seed=5, centre=True).double().numpy()  # [k, d]
    cos = dirs @ direct_unit_unembed(m.model)  # [k, V]
    np.testing.assert_allclose(null["var"], cos.var(1), rtol=1e-4)
    np.testing.assert_allclose(null["skew"], stats.skew(cos, axis=1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(null["kurt"], stats.kurtosis(cos, axis=1, fisher=False),
                               rtol=1e-4)
    th = null_thresholds(null, q)
    assert th.rule == "calibrated" and th.quantile == q and th.n_null == k
    assert th.kurt == pytest.approx(np.quantile(null["kurt"], q), rel=1e-12)
    assert th.var == pytest.approx(np.quantile(null["var"], q), rel=1e-12)
    assert th.skew_hi == pytest.approx(np.quantile(null["skew"], q), rel=1e-12)
    assert th.skew_lo == pytest.approx(np.quantile(null["skew"], 1 - q), rel=1e-12)
    role = ((null["kurt"] > th.kurt) & ((null["skew"] > th.skew_hi) | (null["skew"] < th.skew_lo))
            | (null["var"] > th.var))
    assert th.null_role_share == pytest.approx(role.mean())
    assert 0.5 * (1 - q) <= th.null_role_share <= 3 * (1 - q)  # union of three 1% tails


def test_planted_prediction_and_suppression_neurons_under_both_rules(tmp_path):
    def edit(model):
        g = torch.Generator().manual_seed(1)
        gamma = model.transformer.ln_f.weight
        e = torch.randn(32, generator=g)
        e = (e - e.mean()) / (e - e.mean()).norm()
        v = gamma * e / (gamma * e).norm()  # the residual direction e, read through gamma
        w = model.lm_head.weight  # [V, d]
        w -= (w @ v)[:, None] * v[None, :]  # no token but TOK reads e ...
        w[TOK] += 3.0 * v  # ... and TOK reads it strongly
        col = torch.from_numpy(direct_unit_unembed(model)[:, TOK]).float()
        model.transformer.h[1].mlp.c_proj.weight[3] = 0.5 * col  # points at TOK's unembedding
        model.transformer.h[1].mlp.c_proj.weight[4] = -0.5 * col

    m = gpt2(tmp_path / "pred", edit)
    df = weight_columns(m)
    cols, th = role_columns(df, [m], RoleConfig(null_directions=2000, null_quantile=0.995))
    assert set(th[m.name]) == {"paper", "calibrated"}
    keyed = cols.set_index(["layer", "neuron"])
    for rule in ("role_paper", "role_calibrated"):
        assert keyed.loc[(1, 3), rule] == "prediction"
        assert keyed.loc[(1, 4), rule] == "suppression"
    assert (keyed["role"] == keyed["role_paper"]).all()  # the default rule fills `role`


def test_random_w_out_neurons_rarely_get_a_calibrated_role(tmp_path):
    """GPT-2's initial w_out rows are isotropic Gaussian, exactly the null's distribution, so
    the calibrated rule gives them a role at the null's own rate; the paper's partition
    threshold (var > 0.005 with var ~ 1/d_model = 0.03 here) labels nearly all of them."""
    m = gpt2(tmp_path / "rand", d_mlp=2048, seed=2)  # 4096 random neurons
    df = weight_columns(m)
    q = 0.99
    cfg = RoleConfig(null_directions=4000, null_quantile=q, thresholds="calibrated", seed=11)
    cols, th = role_columns(df, [m], cfg)
    share = float((cols["role_calibrated"] != "none").mean())
    expected = th[m.name]["calibrated"]["null_role_share"]
    n = len(cols)
    assert share <= expected + 4 * np.sqrt(expected * (1 - expected) / n) + 4 * (1 - q) / 10
    assert share <= 3 * (1 - q)
    assert (cols["role"] == cols["role_calibrated"]).all()
    assert (cols["role_paper"] == "partition").mean() > 0.9


def test_assign_roles_with_explicit_thresholds():
    df = pd.DataFrame({"vocab_kurt": [6.0, 6.0, 6.0, 4.0, 3.0], "vocab_skew": [0.5, -0.5, 0.1, 1.0, 0.0],
                       "vocab_var": [0.0, 0.0, 0.0, 0.0, 0.02]})
    th = RoleThresholds("calibrated", kurt=5.0, skew_hi=0.3, skew_lo=-0.3, var=0.01)
    assert assign_roles(df, RoleConfig(), th).tolist() == [
        "prediction", "suppression", "none",  # skew 0.1 is inside the null's band
        "none",  # kurtosis 4 is not beyond the null
        "partition"]
    assert assign_roles(df, RoleConfig()).tolist() == ["none"] * 4 + ["partition"]  # paper


def test_role_config_null_options_are_validated(tmp_path):
    with pytest.raises(ValidationError, match="100000 directions"):
        RoleConfig(null_quantile=0.9999)
    with pytest.raises(ValidationError):
        RoleConfig(thresholds="loose")
    with pytest.raises(ValidationError):
        RoleConfig(null_quantile=1.0)
    assert RoleConfig(null_quantile=0.9999, null_directions=100_000).null_directions == 100_000
    m = gpt2(tmp_path / "m")
    df = weight_columns(m).assign(model="other")
    with pytest.raises(UnineuronsError, match="model other"):
        role_columns(df, [m], RoleConfig(null_directions=1000, null_quantile=0.99))


def test_rules_sentence_counts_both_rules():
    from unineurons.analyses.roles import rules_sentence

    df = pd.DataFrame({"role_paper": ["partition"] * 3 + ["prediction"],
                       "role_calibrated": ["none"] * 3 + ["prediction"]})
    text = rules_sentence(df)
    assert "give prediction 1, suppression 0, partition 3;" in text
    assert "gives prediction 1, suppression 0, partition 0." in text
    assert rules_sentence(df[["role_paper"]]) == ""


@pytest.mark.parametrize("args, message", [
    (["--role-null-quantile", "0.9999"], "use at least 100000 directions"),
    (["--role-thresholds", "loose"], "thresholds"),
])
def test_cli_role_options_fail_in_one_line(tmp_path, capsys, args, message):
    from unineurons.cli import main

    argv = ["analyze", "--model", str(tmp_path / "m"), "--tokens", str(tmp_path), "--out",
            str(tmp_path / "run"), *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and err.count("error:") == 1
    assert not (tmp_path / "run").exists()  # nothing partial left behind


def test_analyze_writes_both_rules(tmp_path, make_gpt2, tiny_store, capsys):
    """The analyze stage: role_paper, role_calibrated and role (as picked) in neurons.parquet,
    both rules' bounds in the manifest, both counts in the printed summary."""
    from unineurons.analyses.analyze import AnalyzeConfig, analyze_models
    from unineurons.cli.analyze import show_analysis
    from unineurons.rundir import RunDir

    path = make_gpt2(tmp_path / "m", seed=1)
    roles = {"thresholds": "calibrated", "null_directions": 1000, "null_quantile": 0.99,
             "entropy_max_candidates": 0, "entropy_n_random": 0}
    res = analyze_models([str(path)], tmp_path / "run", AnalyzeConfig(
        tokens=str(tiny_store), n_tokens=1024, neurons="all", roles=roles))
    n = RunDir.open(tmp_path / "run").read_table("neurons")
    assert (n["role"] == n["role_calibrated"]).all() and n["role_paper"].notna().all()
    th = RunDir.open(tmp_path / "run").manifest()["roles"][str(path)]
    assert th["paper"]["var"] == 0.005 and th["calibrated"]["n_null"] == 1000
    assert int(res.roles_calibrated["total"].sum()) == len(n) == int(res.roles["total"].sum())
    show_analysis(res)
    out = " ".join(capsys.readouterr().out.split())
    assert "neurons per role_paper" in out and "neurons per role_calibrated" in out
    assert "calibrated rule (beyond the 0.99 quantile of 1000 random directions)" in out
