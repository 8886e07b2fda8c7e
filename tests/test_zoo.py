"""The seed zoo: checkpoints are HF folders, seeds differ, runs are deterministic and resume
bitwise, bad input fails in one line with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unineurons.cli import main
from unineurons.errors import UnineuronsError
from unineurons.zoo import (
    PRESETS,
    ZooConfig,
    batch_rows,
    lr_at,
    parse_int_list,
    train_zoo,
    zoo_checkpoints,
    zoo_info,
)

STEPS, CKPTS = 8, (4,)
TIMING = ("elapsed_s", "tokens_per_s")  # metrics fields that legitimately differ between runs


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _metrics(zoo: Path, seed: int) -> list[dict]:
    rows = [json.loads(x) for x in (zoo / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def zoo(tiny_store, tiny_heldout_store, tmp_path_factory) -> Path:
    """Two micro seeds, 8 steps, checkpoints at 4 and 8, trained in this process."""
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    return train_zoo(tiny_store, out, preset="micro", seeds=(0, 1), steps=STEPS,
                     checkpoints=CKPTS, heldout=tiny_heldout_store, workers=1)


# ---- config, schedule, data order ---------------------------------------------------------

def test_presets_and_overrides():
    assert set(PRESETS) == {"micro", "tiny", "small"}
    cfg = ZooConfig.from_preset("tiny", lr=1e-2, batch_size=None)
    assert cfg.lr == 1e-2 and cfg.batch_size == PRESETS["tiny"].batch_size
    assert ZooConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UnineuronsError, match="unknown zoo preset"):
        ZooConfig.from_preset("huge")
    with pytest.raises(UnineuronsError, match="unknown zoo setting"):
        ZooConfig.from_preset("micro", learning_rate=1.0)
    with pytest.raises(UnineuronsError, match="must divide"):
        ZooConfig.from_preset("micro", n_head=3)
    with pytest.raises(UnineuronsError, match="batch_size"):
        ZooConfig.from_preset("micro", batch_size=0)


def test_lr_schedule_warms_up_and_ends_at_min_ratio():
    cfg = ZooConfig.from_preset("micro", warmup_frac=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(cfg.lr / 10) and lrs[9] == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert (np.diff(lrs[9:]) <= 0).all()  # monotone decay after warmup


def test_data_order_is_a_seeded_permutation_per_epoch():
    n, b = 10, 4
    epoch0 = np.concatenate([batch_rows(3, s, n, b) for s in range(5)])  # 20 rows = 2 epochs
    assert sorted(epoch0[:10]) == list(range(10)) and sorted(epoch0[10:]) == list(range(10))
    assert not np.array_equal(epoch0[:10], epoch0[10:])  # each epoch reshuffles
    np.testing.assert_array_equal(batch_rows(3, 2, n, b), epoch0[8:12])  # straddles epochs
    assert not np.array_equal(batch_rows(3, 0, n, b), batch_rows(4, 0, n, b))


def test_parse_int_list():
    assert parse_int_list(" 0, 1,2 ", "--seeds") == (0, 1, 2)
    for bad in ("", "0,x", "1.5", ","):
        with pytest.raises(UnineuronsError, match="--seeds"):
            parse_int_list(bad, "--seeds")


# ---- a trained zoo ------------------------------------------------------------------------

def test_checkpoints_load_with_auto_classes(zoo, tiny_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unineurons.tokens import TokenStore

    ckpts = zoo_checkpoints(zoo)
    assert {s: sorted(c) for s, c in ckpts.items()} == {0: [4, 8], 1: [4, 8]}
    store = TokenStore.open(tiny_store)
    model = AutoModelForCausalLM.from_pretrained(ckpts[0][8], use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(ckpts[0][8])
    c = model.config
    assert (c.model_type, c.activation_function, c.n_layer, c.n_embd, c.n_inner) == \
        ("gpt2", "gelu_new", 1, 32, 128)
    assert c.vocab_size == len(tok) == store.vocab_size and c.n_positions >= store.ctx
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0
    x = torch.from_numpy(np.asarray(store.tokens[:2], dtype=np.int64))
    with torch.no_grad():
        assert model(input_ids=x).logits.shape == (2, store.ctx, c.vocab_size)
    info = json.loads((ckpts[0][8] / "zoo_checkpoint.json").read_text())
    assert info["seed"] == 0 and info["step"] == 8


def test_seeds_differ(zoo):
    ckpts = zoo_checkpoints(zoo)
    w0, w1 = _weights(ckpts[0][8]), _weights(ckpts[1][8])
    assert all(not torch.equal(w0[k], w1[k]) for k in w0 if "ln" not in k)


def test_metrics_and_manifest(zoo, tiny_store):
    rows = [json.loads(x) for x in (zoo / "seed0" / "metrics.jsonl").read_text().splitlines()]
    log_every = PRESETS["micro"].log_every
    assert [r["step"] for r in rows] == sorted({*range(log_every, STEPS + 1, log_every), 4, 8})
    for r in rows:
        assert {"step", "tokens", "train_loss", "lr", "elapsed_s", "tokens_per_s"} <= set(r)
        assert r["tokens"] == r["step"] * PRESETS["micro"].batch_size * 64
        assert np.isfinite(r["train_loss"])
    assert all("heldout_loss" in r for r in rows if r["step"] in (4, 8))
    z = json.loads((zoo / "zoo.json").read_text())
    assert z["preset"] == "micro" and z["seeds"] == [0, 1] and z["steps"] == STEPS
    assert z["checkpoints"] == [4, 8] and z["config"]["n_layer"] == 1
    assert z["tokens"] == str(Path(tiny_store).resolve()) and len(z["tokens_sha256"]) == 64
    info = zoo_info(zoo)
    assert info["per_seed"][1]["step"] == STEPS and info["per_seed"][1]["heldout_loss"] > 0


def test_same_seed_same_weights_in_parallel_workers(zoo, tiny_store, tiny_heldout_store,
                                                    tmp_path):
    """Two spawned 1-thread workers reproduce the in-process zoo bit for bit."""
    other = train_zoo(tiny_store, tmp_path / "z", preset="micro", seeds=(1, 0), steps=STEPS,
                      checkpoints=CKPTS, heldout=tiny_heldout_store, workers=2)
    for seed in (0, 1):
        for step in (4, 8):
            assert _same_weights(zoo / f"seed{seed}" / f"step{step}",
                                 other / f"seed{seed}" / f"step{step}")
        assert _metrics(zoo, seed) == _metrics(other, seed)


def test_rerun_of_a_finished_zoo_changes_nothing(zoo, tiny_store, tiny_heldout_store):
    before = (zoo / "seed0" / "step8" / "model.safetensors").stat().st_mtime_ns
    train_zoo(tiny_store, zoo, preset="micro", seeds=(0, 1), steps=STEPS, checkpoints=CKPTS,
              heldout=tiny_heldout_store, workers=1)
    assert (zoo / "seed0" / "step8" / "model.safetensors").stat().st_mtime_ns == before


def test_resume_in_process_equals_uninterrupted(zoo, tiny_store, tiny_heldout_store, tmp_path,
                                                monkeypatch):
    import unineurons.zoo.run as run

    real = run.train_seed

    def crash_after_6(spec, seed, tokenizer=None, report=None):
        done = 0

        def report_then_crash(n):
            nonlocal done
            done += n
            if done >= 6:  # past the step-4 checkpoint, before the end
                raise KeyboardInterrupt

        return real(spec, seed, tokenizer=tokenizer, report=report_then_crash)

    args = dict(preset="micro", seeds=(0,), steps=STEPS, checkpoints=CKPTS,
                heldout=tiny_heldout_store, workers=1)
    monkeypatch.setattr(run, "train_seed", crash_after_6)
    with pytest.raises(KeyboardInterrupt):
        train_zoo(tiny_store, tmp_path / "z", **args)
    assert zoo_checkpoints(tmp_path / "z")[0].keys() == {4}
    assert _metrics(tmp_path / "z", 0)[-1]["step"] > 4  # rows past the checkpoint, to be redone
    monkeypatch.setattr(run, "train_seed", real)
    train_zoo(tiny_store, tmp_path / "z", **args)
    assert _same_weights(zoo / "seed0" / "step8", tmp_path / "z" / "seed0" / "step8")
    assert _metrics(zoo, 0) == _metrics(tmp_path / "z", 0)

    # A seed added later equals the same seed trained beside others from the start.
    train_zoo(tiny_store, tmp_path / "z", **{**args, "seeds": (1,)})
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["seeds"] == [0, 1]
    assert _same_weights(zoo / "seed1" / "step8", tmp_path / "z" / "seed1" / "step8")


def test_killed_cli_run_resumes_bitwise(tiny_store, tiny_heldout_store, tmp_path):
    """SIGKILL the CLI mid-run, rerun the same command, compare with one uninterrupted run."""
    steps, ckpts = 150, (30, 60, 90, 120)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from unineurons.cli import main; main()", "zoo", "train",
           "--tokens", str(tiny_store), "--heldout", str(tiny_heldout_store), "--preset", "micro",
           "--seeds", "0", "--steps", str(steps), "--checkpoints", ",".join(map(str, ckpts)),
           "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own group: killpg gets it all

    def state_step(seed: int) -> int:
        p = out / f"seed{seed}" / "resume" / "state.json"
        try:
            return json.loads(p.read_text())["step"]
        except (OSError, ValueError):
            return 0

    deadline = time.monotonic() + 60
    while state_step(0) < ckpts[0]:
        assert proc.poll() is None, f"run ended before it was killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = state_step(0)
    assert killed_at < steps, "the run finished before the kill: nothing was resumed"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    ref = train_zoo(tiny_store, tmp_path / "ref", preset="micro", seeds=(0,), steps=steps,
                    checkpoints=ckpts, heldout=tiny_heldout_store, workers=1)
    for step in ckpts + (steps,):
        assert _same_weights(ref / "seed0" / f"step{step}", out / "seed0" / f"step{step}"), \
            f"step {step} (killed after step {killed_at})"
    assert _metrics(ref, 0) == _metrics(out, 0)
    assert not list(out.rglob("*.tmp"))  # no temp files left behind


# ---- bad input ----------------------------------------------------------------------------

def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0,x"], "not an integer"),
    (["--seeds", ""], "empty"),
    (["--seeds", "1,2,1"], "given twice"),
    (["--checkpoints", "0,4"], "outside 1..8"),
    (["--checkpoints", "4,9"], "outside 1..8"),
    (["--checkpoints", "4,4"], "given twice"),
    (["--preset", "huge"], "unknown zoo preset"),
    (["--workers", "0"], "--workers"),
])
def test_bad_arguments(capsys, tmp_path, tiny_store, extra, message):
    out = tmp_path / "z"
    err = _cli_error(capsys, ["zoo", "train", "--tokens", str(tiny_store), "--out", str(out),
                              "--preset", "micro", "--steps", "8", *extra])
    assert message in err
    assert not out.exists()


def test_missing_token_store(capsys, tmp_path):
    out = tmp_path / "z"
    err = _cli_error(capsys, ["zoo", "train", "--tokens", str(tmp_path / "nope"), "--out",
                              str(out), "--preset", "micro", "--steps", "8"])
    assert "--tokens" in err and "does not exist" in err
    assert not out.exists()


def test_out_folder_holding_something_else(capsys, tmp_path, tiny_store):
    out = tmp_path / "z"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _cli_error(capsys, ["zoo", "train", "--tokens", str(tiny_store), "--out", str(out),
                              "--preset", "micro", "--steps", "8"])
    assert "not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_rerun_with_other_settings_is_refused(capsys, zoo, tiny_store, tiny_heldout_store):
    before = sorted(p.relative_to(zoo) for p in zoo.rglob("*"))
    err = _cli_error(capsys, ["zoo", "train", "--tokens", str(tiny_store), "--heldout",
                              str(tiny_heldout_store), "--out", str(zoo), "--preset", "micro",
                              "--steps", "8", "--checkpoints", "4", "--lr", "0.01"])
    assert "other settings" in err and "config" in err
    assert sorted(p.relative_to(zoo) for p in zoo.rglob("*")) == before


def test_info_cli(capsys, zoo):
    with pytest.raises(SystemExit) as e:  # main() always exits, with 0 on success
        main(["zoo", "info", str(zoo)])
    assert not e.value.code
    out = capsys.readouterr().out
    assert "zoo micro" in out and "8/8" in out
    err = _cli_error(capsys, ["zoo", "info", str(zoo / "seed0")])
    assert "not a zoo" in err
