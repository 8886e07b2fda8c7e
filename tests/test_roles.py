"""Functional roles on micro models whose weights are set by hand: prediction, suppression,
entropy and attention-deactivation neurons must be found, and only they; scores against direct
recomputations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from unineurons.analyses.attention import attention_scores, bos_keys, query_directions
from unineurons.analyses.entropy import find_entropy_neurons
from unineurons.analyses.roles import ROLES, RoleConfig, assign_roles, entropy_and_attention
from unineurons.analyses.vocab import vocab_table
from unineurons.analyses.weights import weight_columns
from unineurons.errors import UnineuronsError
from unineurons.models.load import load_model
from unineurons.rundir import RunDir
from unineurons.tokens import TokenStore

SPECIAL = {"bos_id": 0, "eos_id": 1, "pad_id": 2, "newline_ids": []}


def gpt2(path, edit, d: int = 32, vocab: int = 128, seed: int = 0):
    """A 2-layer GPT-2 (d_mlp 64, untied unembedding) edited by ``edit(model)``, saved, loaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=d, n_head=2, n_inner=64, vocab_size=vocab,
                     n_positions=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        edit(model)
    model.save_pretrained(path, safe_serialization=True)
    return load_model(str(path), with_tokenizer=False)


def unit_perp_ones(d: int, g: torch.Generator) -> torch.Tensor:
    """A random unit vector with zero mean (LayerNorm keeps such directions)."""
    u = torch.randn(d, generator=g)
    u -= u.mean()
    return u / u.norm()


def folded_column(model, token: int) -> torch.Tensor:
    """Token's unembedding column as the logits see it, recomputed directly: final-LN scale
    folded in, centred over the vocabulary and over d_model."""
    w_u = model.transformer.ln_f.weight[:, None] * model.lm_head.weight.T  # [d, V]
    w_u = w_u - w_u.mean(1, keepdim=True)
    w_u = w_u - w_u.mean(0, keepdim=True)
    return w_u[:, token]


