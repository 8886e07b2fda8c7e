"""``zoo train --device``: the option is validated before anything is written, passes through
to the training loop, and on a GPU trains, checkpoints on CPU and resumes bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unineurons.cli import main
from unineurons.errors import UnineuronsError
from unineurons.zoo import train_zoo

STEPS, CKPTS = 6, (3,)


def _weights(zoo: Path, seed: int, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(zoo / f"seed{seed}" / f"step{step}" / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("device, message", [
    ("tpu", "device must be cpu or cuda"),
    ("cuda:x", "device must be cpu or cuda"),
    ("", "device must be cpu or cuda"),
])
def test_bad_device_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_store, device,
                                                   message):
    out = tmp_path / "z"
    with pytest.raises(SystemExit) as e:
        main(["zoo", "train", "--tokens", str(tiny_store), "--out", str(out), "--preset",
              "micro", "--steps", "4", "--device", device])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device" in err and message in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_without_a_gpu_is_refused_before_writing(tmp_path, tiny_store):
    with pytest.raises(UnineuronsError, match="--device: device cuda"):
        train_zoo(tiny_store, tmp_path / "z", preset="micro", seeds=(0,), steps=4,
                  device="cuda", workers=1)
    assert not (tmp_path / "z").exists()


def test_device_cpu_reaches_the_loop_and_changes_nothing(tiny_store, tiny_heldout_store,
                                                         tmp_path, monkeypatch):
    """--device cpu through the CLI gives the default run's bits; the spec the loop gets
    carries the device, and the fingerprint (hence resume) does not depend on it."""
    import unineurons.zoo.run as run

    seen: list[str] = []
    real = run.train_seed

    def spy(spec, seed, tokenizer=None, report=None):
        seen.append(spec.device)
        return real(spec, seed, tokenizer=tokenizer, report=report)

    monkeypatch.setattr(run, "train_seed", spy)
    ref = train_zoo(tiny_store, tmp_path / "ref", preset="micro", seeds=(0,), steps=STEPS,
                    checkpoints=CKPTS, heldout=tiny_heldout_store, workers=1)
    with pytest.raises(SystemExit) as e:
        main(["zoo", "train", "--tokens", str(tiny_store), "--heldout", str(tiny_heldout_store),
              "--out", str(tmp_path / "cli"), "--preset", "micro", "--seeds", "0", "--steps",
              str(STEPS), "--checkpoints", "3", "--workers", "1", "--device", "cpu"])
    assert not e.value.code
    assert seen == ["cpu", "cpu"]
    for step in (3, STEPS):
        assert _same(_weights(ref, 0, step), _weights(tmp_path / "cli", 0, step))
    fp = [json.loads((z / "seed0" / "resume" / "state.json").read_text())["fingerprint"]
          for z in (ref, tmp_path / "cli")]
    assert fp[0] == fp[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zoo_on_cuda_checkpoints_on_cpu_and_resumes_bitwise(tiny_store, tiny_heldout_store,
                                                             tmp_path, monkeypatch):
    import unineurons.zoo.run as run

    args = dict(preset="micro", seeds=(0,), steps=STEPS, checkpoints=CKPTS,
                heldout=tiny_heldout_store, workers=1, device="cuda")
    ref = train_zoo(tiny_store, tmp_path / "ref", **args)
    cpu = train_zoo(tiny_store, tmp_path / "cpu", **{**args, "device": "cpu"})
    w = _weights(ref, 0, STEPS)
    assert all(t.device.type == "cpu" for t in w.values())
    wc = _weights(cpu, 0, STEPS)  # the same training on CPU: equal up to float rounding
    assert all(torch.allclose(w[k], wc[k], rtol=1e-3, atol=1e-4) for k in w)
    state = load_file(str(ref / "seed0" / "resume" / "state-step6.safetensors"))
    assert state and all(t.device.type == "cpu" for t in state.values())

    real = run.train_seed

    def crash_after_4(spec, seed, tokenizer=None, report=None):
        done = 0

        def report_then_crash(n):
            nonlocal done
            done += n
            if done >= 4:  # past the step-3 checkpoint
                raise KeyboardInterrupt

        return real(spec, seed, tokenizer=tokenizer, report=report_then_crash)

    monkeypatch.setattr(run, "train_seed", crash_after_4)
    with pytest.raises(KeyboardInterrupt):
        train_zoo(tiny_store, tmp_path / "z", **args)
    monkeypatch.setattr(run, "train_seed", real)
    train_zoo(tiny_store, tmp_path / "z", **args)
    assert _same(w, _weights(tmp_path / "z", 0, STEPS))
