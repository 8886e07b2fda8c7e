"""Bad input, full disks, kills and neighbours (issue 17): each kind driven through the CLI as a
user would, asserting a non-zero exit, one line on stderr, no traceback, nothing left behind
and nothing changed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from unineurons.cli import main

CTX = 64


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def refused(capsys, *args: str, match: str | None = None, code: int = 1) -> str:
    """Run a command that must fail with one clear line; return that line."""
    rc, out, err = cli(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err + out, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: 'nothing changed' is equality."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(make_gpt2, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bad_models")
    return [make_gpt2(root / f"m{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def run_dir(models, tiny_store, tmp_path_factory) -> Path:
    """A finished correlate run of the two tiny models (read-only for the tests)."""
    from unineurons.correlate.config import CorrelateConfig
    from unineurons.correlate.engine import run_correlate

    out = tmp_path_factory.mktemp("bad_run") / "run"
    cfg = CorrelateConfig(models=[str(m) for m in models], tokens=str(tiny_store), n_tokens=1024,
                          batch_size=8)
    run_correlate(cfg, out)
    return out


@pytest.fixture(scope="module")
def other_store(tiny_corpus, tmp_path_factory) -> Path:
    """A store built with another tokenizer (vocab 300) than the models'."""
    from unineurons.tokenizer import train_tokenizer
    from unineurons.tokens import build_token_store

    root = tmp_path_factory.mktemp("other_tok")
    tok = train_tokenizer(tiny_corpus, 300, root / "tok", max_chars=40_000)
    return build_token_store(tiny_corpus, str(tok), CTX, 1024, root / "store").path


@pytest.fixture(scope="module")
def long_store(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    """The models' tokenizer, but contexts of 128 > the models' 64 positions."""
    from unineurons.tokens import build_token_store

    out = tmp_path_factory.mktemp("long") / "store"
    return build_token_store(tiny_corpus, str(tiny_tokenizer), 128, 1024, out).path


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


# ---- 1. one compatibility check for every command that streams tokens through models --------
@pytest.mark.parametrize("command", ["ablate", "intervene", "analyze"])
def test_store_of_another_tokenizer_is_refused_everywhere(command, run_dir, other_store, tmp_path,
                                                          capsys):
    run = copy_run(run_dir, tmp_path)
    before = snapshot(run)
    extra = {"ablate": ["--sizes", "1", "--random-draws", "1"], "intervene": ["--neuron", "L0.N1"],
             "analyze": []}[command]
    refused(capsys, command, run, "--tokens", other_store, *extra, match="another tokenizer")
    assert snapshot(run) == before


def test_correlate_refuses_the_same_store(models, other_store, tmp_path, capsys):
    refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", other_store,
            "--out", tmp_path / "new", match="another tokenizer")
    assert not (tmp_path / "new").exists()


# ---- 3. ordinary mistakes: one line, never a traceback -------------------------------------
@pytest.mark.parametrize("command", ["correlate", "ablate", "intervene", "analyze"])
def test_contexts_longer_than_the_models_positions(command, models, run_dir, long_store, tmp_path,
                                                   capsys):
    if command == "correlate":
        args = ["correlate", "-m", models[0], "-m", models[1], "--out", tmp_path / "new"]
    else:
        args = [command, copy_run(run_dir, tmp_path)] + (["--neuron", "L0.N1"]
                                                          if command == "intervene" else [])
    refused(capsys, *args, "--tokens", long_store, match="positions")
    assert not (tmp_path / "new").exists()


def test_cuda_device_on_a_cpu_only_torch(models, tiny_store, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch has a GPU")
    refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", tiny_store,
            "--out", tmp_path / "new", "--device", "cuda", match="--device")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"out = '{tmp_path / 'out'}'\n[analyze]\ndevice = 'cuda:1'\n")
    refused(capsys, "run", cfg, match="'analyze.device'")
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()
    # a plan is for another machine: a GPU run may be planned on a laptop
    rc, out, err = cli(capsys, "plan", "-m", models[0], "-m", models[1], "--device", "cuda",
                       "--n-tokens", "1000", "--flops-per-s", "1e12")
    assert rc == 0, err