def sample_contexts(m, n: int, length: int, seed: int) -> np.ndarray:
    """Contexts drawn from the model itself (BOS first): its predictions are calibrated on
    them, as a trained model's are on its data."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.zeros(n, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            p = torch.softmax(m.model(input_ids=toks).logits[:, -1], -1)  # [n, V]
            toks = torch.cat([toks, torch.multinomial(p, 1, generator=g)], 1)
    return toks.numpy()


# ---- prediction and suppression ------------------------------------------------------------
def test_prediction_and_suppression_neurons(tmp_path):
    tok = 17

    def edit(model):
        g = torch.Generator().manual_seed(1)
        gamma = 0.5 + torch.rand(32, generator=g)
        model.transformer.ln_f.weight.copy_(gamma)
        e = unit_perp_ones(32, g)
        v = gamma * e / (gamma * e).norm()  # the residual direction e is read through gamma
        w = model.lm_head.weight  # [V, d]
        w -= (w @ v)[:, None] * v[None, :]  # no token but `tok` reads e ...
        w[tok] += 3.0 * v  # ... and `tok` reads it strongly
        col = folded_column(model, tok)
        model.transformer.h[1].mlp.c_proj.weight[3] = 0.5 * col / col.norm()  # prediction
        model.transformer.h[1].mlp.c_proj.weight[4] = -0.5 * col / col.norm()  # suppression

    m = gpt2(tmp_path / "pred", edit)
    df = weight_columns(m)
    pred = df[(df.layer == 1) & (df.neuron == 3)].iloc[0]
    supp = df[(df.layer == 1) & (df.neuron == 4)].iloc[0]
    assert pred.vocab_kurt > 10 and pred.vocab_skew > 0
    assert supp.vocab_kurt > 10 and supp.vocab_skew < 0
    others = df.drop(index=[pred.name, supp.name])
    assert others.vocab_kurt.max() < 10  # random neurons: near-Gaussian cosines

    table = vocab_table(m, None, [(1, 3), (1, 4)], k=3)
    first = table[(table["rank"] == 1) & (table.side == "out")].set_index(["neuron", "direction"])
    assert first.loc[(3, "top"), "token_id"] == tok
    assert first.loc[(3, "top"), "cosine"] == pytest.approx(1.0, abs=1e-5)
    assert first.loc[(4, "bottom"), "token_id"] == tok
    assert first.loc[(4, "bottom"), "cosine"] == pytest.approx(-1.0, abs=1e-5)

    roles = assign_roles(df, RoleConfig(partition_var=1.0))
    assert roles[pred.name] == "prediction" and roles[supp.name] == "suppression"
    assert (roles.drop(index=[pred.name, supp.name]) == "none").all()


# ---- entropy neurons ----------------------------------------------------------------------
ENT, LOUD, TOK2 = 7, 9, 40  # the entropy neuron, a loud prediction neuron, its token


def _entropy_edit(model):
    g = torch.Generator().manual_seed(1)
    model.transformer.wte.weight.normal_(0.0, 1.0, generator=g)  # a residual of norm ~ sqrt(d)
    gamma = 0.5 + torch.rand(32, generator=g)
    model.transformer.ln_f.weight.copy_(gamma)
    u = unit_perp_ones(32, g)
    v = gamma * u / (gamma * u).norm()
    w = torch.randn(128, 32, generator=g) * 0.3  # confident predictions
    w -= (w @ v)[:, None] * v[None, :]  # no token reads u: u is in W_U's null space
    model.lm_head.weight.copy_(w)
    mlp = model.transformer.h[1].mlp
    for n in (ENT, LOUD):  # always on at GELU(2), whatever the input
        mlp.c_fc.weight[:, n] = 0.0
        mlp.c_fc.bias[n] = 2.0
    mlp.c_proj.weight[ENT] = 2.0 * u
    col = folded_column(model, TOK2)
    mlp.c_proj.weight[LOUD] = 2.0 * col / col.norm()


@pytest.fixture(scope="module")
def entropy_model(tmp_path_factory):
    m = gpt2(tmp_path_factory.mktemp("ent") / "m", _entropy_edit)
    return m, sample_contexts(m, 16, 32, seed=2)


def _reference_loss_entropy(m, contexts, w_out_row: torch.Tensor) -> tuple[float, float]:
    """Mean loss and entropy with neuron ENT's output weight replaced, by direct forward."""
    c_proj = m.model.transformer.h[1].mlp.c_proj
    old = c_proj.weight[ENT].clone()
    tokens = torch.from_numpy(contexts.astype(np.int64))
    try:
        with torch.no_grad():
            c_proj.weight[ENT] = w_out_row
            logits = m.model(input_ids=tokens).logits[:, :-1].double()  # [B, T-1, V]
    finally:
        with torch.no_grad():
            c_proj.weight[ENT] = old
    tgt = tokens[:, 1:]
    keep = ~torch.isin(tgt, torch.tensor([0, 1, 2]))  # BOS, EOS, pad targets are not scored
    logp = torch.log_softmax(logits, -1)
    loss = -logp.gather(-1, tgt[..., None])[..., 0][keep].mean()
    ent = -(logp.exp() * logp).sum(-1)[keep].mean()
    return float(loss), float(ent)


