"""Hub revisions offline (issue 12, item 7): a Hugging Face cache laid out the way
huggingface_hub writes it (``models--org--name/{blobs, snapshots/<commit>, refs/<branch>}``),
one revision with safetensors and a ``checkpoint-80000`` branch with only ``pytorch_model.bin``;
the CLI runs in a subprocess with the hub offline and its endpoint pointed at a closed local
port, so no test can reach the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from unineurons.io import read_json

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _add_revision(cache: Path, repo: str, branch: str, files: dict[str, bytes], commit: str) -> None:
    """Write ``files`` as huggingface_hub does: content-addressed blobs (sha256 for LFS weight
    files, git sha1 otherwise), snapshot symlinks into them, and ``refs/<branch>``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        lfs = name.endswith((".bin", ".safetensors"))
        blob = hashlib.sha256(data).hexdigest() if lfs else _git_sha1(data)
        (root / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snap / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / branch).write_text(commit)


def _model_files(seed: int, tokenizer: Path, tmp: Path, fmt: str) -> dict[str, bytes]:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=512, n_positions=64,
                     activation_function="gelu_new")
    folder = tmp / f"m{seed}{fmt}"
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    if fmt == "bin":  # a 2021-style CRFM checkpoint: pickled, head tied (absent), old buffers
        (folder / "model.safetensors").unlink()
        sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        for i in range(cfg.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, folder / "pytorch_model.bin")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub(tiny_tokenizer, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hub")
    home = tmp / "hf_home"
    cache = home / "hub"
    for i, repo in enumerate(("org/name", "org/other")):
        _add_revision(cache, repo, "main", _model_files(10 + i, tiny_tokenizer, tmp, "st"),
                      f"{i:x}" * 40)
        _add_revision(cache, repo, "checkpoint-80000",
                      _model_files(20 + i, tiny_tokenizer, tmp, "bin"), f"{i + 8:x}" * 40)
    fams = tmp / "fams.toml"
    fams.write_text('[families.fake]\ndescription = "two fake seeds"\nrevision = '
                    '"checkpoint-{step}"\nsteps = ["40000-80000:40000"]\nmembers = [\n'
                    '  { seed = 0, id = "org/name" },\n  { seed = 1, id = "org/other" },\n]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=SRC, NO_PROXY="*",
               http_proxy="", https_proxy="", HTTP_PROXY="", HTTPS_PROXY="")
    return {"env": env, "cache": cache, "families": fams}


_DRIVER = """
import contextlib, io, json, sys
from unineurons.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    out.append({"code": code, "stderr": err.getvalue(), "stdout": std.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(hub, tiny_store, tmp_path_factory) -> dict:
    """Every CLI call of this file in one offline interpreter (imports are paid once)."""
    out = tmp_path_factory.mktemp("runs")
    fam = ["--families-file", str(hub["families"])]
    calls = {
        "revision": ["correlate", "-m", "org/name", "-m", "org/name@checkpoint-80000",
                     "--tokens", str(tiny_store), "--out", str(out / "rev"), "--n-tokens", "512"],
        "strict": ["correlate", "-m", "org/name", "-m", "org/name@checkpoint-80000", "--tokens",
                   str(tiny_store), "--out", str(out / "strict"), "--safetensors-only"],
        "uncached": ["correlate", "-m", "org/name", "-m", "org/name@checkpoint-1", "--tokens",
                     str(tiny_store), "--out", str(out / "uncached")],
        "family": ["correlate", "--family", "fake", *fam, "--step", "80000", "--seeds", "1,0",
                   "--tokens", str(tiny_store), "--out", str(out / "fam"), "--n-tokens", "512"],
        "family_main": ["correlate", "--family", "fake", *fam, "--tokens", str(tiny_store),
                        "--out", str(out / "fam_main"), "--n-tokens", "512"],
        "listing": ["families", "fake", *fam],
        "plan": ["plan", "--family", "fake", *fam, "--step", "80000", "--seeds", "1,0",
                 "--n-tokens", "4096", "--ctx", "64", "--flops-per-s", "1e9"],
    }
    r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(list(calls.values()))],
                       env=hub["env"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return {"dir": out, **dict(zip(calls, results, strict=True))}


def _blob_sha(hub: dict, repo: str, branch: str, name: str) -> str:
    root = hub["cache"] / f"models--{repo.replace('/', '--')}"
    commit = (root / "refs" / branch).read_text()
    return hashlib.sha256((root / "snapshots" / commit / name).read_bytes()).hexdigest()


def test_correlate_on_cached_revisions_offline(hub, runs):
    assert runs["revision"]["code"] == 0, runs["revision"]["stderr"][-2000:]
    models = read_json(runs["dir"] / "rev" / "manifest.json", "manifest")["models"]
    assert [(m["location"], m["revision"], m["weights_format"]) for m in models] == [
        ("org/name", None, "safetensors"), ("org/name", "checkpoint-80000", "pytorch_bin")]
    assert models[0]["weight_files"] == {
        "model.safetensors": _blob_sha(hub, "org/name", "main", "model.safetensors")}
    assert models[1]["weight_files"] == {
        "pytorch_model.bin": _blob_sha(hub, "org/name", "checkpoint-80000", "pytorch_model.bin")}
    assert models[0]["weights_sha256"] != models[1]["weights_sha256"]


def test_strict_mode_and_uncached_revision_offline(runs):
    # strict mode refuses the .bin-only branch, naming the cure
    assert runs["strict"]["code"] == 1
    assert "--safetensors-only refuses pytorch_model.bin" in runs["strict"]["stderr"]
    # a revision that is not in the cache: one clear line, offline
    assert runs["uncached"]["code"] == 1
    err = runs["uncached"]["stderr"]
    assert "org/name@checkpoint-1" in err and "Traceback" not in err
    assert not (runs["dir"] / "strict" / "neurons.parquet").exists()


def test_correlate_family_offline(runs):
    assert runs["family"]["code"] == 0, runs["family"]["stderr"][-2000:]
    models = read_json(runs["dir"] / "fam" / "manifest.json", "manifest")["models"]
    assert [m["spec"] for m in models] == ["org/other@checkpoint-80000", "org/name@checkpoint-80000"]
    assert {m["weights_format"] for m in models} == {"pytorch_bin"}
    assert runs["family_main"]["code"] == 0, runs["family_main"]["stderr"][-2000:]
    models = read_json(runs["dir"] / "fam_main" / "manifest.json", "manifest")["models"]
    assert [(m["spec"], m["weights_format"]) for m in models] == [
        ("org/name", "safetensors"), ("org/other", "safetensors")]
    assert runs["listing"]["code"] == 0
    assert "org/other" in runs["listing"]["stdout"] and "checkpoint-{step}" in runs["listing"]["stdout"]


def test_plan_family_reads_cached_configs_offline(runs):
    """``plan --family`` expands to the members' revisions and reads their configs from the
    cache (no weights); with the size of the full matrices --save-full-matrix would write."""
    assert runs["plan"]["code"] == 0, runs["plan"]["stderr"][-2000:]
    out = " ".join(runs["plan"]["stdout"].split())
    assert "model 0: org/other@checkpoint-80000" in out and "model 1: org/name@checkpoint-80000" in out
    assert "2 x 64 = 128 neurons" in out
    assert "disk of --save-full-matrix" in out and "32.8 KB (float16)" in out  # 128² x 2 bytes
