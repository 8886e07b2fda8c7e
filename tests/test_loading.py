"""Weight loading (issue 12, items 1-2): ``.bin`` through ``torch.load(weights_only=True)`` only,
crafted pickles refused with nothing executed, strict keys (missing / unexpected named), tied
weights and legacy constants admitted, the manifest's weight format and file hashes."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CTX, TINY_VOCAB
from transformers import AutoTokenizer, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from unineurons.errors import UnineuronsError
from unineurons.models.checkpoint import SAFETENSORS_ONLY_ENV, read_state_dict, strict_weights
from unineurons.models.load import load_model


def _as_bin(src: Path, dst: Path, edit=None) -> Path:
    """A copy of model folder ``src`` whose weights are only ``pytorch_model.bin`` (torch.save of
    the state dict, as transformers 4 wrote it; ``edit`` may change the dict first)."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    sd = GPT2LMHeadModel.from_pretrained(src).state_dict() if edit is None else edit(src)
    torch.save(sd, dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="module")
def gpt2_folder(make_gpt2, tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("load") / "gpt2", seed=3)


def _neox(path: Path, tiny_tokenizer: Path, rename: dict[str, str] | None = None,
          extra: dict | None = None, half: bool = False) -> Path:
    """A tiny untied NeoX saved as pytorch_model.bin with keys renamed / added."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                        intermediate_size=64, vocab_size=TINY_VOCAB,
                        max_position_embeddings=TINY_CTX, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(path)
    sd = {k: v.half() if half else v for k, v in model.state_dict().items()}
    for old, new in (rename or {}).items():
        sd[new] = sd.pop(old)
    sd.update(extra or {})
    torch.save(sd, path / "pytorch_model.bin")
    return path


def test_bin_loads_same_weights_as_safetensors(gpt2_folder, tmp_path):
    st = load_model(str(gpt2_folder), with_tokenizer=False)
    binf = _as_bin(gpt2_folder, tmp_path / "bin")
    b = load_model(str(binf), with_tokenizer=False)
    assert b.weights_sha256 == st.weights_sha256
    assert st.info["weights_format"] == "safetensors"
    assert b.info["weights_format"] == "pytorch_bin"
    raw = (binf / "pytorch_model.bin").read_bytes()
    assert b.info["weight_files"] == {"pytorch_model.bin": hashlib.sha256(raw).hexdigest()}
    assert st.info["weight_files"]["model.safetensors"] == hashlib.sha256(
        (gpt2_folder / "model.safetensors").read_bytes()).hexdigest()
    both = tmp_path / "both"  # safetensors wins when a folder has both
    shutil.copytree(gpt2_folder, both)
    shutil.copy(binf / "pytorch_model.bin", both)
    assert load_model(str(both), with_tokenizer=False).info["weights_format"] == "safetensors"


def test_safetensors_only_refuses_bin(gpt2_folder, tmp_path, monkeypatch):
    binf = _as_bin(gpt2_folder, tmp_path / "bin")
    with pytest.raises(UnineuronsError, match="no model.safetensors.*--safetensors-only"):
        load_model(str(binf), with_tokenizer=False, safetensors_only=True)
    monkeypatch.delenv(SAFETENSORS_ONLY_ENV, raising=False)
    with strict_weights(True), pytest.raises(UnineuronsError, match="safetensors-only"):
        load_model(str(binf), with_tokenizer=False)
    assert SAFETENSORS_ONLY_ENV not in __import__("os").environ  # restored after the block
    # a safetensors folder still loads in strict mode
    assert load_model(str(gpt2_folder), with_tokenizer=False, safetensors_only=True)


class _Payload:
    """Unpickling this calls open(path, 'w'): it creates a file (stands in for any code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused_and_nothing_runs(gpt2_folder, tmp_path):
    marker = tmp_path / "pwned.txt"
    sd = dict(GPT2LMHeadModel.from_pretrained(gpt2_folder).state_dict())
    evil = _as_bin(gpt2_folder, tmp_path / "evil", edit=lambda _src: {**sd, "x": _Payload(str(marker))})
    # the payload is live: a full unpickle of the same kind of bytes does create the file
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(_Payload(str(probe)))).close()
    assert probe.exists()
    with pytest.raises(UnineuronsError, match="refused; unpickling it would build objects"):
        read_state_dict(evil / "pytorch_model.bin", "pytorch_bin")
    with pytest.raises(UnineuronsError, match="pytorch_model.bin: refused"):
        load_model(str(evil), with_tokenizer=False)
    assert not marker.exists()


def test_cli_refuses_crafted_pickle(gpt2_folder, tiny_store, tmp_path, capsys):
    from unineurons.cli import main

    marker = tmp_path / "pwned.txt"
    sd = dict(GPT2LMHeadModel.from_pretrained(gpt2_folder).state_dict())
    evil = _as_bin(gpt2_folder, tmp_path / "evil", edit=lambda _src: {**sd, "x": _Payload(str(marker))})
    with pytest.raises(SystemExit) as e:
        main(["correlate", "-m", str(gpt2_folder), "-m", str(evil), "--tokens", str(tiny_store),
              "--out", str(tmp_path / "run"), "--n-tokens", "256"])
    assert e.value.code == 1
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(SystemExit) as e:  # strict mode from the CLI
        main(["correlate", "-m", str(gpt2_folder), "-m", str(evil), "--tokens", str(tiny_store),
              "--out", str(tmp_path / "run"), "--safetensors-only"])
    assert e.value.code == 1
    assert "--safetensors-only refuses pytorch_model.bin" in capsys.readouterr().err