def test_entropy_neuron_found_and_confirmed(entropy_model):
    m, ctx = entropy_model
    per, rows = find_entropy_neurons(m, ctx, SPECIAL, null_dims=1, n_random=6, n_contexts=16,
                                     min_null_frac=0.5, norm_quantile=0.9)
    ent = per.set_index(["layer", "neuron"])
    assert ent.loc[(1, ENT), "null_frac"] > 0.999
    assert ent.loc[(1, LOUD), "null_frac"] < 0.05
    assert per.loc[per.entropy_candidate, "neuron"].tolist() == [ENT]  # loud one: not null
    assert per.loc[per.is_entropy, "neuron"].tolist() == [ENT]
    assert list(rows.columns) == ["model", "layer", "neuron", "kind", "scale", "value", "loss",
                                  "entropy", "delta_loss", "delta_entropy",
                                  "delta_final_norm_scale"]
    assert sorted(rows.kind.unique()) == ["candidate", "random"]
    assert rows[rows.kind == "random"][["layer", "neuron"]].drop_duplicates().shape[0] == 6
    mine = rows[rows.neuron == ENT].sort_values("value")
    gelu2 = float(m.model.transformer.h[1].mlp.act(torch.tensor(2.0)))  # GPT-2: tanh GELU
    np.testing.assert_allclose(mine.scale, gelu2, rtol=1e-6)  # always on: scale = GELU(2)
    np.testing.assert_allclose(mine.value, np.array([0.0, 1.0, 2.0, 4.0]) * gelu2, rtol=1e-6)
    assert abs(mine.delta_entropy.iloc[1]) < 1e-5  # fixing it at its own value changes nothing
    # the intervention at value 4 * GELU(2) == scaling its w_out by 4, recomputed directly
    u_row = m.model.transformer.h[1].mlp.c_proj.weight[ENT].clone()
    loss, entropy = _reference_loss_entropy(m, ctx, 4.0 * u_row)
    assert mine.loss.iloc[3] == pytest.approx(loss, abs=1e-5)
    assert mine.entropy.iloc[3] == pytest.approx(entropy, abs=1e-5)
    # growing the residual along the null space flattens the distribution
    assert mine.delta_entropy.iloc[3] > 0.3 and mine.delta_final_norm_scale.iloc[3] < 0
    assert ent.loc[(1, ENT), "entropy_effect"] >= 2 * ent.loc[(1, ENT), "loss_effect"]


def test_loud_neuron_is_not_an_entropy_neuron(entropy_model):
    """Forced through the intervention (any null fraction accepted), a neuron that raises one
    token's logit moves the loss as much as the entropy: it is not confirmed."""
    m, ctx = entropy_model
    per, rows = find_entropy_neurons(m, ctx, SPECIAL, null_dims=1, n_random=2, n_contexts=16,
                                     min_null_frac=0.0, norm_quantile=0.97)
    ent = per.set_index(["layer", "neuron"])
    assert ent.loc[(1, LOUD), "entropy_candidate"] and ent.loc[(1, ENT), "entropy_candidate"]
    assert ent.loc[(1, LOUD), "entropy_effect"] > 0.1  # it does move the entropy ...
    assert not ent.loc[(1, LOUD), "is_entropy"]  # ... but the loss about as much
    assert per.loc[per.is_entropy, "neuron"].tolist() == [ENT]


def test_no_candidate_gives_empty_rows(entropy_model):
    m, ctx = entropy_model
    per, rows = find_entropy_neurons(m, ctx, SPECIAL, null_dims=1, min_null_frac=1.5)
    assert rows.empty and not per.is_entropy.any() and per.entropy_effect.isna().all()
    with pytest.raises(UnineuronsError, match="null-space dimensions"):
        find_entropy_neurons(m, ctx, SPECIAL, null_dims=32)  # LayerNorm leaves 31


# ---- attention (de)activation --------------------------------------------------------------
HEAD = 1


@pytest.fixture(scope="module")
def attention_model(tmp_path_factory):
    """GPT-2 (d_model 64) where layer-0 neuron 5 writes along head 1.1's BOS query direction
    and neuron 6 against it; both are silent (bias -30), so they never change the BOS key."""

    def edit(model):
        g = torch.Generator().manual_seed(3)
        model.transformer.wte.weight.normal_(0.0, 1.0, generator=g)
        mlp = model.transformer.h[0].mlp
        for n in (5, 6):
            mlp.c_fc.weight[:, n] = 0.0
            mlp.c_fc.bias[n] = -30.0

    m = gpt2(tmp_path_factory.mktemp("attn") / "m", edit, d=64)
    ctx = np.random.default_rng(0).integers(3, 128, size=(4, 16))
    ctx[:, 0] = 0
    q = query_directions(m, bos_keys(m, ctx))[1, HEAD]  # checked against HF in test_weights_vocab
    with torch.no_grad():
        m.model.transformer.h[0].mlp.c_proj.weight[5] = 3.0 * q / q.norm()
        m.model.transformer.h[0].mlp.c_proj.weight[6] = -3.0 * q / q.norm()
    return m, ctx, q