def test_unwritable_out_is_one_line(models, tiny_store, tmp_path, capsys, monkeypatch):
    import unineurons.io as uio

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    # root ignores file modes, so the refusal the kernel would give is made here
    monkeypatch.setattr(uio, "write_json", denied)
    line = refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", tiny_store,
                   "--out", tmp_path / "ro" / "run", "--n-tokens", "128")
    assert "Permission denied" in line and "--out" in line
    assert not (tmp_path / "ro").exists()  # the folder it made is gone again


def test_full_disk_mid_run_removes_what_the_command_made(models, tiny_store, tmp_path, capsys,
                                                         monkeypatch):
    import unineurons.rundir as rundir

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "neurons.parquet")

    monkeypatch.setattr(rundir, "write_parquet", full)
    line = refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", tiny_store,
                   "--out", tmp_path / "run", "--n-tokens", "256")
    assert "No space left" in line and "free some space" in line
    assert not (tmp_path / "run").exists()


def test_corrupt_parquet_in_report(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    p = run / "neurons.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    refused(capsys, "report", run, "--no-models", "--no-figures", match="neurons.parquet")


def test_non_utf8_config_and_token_class(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"out = '\xff\xfe'\n")
    refused(capsys, "run", bad, match="not UTF-8")
    cls = tmp_path / "cls.txt"
    cls.write_bytes(b" the\n\xff\xfe\n")
    run = copy_run(run_dir, tmp_path)
    before = snapshot(run)
    refused(capsys, "analyze", run, "--token-class", cls, match="not UTF-8")
    assert snapshot(run) == before


@pytest.mark.parametrize("when", ["import", "call", "syntax"])
def test_feature_module_errors_are_the_users(when, run_dir, tmp_path, capsys, monkeypatch):
    import unineurons.features as features

    monkeypatch.setattr(features, "FEATURES", dict(features.FEATURES))  # no leak to other tests
    mod = tmp_path / "myfeat.py"
    body = ("from unineurons.features import register_token_class\n"
            "@register_token_class('broken_" + when + "', 'always fails')\n"
            "def broken(token):\n"
            "    return 1 / 0\n")
    mod.write_text({"call": body, "import": "x = 1\nraise ZeroDivisionError('at import')\n",
                    "syntax": "x = (1,\n"}[when])
    run = copy_run(run_dir, tmp_path)
    line = refused(capsys, "analyze", run, "--feature-module", mod)
    assert f"{mod}:" in line
    if when == "syntax":
        assert "your code does not compile" in line
        return
    assert "your code raised ZeroDivisionError" in line
    assert "unineurons/" not in line.split("(at", 1)[1]  # only the user's frames


def test_a_bug_is_one_line_and_debug_shows_the_traceback(tiny_store, capsys, monkeypatch):
    import unineurons.tokens as tokens

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(tokens.TokenStore, "open", boom)
    line = refused(capsys, "tokens", "info", tiny_store, code=70, match="--debug")
    assert "RuntimeError: kaboom" in line and "bug" in line
    rc, _, err = cli(capsys, "tokens", "info", tiny_store, "--debug")
    assert rc == 70 and "Traceback" in err and "kaboom" in err


# ---- 4. size options bounded, disk and memory checked before the work ------------------------
def test_vocab_size_beyond_any_vocabulary(tiny_corpus, tmp_path, capsys):
    refused(capsys, "tokenizer", "train", "--source", tiny_corpus, "--vocab-size",
            "1000000000000", "--out", tmp_path / "tok", match="--vocab-size")
    assert not (tmp_path / "tok").exists()


def test_zoo_batch_beyond_memory(tiny_store, tmp_path, capsys):
    refused(capsys, "zoo", "train", "--tokens", tiny_store, "--out", tmp_path / "zoo", "--preset",
            "micro", "--seeds", "0", "--steps", "2", "--batch-size", "100000", match="memory")
    assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("command", ["ablate", "intervene", "analyze"])
def test_forward_batch_beyond_memory(command, run_dir, tmp_path, capsys, monkeypatch):
    """A --batch-size whose forward pass (logits included) cannot fit is refused before any
    forward pass, naming the option; the run is unchanged."""
    import unineurons.checks as checks

    run = copy_run(run_dir, tmp_path)
    before = snapshot(run)
    # the estimate, not this machine's memory, decides: 1 MB available
    monkeypatch.setattr(checks, "available_memory", lambda: 1 << 20)
    extra = {"ablate": ["--sizes", "1", "--random-draws", "1"], "intervene": ["--neuron", "L0.N1"],
             "analyze": []}[command]
    line = refused(capsys, command, run, "--batch-size", "4096", *extra, match="memory")
    assert "--batch-size" in line
    assert snapshot(run) == before


def test_forward_bytes_counts_the_logits(models):
    from unineurons.checks import LOGIT_COPIES, forward_bytes
    from unineurons.models.load import load_model

    m = load_model(str(models[0]))
    one, two = forward_bytes(m, 1, 32), forward_bytes(m, 2, 32)
    assert two == 2 * one  # every term is per context
    assert one >= LOGIT_COPIES * 4 * 32 * m.adapter.vocab_size


def test_tokens_build_checks_free_disk(tiny_corpus, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    import unineurons.io as uio

    monkeypatch.setattr(uio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    refused(capsys, "tokens", "build", "--source", tiny_corpus, "--tokenizer", tiny_tokenizer,
            "--ctx", "64", "--n-tokens", "4096", "--out", tmp_path / "store", match="GB free")
    assert list(tmp_path.iterdir()) == []


def test_killed_build_leaves_no_hidden_folder_for_ever(tiny_corpus, tiny_tokenizer, tmp_path,
                                                       capsys):
    dead = tmp_path / ".store.abc123.tmp"
    dead.mkdir()
    (dead / "tokens.npy").write_bytes(b"x" * 1000)
    (dead / ".unineurons.lock").write_text(json.dumps(
        {"pid": 2**22 + 7, "host": os.uname().nodename, "started": "then"}))
    rc, _, err = cli(capsys, "tokens", "build", "--source", tiny_corpus, "--tokenizer",
                     tiny_tokenizer, "--ctx", "64", "--n-tokens", "256", "--out", tmp_path / "store")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not (tmp_path / "store" / ".unineurons.lock").exists()  # released with the command


# ---- 5. refused runs leave nothing behind --------------------------------------------------
def test_nan_weights_are_refused_before_the_run_exists(models, tiny_store, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(models[1], broken)
    w = load_file(broken / "model.safetensors")
    key = next(k for k in w if k.endswith("mlp.c_fc.weight"))
    w[key][0, 0] = float("nan")
    save_file(w, broken / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, "correlate", "-m", models[0], "-m", broken, "--tokens", tiny_store,
            "--out", tmp_path / "run", match="NaN")
    assert not (tmp_path / "run").exists()


def test_ray_backend_without_ray(models, tiny_store, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", tiny_store,
            "--out", tmp_path / "run", "--backend", "ray", match="needs Ray")
    assert not (tmp_path / "run").exists()


def test_dynamics_refusal_leaves_no_folder(tiny_store, tmp_path, capsys):
    refused(capsys, "dynamics", "--out", tmp_path / "dyn", "--tokens", tiny_store, "--zoo",
            tmp_path / "nozoo")
    assert not (tmp_path / "dyn").exists()


def test_run_validates_the_whole_config_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"out = '{tmp_path / 'out'}'\n[tokenizer]\nvocab_size = 300\n"
                   "[correlate]\nthreshold = 7.0\n")
    refused(capsys, "run", cfg, match="'correlate.threshold'")
    assert not (tmp_path / "out").exists()


# ---- 7. numbers that mean nothing -----------------------------------------------------------
def test_nan_threshold_and_meaningless_plan(models, tiny_store, tmp_path, capsys):
    refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", tiny_store,
            "--out", tmp_path / "run", "--threshold", "nan", match="--threshold")
    for bad in (["--flops-per-s=-5"], ["--flops-per-s", "nan"], ["--workers", "0"],
                ["--ctx", "0"], ["--n-tokens", "0"]):
        line = refused(capsys, "plan", "-m", models[0], "-m", models[1], *bad, match=bad[0][:9])
        assert "must be" in line or "finite" in line
    assert not (tmp_path / "run").exists()


# ---- 8. messages that name the object, the cause and a fix that works ------------------------
def test_truncated_zst_is_not_empty(tiny_tokenizer, tmp_path, capsys):
    import zstandard

    data = "".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(500))
    blob = zstandard.ZstdCompressor().compress(data.encode())
    (tmp_path / "c.jsonl.zst").write_bytes(blob[: len(blob) // 3])
    refused(capsys, "tokens", "build", "--source", f"jsonl:{tmp_path / 'c.jsonl.zst'}",
            "--tokenizer", tiny_tokenizer, "--ctx", "64", "--n-tokens", "100000",
            "--out", tmp_path / "store", match="truncated")
    assert not (tmp_path / "store").exists()


def test_model_folder_without_tokenizer_falls_back_to_the_store(models, tiny_store, tmp_path,
                                                               capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(models[1] / f, bare / f)
    rc, _, err = cli(capsys, "correlate", "-m", models[0], "-m", bare, "--tokens", tiny_store,
                     "--out", tmp_path / "run", "--n-tokens", "256", "--no-ceiling")
    assert rc == 0, err
    assert "has no tokenizer files; using" in err


def test_plan_on_a_folder_without_config(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(capsys, "plan", "-m", models[0], "-m", tmp_path / "empty", match="no config.json")


def test_shape_mismatch_is_one_short_line(models, tiny_store, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    shutil.copytree(models[1], wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["n_inner"] = 96
    (wrong / "config.json").write_text(json.dumps(cfg))
    line = refused(capsys, "correlate", "-m", models[0], "-m", wrong, "--tokens", tiny_store,
                   "--out", tmp_path / "run")
    assert len(line) < 700 and "wrong" in line


# ---- 2. paths that do not depend on the working directory ----------------------------------
def test_run_reopened_from_another_folder(models, tiny_store, tmp_path, capsys, monkeypatch):
    work = tmp_path / "proj"
    work.mkdir()
    shutil.copytree(models[0], work / "m0")
    shutil.copytree(models[1], work / "m1")
    shutil.copytree(tiny_store, work / "store")
    monkeypatch.chdir(work)
    rc, _, err = cli(capsys, "correlate", "-m", "m0", "-m", "m1", "--tokens", "store",
                     "--out", "run", "--n-tokens", "256", "--no-ceiling")
    assert rc == 0, err
    m = json.loads((work / "run" / "manifest.json").read_text())
    assert Path(m["tokens"]["path"]).is_absolute()
    assert all(Path(e["location"]).is_absolute() for e in m["models"])
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "intervene", "proj/run", "--neuron", "L0.N1", "--values", "0",
                     "--random-baseline", "0")
    assert rc == 0, err
    # the store moved: the error says how to point at it, and that works
    shutil.move(work / "store", tmp_path / "store2")
    refused(capsys, "intervene", "proj/run", "--neuron", "L0.N1", match="--tokens")
    rc, _, err = cli(capsys, "intervene", "proj/run", "--neuron", "L0.N1", "--values", "0",
                     "--random-baseline", "0", "--tokens", "store2")
    assert rc == 0, err
    # a model moved away: one line naming the folder, never a hub lookup
    shutil.move(work / "m0", tmp_path / "elsewhere")
    refused(capsys, "intervene", "proj/run", "--neuron", "L0.N1", "--tokens", "store2",
            match="no longer exists")


def test_store_tokenizer_path_is_absolute_and_a_moved_one_is_named(tiny_corpus, tiny_tokenizer,
                                                                   tmp_path, monkeypatch):
    from unineurons.errors import UnineuronsError
    from unineurons.tokens import TokenStore, build_token_store

    shutil.copytree(tiny_tokenizer, tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    store = build_token_store(tiny_corpus, "tok", CTX, 256, "store")
    assert store.manifest["tokenizer"]["path"] == str(tmp_path / "tok")
    monkeypatch.chdir("/")
    assert TokenStore.open(tmp_path / "store").tokenizer_path == str(tmp_path / "tok")
    shutil.move(tmp_path / "tok", tmp_path / "tok2")
    with pytest.raises(UnineuronsError, match="no longer exists"):
        _ = TokenStore.open(tmp_path / "store").tokenizer_path


def test_offline_hub_lookup_fails_at_once(monkeypatch):
    import time

    from unineurons.checks import offline_if_unreachable
    from unineurons.errors import UnineuronsError
    from unineurons.models.load import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://unreachable.invalid")
    assert offline_if_unreachable(timeout=0.5)
    t0 = time.perf_counter()
    with pytest.raises(UnineuronsError):
        load_tokenizer("someorg/somemodel")
    assert time.perf_counter() - t0 < 5


# ---- 9. leftovers after a kill ---------------------------------------------------------------
def test_temp_files_are_swept_on_the_next_command(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    left = [run / ".neurons.parquet.x1y2.tmp", run / "pairs" / ".a__b.safetensors.q.tmp"]
    for p in left:
        p.write_bytes(b"half")
    rc, _, err = cli(capsys, "intervene", run, "--neuron", "L0.N1", "--values", "0",
                     "--random-baseline", "0", "--n-tokens", "128")
    assert rc == 0, err
    assert not any(p.exists() for p in left)


def test_zoo_info_says_when_metrics_are_unreadable(tiny_store, tmp_path, capsys):
    rc, _, err = cli(capsys, "zoo", "train", "--tokens", tiny_store, "--out", tmp_path / "zoo",
                     "--preset", "micro", "--seeds", "0,1", "--steps", "4", "--workers", "1")
    assert rc == 0, err
    metrics = tmp_path / "zoo" / "seed0" / "metrics.jsonl"
    assert metrics.is_file()
    metrics.write_bytes(b"\xff\xfe garbage\n" + metrics.read_bytes())
    rc, out, err = cli(capsys, "zoo", "info", tmp_path / "zoo")
    assert rc == 0, err
    assert "unreadable line" in out and "seed 0" in out


def test_a_damaged_zoo_resume_state_has_a_fix_that_works(tiny_store, tmp_path, capsys):
    args = ["zoo", "train", "--tokens", tiny_store, "--out", tmp_path / "zoo", "--preset",
            "micro", "--seeds", "0,1", "--steps", "4", "--workers", "1"]
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    state = tmp_path / "zoo" / "seed1" / "resume" / "state.json"
    state.write_text(state.read_text()[:40])
    line = refused(capsys, *args, match="delete the folder")
    shutil.rmtree(line.split("delete the folder ")[1].split(" and rerun")[0])  # as told
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err


def test_a_pipeline_failing_in_its_first_stage_leaves_nothing(tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"out = '{tmp_path / 'out'}'\n[tokenizer]\nvocab_size = 300\n"
                   f"source = 'jsonl:{tmp_path / 'missing.jsonl'}'\n")
    refused(capsys, "run", cfg, match="missing.jsonl")
    assert not (tmp_path / "out").exists()


def test_correlate_plan_beyond_free_memory(models, tiny_store, tmp_path, capsys, monkeypatch):
    import unineurons.checks as checks

    monkeypatch.setattr(checks, "available_memory", lambda: 1000)
    refused(capsys, "correlate", "-m", models[0], "-m", models[1], "--tokens", tiny_store,
            "--out", tmp_path / "run", match="GB are available")
    assert not (tmp_path / "run").exists()


def test_errors_name_the_option_as_typed(models, tiny_store, run_dir, tmp_path, capsys):
    """A config field named otherwise on the command line is reported by its option's name."""
    line = refused(capsys, "correlate", "--model", models[0], "--tokens", tiny_store,
                   "--out", tmp_path / "one")
    assert line.startswith("error: option --model:"), line
    line = refused(capsys, "intervene", copy_run(run_dir, tmp_path), "--neuron", "l1n5")
    assert "--neuron:" in line and "--neurons" not in line, line