def test_not_a_state_dict_is_refused(gpt2_folder, tmp_path):
    f = _as_bin(gpt2_folder, tmp_path / "nested",
                edit=lambda src: {"model": GPT2LMHeadModel.from_pretrained(src).state_dict(), "step": 5})
    with pytest.raises(UnineuronsError, match="not a flat map of tensor names"):
        load_model(str(f), with_tokenizer=False)


def test_neox_head_under_unexpected_name_is_an_error(tiny_tokenizer, tmp_path):
    f = _neox(tmp_path / "neox", tiny_tokenizer, rename={"lm_head.weight": "gpt_neox.embed_out.weight"})
    with pytest.raises(UnineuronsError) as e:
        load_model(str(f), with_tokenizer=False)
    msg = str(e.value)
    assert "missing lm_head.weight" in msg and "unexpected gpt_neox.embed_out.weight" in msg


def test_missing_tensor_is_an_error(gpt2_folder, tmp_path):
    def drop(src):
        sd = dict(GPT2LMHeadModel.from_pretrained(src).state_dict())
        del sd["transformer.h.1.mlp.c_proj.bias"]
        return sd

    f = _as_bin(gpt2_folder, tmp_path / "missing", edit=drop)
    with pytest.raises(UnineuronsError, match=r"missing transformer\.h\.1\.mlp\.c_proj\.bias"):
        load_model(str(f), with_tokenizer=False)


def test_misshaped_tensor_is_an_error(gpt2_folder, tmp_path):
    def cut(src):
        sd = dict(GPT2LMHeadModel.from_pretrained(src).state_dict())
        sd["transformer.h.0.mlp.c_fc.bias"] = sd["transformer.h.0.mlp.c_fc.bias"][:10]
        return sd

    f = _as_bin(gpt2_folder, tmp_path / "cut", edit=cut)
    with pytest.raises(UnineuronsError, match=r"another shape.*transformer\.h\.0\.mlp\.c_fc\.bias"):
        load_model(str(f), with_tokenizer=False)


def test_real_pythia_layout_loads(tiny_tokenizer, tmp_path):
    """Pythia's files: head as ``embed_out``, per-layer rotary ``inv_freq``, attention masks."""
    extra = {"gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(8),
             "gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
             "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9)}
    f = _neox(tmp_path / "pythia", tiny_tokenizer, rename={"lm_head.weight": "embed_out.weight"},
              extra=extra, half=True)  # Pythia ships float16
    m = load_model(str(f), with_tokenizer=False)
    saved = torch.load(f / "pytorch_model.bin", weights_only=True)
    assert m.model.lm_head.weight.dtype == torch.float32
    assert torch.equal(m.model.lm_head.weight, saved["embed_out.weight"].float())
    w = m.model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight
    assert torch.equal(w, saved["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"].float())


def test_tied_head_and_legacy_gpt2_constants_load(gpt2_folder, tmp_path):
    """A 2021 GPT-2 file: no lm_head (tied to wte), attn.bias and attn.masked_bias buffers."""
    def legacy(src):
        sd = dict(GPT2LMHeadModel.from_pretrained(src).state_dict())
        del sd["lm_head.weight"]
        for i in range(2):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, TINY_CTX, TINY_CTX))
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return sd

    f = _as_bin(gpt2_folder, tmp_path / "legacy", edit=legacy)
    m = load_model(str(f), with_tokenizer=False)
    ref = load_model(str(gpt2_folder), with_tokenizer=False)
    assert m.weights_sha256 == ref.weights_sha256
    assert torch.equal(m.model.lm_head.weight, m.model.transformer.wte.weight)


def test_sharded_bin_with_index_loads(gpt2_folder, tmp_path):
    import json

    ref = load_model(str(gpt2_folder), with_tokenizer=False)
    sd = dict(GPT2LMHeadModel.from_pretrained(gpt2_folder).state_dict())
    f = _as_bin(gpt2_folder, tmp_path / "sharded")
    (f / "pytorch_model.bin").unlink()
    names = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[::2],
             "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, f / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, ks in parts.items() for k in ks}}
    (f / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    m = load_model(str(f), with_tokenizer=False)
    assert m.weights_sha256 == ref.weights_sha256
    assert sorted(m.info["weight_files"]) == sorted(parts)
    # an index pointing outside the folder is refused; a listed shard that is gone is an error
    index["weight_map"][names[0]] = "../elsewhere.bin"
    (f / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnineuronsError, match="outside the model folder"):
        load_model(str(f), with_tokenizer=False)
    index["weight_map"][names[0]] = "pytorch_model-00003-of-00002.bin"
    (f / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnineuronsError, match="shard pytorch_model-00003-of-00002.bin .* is missing"):
        load_model(str(f), with_tokenizer=False)
