"""``correlate --save-full-matrix`` checks the free disk before any work starts: the full
correlation matrices (float16, one per pair) are estimated from the plan, compared with the
free space of ``--out``'s disk, and a run that cannot fit is refused with one line, leaving
nothing behind. The estimate is held to the bytes a real run writes."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors import safe_open

from unineurons.checks import DISK_MARGIN, check_matrix_disk
from unineurons.cli import main
from unineurons.correlate.plan import ModelShape, Plan, Unit, full_matrix_bytes, pair_list
from unineurons.errors import UnineuronsError

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def models(make_gpt2, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("matrix_models")
    return [str(make_gpt2(root / f"m{i}", seed=30 + i)) for i in range(3)]


def _free(monkeypatch, free: int) -> list[Path]:
    """Make every disk report ``free`` bytes; returns the folders asked about."""
    asked: list[Path] = []

    def usage(path):
        asked.append(Path(path))
        return Usage(10**15, 10**15 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


def _gpt2_small_plan(n_models: int, mode: str) -> tuple[Plan, list[ModelShape]]:
    """Every pair in blocks of 5 layers (the last of 2), over two passes, and a ceiling."""
    shapes = [ModelShape(12, 3072)] * n_models
    units = [Unit(a, b, l0, min(l0 + 5, 12), "pair", cols_dir=c)
             for a, b, c in pair_list(n_models, mode) for l0 in range(0, 12, 5)]
    units.append(Unit(0, 0, 0, 12, "ceiling"))  # writes no matrix
    half = len(units) // 2
    return Plan([units[:half], units[half:]], [0, 0], 0, 0, 80 * 10**9), shapes


def test_estimate_of_gpt2_small_pairs():
    plan, shapes = _gpt2_small_plan(5, "reference")
    assert full_matrix_bytes(plan, shapes) == 4 * 36864**2 * 2  # 2.7 GB per pair
    plan, shapes = _gpt2_small_plan(5, "all")
    assert full_matrix_bytes(plan, shapes) == 10 * 36864**2 * 2  # one per unordered pair


def test_refusal_names_need_free_and_fix(tmp_path, monkeypatch):
    plan, shapes = _gpt2_small_plan(5, "reference")
    size = full_matrix_bytes(plan, shapes)
    need = int(2 * size * (1 + DISK_MARGIN[0])) + DISK_MARGIN[1]
    asked = _free(monkeypatch, need - 1)
    with pytest.raises(UnineuronsError) as e:
        check_matrix_disk(plan, shapes, tmp_path / "new" / "run")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--save-full-matrix: the full correlation matrices "
                                              "of 4 model pair(s) (float16, 10.9 GB;")
    assert f"with a 5% margin needs {need / 1e9:,.2f} GB but {tmp_path} has only " in msg
    assert msg.endswith("free space there, choose an --out on a larger disk, or drop "
                        "--save-full-matrix")
    assert asked == [tmp_path]  # the nearest existing folder
    _free(monkeypatch, need)
    check_matrix_disk(plan, shapes, tmp_path / "new" / "run")
    # a resumed run: the finished passes' results are on disk already, and count
    plan, shapes = Plan([[Unit(0, 1, 0, 2, "pair")]], [0], 0, 0, 10**9), [ModelShape(2, 64)] * 2
    size = full_matrix_bytes(plan, shapes)
    state = tmp_path / "state"
    state.mkdir()
    (state / "results.0.safetensors").write_bytes(b"\0" * size)
    _free(monkeypatch, int(size * (1 + DISK_MARGIN[0])) + DISK_MARGIN[1] + 1)
    check_matrix_disk(plan, shapes, tmp_path, state)
    with pytest.raises(UnineuronsError, match="--save-full-matrix"):
        check_matrix_disk(plan, shapes, tmp_path)


def test_cli_refuses_before_any_work_and_leaves_nothing(models, tiny_store, tmp_path, capsys,
                                                        monkeypatch):
    _free(monkeypatch, 10_000)
    out = tmp_path / "runs" / "run"
    with pytest.raises(SystemExit) as e:
        main(["correlate", "-m", models[0], "-m", models[1], "--tokens", str(tiny_store),
              "--out", str(out), "--n-tokens", "256", "--save-full-matrix"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert e.value.code == 1 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: --save-full-matrix: the full "), err
    assert "has only 0.00 GB free" in lines[0] and "drop --save-full-matrix" in lines[0]
    assert not (tmp_path / "runs").exists()
    # without --save-full-matrix the same disk is no obstacle
    with pytest.raises(SystemExit) as e:
        main(["correlate", "-m", models[0], "-m", models[1], "--tokens", str(tiny_store),
              "--out", str(out), "--n-tokens", "256"])
    assert e.value.code in (0, None), capsys.readouterr().err


def test_estimate_is_what_a_run_writes_and_a_finished_run_needs_no_disk(models, tiny_store,
                                                                       tmp_path, monkeypatch):
    import unineurons as un

    kw = dict(models=models, tokens=tiny_store, n_tokens=512, pairs="all", null_rotations=0,
              save_full_matrix=True)
    run = un.correlate(out=tmp_path / "run", **kw)
    plan = run.result.plan
    written = 0
    for f in (tmp_path / "run" / "pairs").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as t:
            if "rho" in t.keys():  # noqa: SIM118
                written += t.get_tensor("rho").numel() * 2
    shapes = [ModelShape(2, 64)] * 3
    assert written == full_matrix_bytes(plan, shapes) == 3 * 128 * 128 * 2
    assert not list((tmp_path / "run" / "state").glob("*.safetensors"))
    _free(monkeypatch, 0)  # a finished run is reused, not refused
    assert un.correlate(out=tmp_path / "run", **kw).result.reused


def test_checkpoint_disk_counts_two_states_and_the_layer_covariances(tmp_path, monkeypatch):
    """A pass streaming more than --checkpoint-tokens saves its blocks and the layer
    covariances every --checkpoint-tokens; the disk must hold two such states at once."""
    from unineurons.checks import check_checkpoint_disk

    plan, shapes = _gpt2_small_plan(5, "reference")
    plan = Plan(plan.passes, [40 * 10**9, 30 * 10**9], 0, 0, plan.budget)
    layercov = 5 * 12 * 3072 * 3072 * 8
    need = int((2 * (40 * 10**9 + layercov) + layercov) * (1 + DISK_MARGIN[0])) + DISK_MARGIN[1]
    kw = dict(stream_tokens=10**8, checkpoint_tokens=10**6)
    _free(monkeypatch, need - 1)
    with pytest.raises(UnineuronsError) as e:
        check_checkpoint_disk(plan, shapes, tmp_path / "run", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("correlate's checkpoints (every 1,000,000 of "
                                              "100,000,000 tokens")
    assert f"needs {need / 1e9:,.2f} GB but {tmp_path} has only" in msg
    assert msg.endswith("raise --checkpoint-tokens to at least 100,000,000 (no resume point "
                        "within a pass then)")
    check_checkpoint_disk(plan, shapes, tmp_path / "run", stream_tokens=10**6,
                          checkpoint_tokens=10**6)  # never saves within a pass: no need
    _free(monkeypatch, need)
    check_checkpoint_disk(plan, shapes, tmp_path / "run", **kw)
    with pytest.raises(UnineuronsError, match="and the full matrices"):  # both must fit
        check_checkpoint_disk(plan, shapes, tmp_path / "run", also=10**9, **kw)


def test_cli_refuses_checkpoints_that_cannot_fit(models, tiny_store, tmp_path, capsys,
                                                 monkeypatch):
    _free(monkeypatch, 10_000)
    out = tmp_path / "runs" / "run"
    with pytest.raises(SystemExit) as e:
        main(["correlate", "-m", models[0], "-m", models[1], "--tokens", str(tiny_store),
              "--out", str(out), "--n-tokens", "256", "--checkpoint-tokens", "64"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert e.value.code == 1 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: correlate's checkpoints"), err
    assert not (tmp_path / "runs").exists()