def _bos_logits(m, ctx, fix: dict[int, float] | None = None) -> torch.Tensor:
    """Head 1.1's attention logits on BOS from every later position, read from c_attn."""
    attn = m.model.transformer.h[1].attn
    seen = {}
    handle = attn.c_attn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("qkv", out))
    tokens = torch.from_numpy(ctx.astype(np.int64))

    def fn(layer, act):
        act = act.clone()
        for n, v in (fix or {}).items():
            act[..., n] = v
        return act
    try:
        with torch.no_grad(), m.adapter.intervene(fn, layers=[0]):
            m.model(input_ids=tokens)
    finally:
        handle.remove()
    q, k, _ = seen["qkv"].split(64, dim=-1)  # [B, T, d] each
    q, k = q.view(*q.shape[:2], 2, 32)[..., HEAD, :], k.view(*k.shape[:2], 2, 32)[..., HEAD, :]
    return (q[:, 1:] * k[:, :1]).sum(-1) * attn.scaling  # [B, T-1]


def test_attention_deactivation_pair_found(attention_model):
    m, ctx, q = attention_model
    per, rows = attention_scores(m, ctx, n_random=1000, z_threshold=3.0, seed=0)
    p = per.set_index(["layer", "neuron"])
    for n, sign in ((5, 1), (6, -1)):
        assert (p.loc[(0, n), "attn_max_head_layer"], p.loc[(0, n), "attn_max_head"]) == (1, HEAD)
        assert sign * p.loc[(0, n), "attn_max_z"] > 6  # ~ sqrt(64) for a perfect alignment
    pair = rows[(rows.neuron == 5) & (rows.head_layer == 1) & (rows["head"] == HEAD)].iloc[0]
    assert pair.score == pytest.approx(float(q.norm()), rel=1e-4)
    # random unit directions in d dims: score std = |q_dir| / sqrt(d)
    assert pair.baseline_std == pytest.approx(float(q.norm()) / 8, rel=0.1)
    head_rows = rows[(rows.layer == 0) & (rows.head_layer == 1) & (rows["head"] == HEAD)]
    assert head_rows.sort_values("z").neuron.tolist()[-1] == 5
    assert head_rows.sort_values("z").neuron.tolist()[0] == 6
    # the sign means what it says: switching neuron 5 on raises the logit on BOS, 6 lowers it
    clean = _bos_logits(m, ctx)  # [B, T-1], all within a few 1e-3 of 0 in this model
    up, down = _bos_logits(m, ctx, {5: 2.0}) - clean, _bos_logits(m, ctx, {6: 2.0}) - clean
    assert (up > 0.02).all() and (down < -0.02).all()
    roles = assign_roles(weight_columns(m).merge(per), RoleConfig(partition_var=1.0,
                                                                   prediction_kurt=1e9))
    keyed = pd.Series(roles.to_numpy(), index=pd.MultiIndex.from_frame(per[["layer", "neuron"]]))
    assert keyed[(0, 5)] == "attention" and keyed[(0, 6)] == "attention"


# ---- role assignment -----------------------------------------------------------------------
def test_assign_roles_precedence_and_thresholds():
    nan = np.nan
    df = pd.DataFrame({
        "vocab_kurt": [20, 20, 20, 20, 10, 3, 3, 20, 3, nan, 20],
        "vocab_skew": [1, -1, 1, 1, 1, 0, 0, 0, 0, nan, 1],
        "vocab_var": [0.001, 0.001, 0.01, 0.001, 0.001, 0.006, 0.005, 0.001, 0.01, nan, 0.01],
        "is_entropy": [False, False, False, True, False, False, False, False, None, False, False],
        "attn_max_z": [nan, nan, nan, 9.0, nan, nan, nan, nan, -5.0, nan, 4.9],
    }, index=[10 + i for i in range(11)])
    roles = assign_roles(df, RoleConfig())
    assert roles.index.tolist() == df.index.tolist() and roles.name == "role"
    assert roles.tolist() == [
        "prediction", "suppression",
        "prediction",  # heavy tail beats high variance
        "entropy",  # entropy beats attention and prediction
        "none",  # kurtosis must exceed 10, not equal it
        "partition", "none",  # variance must exceed 0.005
        "none",  # zero skew: neither prediction nor suppression
        "attention",  # |z| >= 5 either sign; a missing is_entropy is False
        "none",  # missing statistics give no role
        "prediction",  # |z| 4.9 < 5
    ]
    assert set(roles) <= set(ROLES)
    strict = assign_roles(df, RoleConfig(prediction_kurt=25, partition_var=0.1, attn_role_z=10))
    assert strict.tolist() == ["none"] * 3 + ["entropy"] + ["none"] * 7
    with pytest.raises(UnineuronsError, match="vocab_kurt"):
        assign_roles(df.drop(columns=["vocab_kurt"]), RoleConfig())
    only_weights = assign_roles(df[["vocab_kurt", "vocab_skew", "vocab_var"]], RoleConfig())
    assert only_weights.iloc[3] == "prediction" and only_weights.iloc[8] == "partition"


