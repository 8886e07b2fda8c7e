"""A run's model folders and a token store's tokenizer folder moved (issue 17, item 2): the
command that needs them fails with one line naming the override, and that override then works
(the weights' sha256 / the vocabulary fingerprint still checked)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from unineurons.cli import main

CTX = 64


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return int(e.value.code or 0), err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture
def project(make_gpt2, tiny_store, tmp_path_factory) -> Path:
    """proj/{m0, m1, store, run}: a correlate run made from proj with relative paths (the run
    records their absolute folders, so each test gets its own to move)."""
    import os

    from unineurons.correlate.config import CorrelateConfig
    from unineurons.correlate.engine import run_correlate

    root = tmp_path_factory.mktemp("moved") / "proj"
    root.mkdir()
    for i in range(2):
        make_gpt2(root / f"m{i}", seed=i)
    shutil.copytree(tiny_store, root / "store")
    here = os.getcwd()
    os.chdir(root)
    try:
        run_correlate(CorrelateConfig(models=["m0", "m1"], tokens="store", n_tokens=256,
                                      batch_size=8, ceiling=False, null_rotations=0), Path("run"))
    finally:
        os.chdir(here)
    return root


COMMANDS = {
    "ablate": ["--sets", "universal,random", "--sizes", "1", "--random-draws", "1",
               "--bootstrap", "0", "--model", "m0"],
    "intervene": ["--neuron", "L0.N1", "--values", "0", "--random-baseline", "0"],
    "analyze": ["--model", "m0", "--neurons", "all", "--n-tokens", "128"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_moved_model_folder_names_the_override_that_works(command, project, tmp_path, capsys,
                                                          monkeypatch):
    proj = project
    run = proj / "run"
    shutil.move(proj / "m0", tmp_path / "m0_new")
    monkeypatch.chdir(tmp_path)  # and from another folder
    rc, err = cli(capsys, command, run, *COMMANDS[command])
    line = one_line(err)
    assert rc == 1 and "--model-path m0=FOLDER" in line, line
    rc, err = cli(capsys, command, run, *COMMANDS[command], "--model-path",
                  f"m0={tmp_path / 'm0_new'}")
    assert rc == 0, err


def test_a_folder_of_other_weights_is_refused(project, tmp_path, capsys, make_gpt2):
    proj = project
    make_gpt2(tmp_path / "other", seed=7)
    rc, err = cli(capsys, "intervene", proj / "run", *COMMANDS["intervene"], "--model-path",
                  f"m0={tmp_path / 'other'}")
    assert rc == 1 and "weights changed" in one_line(err)
    rc, err = cli(capsys, "intervene", proj / "run", *COMMANDS["intervene"], "--model-path",
                  f"m0={tmp_path / 'nowhere'}")
    assert rc == 1 and "does not exist" in one_line(err)
    rc, err = cli(capsys, "intervene", proj / "run", *COMMANDS["intervene"], "--model-path", "m0")
    assert rc == 1 and "SPEC=FOLDER" in one_line(err)


def test_api_relocated(project, tmp_path):
    """From Python: the same override as a context manager."""
    from unineurons import api
    from unineurons.errors import UnineuronsError
    from unineurons.relocate import relocated

    proj = project
    shutil.move(proj / "m1", tmp_path / "m1_new")
    with pytest.raises(UnineuronsError, match="--model-path"):
        api.intervene(proj / "run", "L0.N1", model="m1", values=[0.0], random_baseline=0)
    with relocated(models={"m1": str(tmp_path / "m1_new")}):
        api.intervene(proj / "run", "L0.N1", model="m1", values=[0.0], random_baseline=0)


def test_ray_workers_get_the_moved_folder(project, tmp_path):
    """The shard job (what Ray workers load) holds the folder the driver loaded from."""
    from unineurons.analyses.interventions import load_run_model, run_model_entries
    from unineurons.rundir import RunDir
    from unineurons.sharding import model_job

    shutil.move(project / "m0", tmp_path / "m0_new")
    rd = RunDir.open(project / "run")
    with relocated_m0(tmp_path / "m0_new"):
        m = load_run_model(run_model_entries(rd, ["m0"])[0])
    job = model_job([m], project / "store", "cpu")
    assert job["locations"] == [str((tmp_path / "m0_new").resolve())] and job["specs"] == ["m0"]


def relocated_m0(folder):
    from unineurons.relocate import relocated

    return relocated(models={"m0": str(folder)})


def test_moved_tokenizer_of_a_store_names_tokenizer_that_works(tiny_corpus, tiny_tokenizer,
                                                               tmp_path, capsys, monkeypatch):
    from unineurons.tokenizer import train_tokenizer
    from unineurons.tokens import build_token_store

    shutil.copytree(tiny_tokenizer, tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    build_token_store(tiny_corpus, "tok", CTX, 2048, "store")
    shutil.move(tmp_path / "tok", tmp_path / "tok_new")
    train = ["zoo", "train", "--tokens", tmp_path / "store", "--preset", "micro", "--seeds", "0",
             "--steps", "2", "--workers", "1"]
    rc, err = cli(capsys, *train, "--out", tmp_path / "zoo")
    assert rc == 1 and "--tokenizer DIR" in one_line(err)
    assert not (tmp_path / "zoo").exists()
    other = train_tokenizer(tiny_corpus, 300, tmp_path / "other_tok", max_chars=40_000)
    rc, err = cli(capsys, *train, "--out", tmp_path / "zoo", "--tokenizer", other)
    assert rc == 1 and "another vocabulary" in one_line(err)
    assert not (tmp_path / "zoo").exists()
    rc, err = cli(capsys, *train, "--out", tmp_path / "zoo", "--tokenizer", tmp_path / "tok_new")
    assert rc == 0, err
    assert (tmp_path / "zoo" / "zoo.json").is_file()