def test_role_config_is_frozen_and_validated():
    cfg = RoleConfig()
    with pytest.raises(ValidationError):
        cfg.prediction_kurt = 3.0
    with pytest.raises(ValidationError):
        RoleConfig(no_such_option=1)
    with pytest.raises(ValidationError):
        RoleConfig(entropy_value_mode="relative")
    with pytest.raises(ValidationError):
        RoleConfig(entropy_values=())
    assert RoleConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # manifest round trip
    for name, field in RoleConfig.model_fields.items():
        assert field.description, name


def test_entropy_and_attention_into_a_run(tmp_path, tiny_store):
    """The orchestrator's path: token store in, columns merged into neurons.parquet next to
    the correlate stage's columns, entropy/attention tables written, roles assigned."""
    store = TokenStore.open(tiny_store)
    ctx, special = np.asarray(store.contexts(8 * store.ctx)), store.manifest["tokenizer"]
    m = gpt2(tmp_path / "m", lambda model: None, vocab=store.vocab_size)
    run = RunDir.create(tmp_path / "run")
    keys = [(0, 1), (0, 2), (1, 3)]
    run.update_neurons(pd.DataFrame({  # what the correlate stage leaves behind
        "model": m.name, "layer": [k[0] for k in keys], "neuron": [k[1] for k in keys],
        "max_corr": [0.9, 0.2, 0.8], "baseline_corr": [0.1, 0.1, 0.1],
        "excess_corr": [0.8, 0.1, 0.7], "is_universal": [True, False, True]}))
    neurons = run.update_neurons(weight_columns(m))
    assert len(neurons) == 2 * 64
    cfg = RoleConfig(entropy_null_dims=1, entropy_min_null_frac=0.0, entropy_max_candidates=2,
                     entropy_n_random=2, entropy_n_contexts=4, attn_n_random=100, attn_z=0.5)
    universal = neurons[neurons.is_universal.fillna(False).astype(bool)]
    cols, ent_rows, att_rows = entropy_and_attention(m, ctx, special, universal, cfg)
    assert sorted(zip(cols.layer, cols.neuron, strict=True)) == [(0, 1), (1, 3)]
    assert (cols.model == m.name).all()
    assert set(zip(att_rows.layer, att_rows.neuron, strict=True)) <= {(0, 1)}
    assert len(ent_rows) == (2 + 2) * 4 and set(ent_rows.kind) == {"candidate", "random"}
    neurons = run.update_neurons(cols)
    neurons["role"] = assign_roles(neurons, cfg)
    run.update_neurons(neurons[["model", "layer", "neuron", "role"]])
    run.write_table("entropy", ent_rows)
    run.write_table("attention", att_rows)
    back = run.read_table("neurons")
    assert len(back) == 2 * 64 and {"max_corr", "w_out_norm", "null_frac", "attn_max_z",
                                    "is_entropy", "role"} <= set(back.columns)
    assert back.set_index(["layer", "neuron"]).loc[(0, 1), "max_corr"] == 0.9
    assert back.null_frac.isna().sum() == 2 * 64 - 2  # only the selected neurons got columns
    assert set(back.role) <= set(ROLES)
    assert len(run.read_table("entropy")) == len(ent_rows)
