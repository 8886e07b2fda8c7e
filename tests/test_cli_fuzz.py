"""Every option of every command, given a value that means nothing (issue 17).

The commands and their options are read from the typer app itself, so a new command or option
is walked without editing this file. Numeric options get NaN, infinities, -1, a number beyond
int64 and 0 where their range starts at 1; choice-like string options get a bogus word. Each
invocation must exit non-zero with one line on stderr that names the option (or the value),
print no traceback and create nothing.
"""

from __future__ import annotations

import typing

import pytest
import typer

from unineurons.cli import app, main
from unineurons.config import option_ranges

HUGE = str(10**30)

#: What each command needs to parse at all (paths that do not exist: the bad option must be
#: refused before any of them is looked at, and even if not, nothing may be created).
REQUIRED = {
    "correlate": ["-m", "{tmp}/m1", "-m", "{tmp}/m2", "--tokens", "{tmp}/t", "--out", "{tmp}/o"],
    "plan": ["-m", "{tmp}/m1", "-m", "{tmp}/m2"],
    "analyze": ["{tmp}/r"],
    "ablate": ["{tmp}/r"],
    "intervene": ["{tmp}/r", "--neuron", "L0.N1"],
    "dynamics": ["--out", "{tmp}/o", "--tokens", "{tmp}/t"],
    "report": ["{tmp}/r"],
    "run": ["{tmp}/c.toml"],
    "demo": ["--out", "{tmp}/o"],
    "tokenizer train": ["--source", "stdlib", "--vocab-size", "300", "--out", "{tmp}/o"],
    "tokens build": ["--source", "stdlib", "--tokenizer", "{tmp}/tok", "--n-tokens", "100",
                     "--out", "{tmp}/o"],
    "tokens info": ["{tmp}/t"],
    "zoo train": ["--tokens", "{tmp}/t", "--out", "{tmp}/o"],
    "zoo info": ["{tmp}/z"],
    "show": ["{tmp}/r", "L0.N1"],
    "export": ["{tmp}/r"],
    "families": [],
    "zoo partner-kinds": ["{tmp}/r"],
}

#: String options whose value is one of a few words or a small grammar: a bogus word is wrong.
CHOICES = {"pairs", "baseline", "device", "dtype", "memory_budget", "backend", "method", "sets",
           "sizes", "universal", "preset", "split", "formats", "values", "steps", "seeds",
           "checkpoints", "ablate_sizes", "ablate_method", "vocab_neuron", "config", "neuron",
           "role"}


def _commands():
    root = typer.main.get_command(app)

    def walk(c, path):
        if hasattr(c, "commands"):
            for name, sub in c.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield " ".join(path), c

    return list(walk(root, ()))


def _base_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, typing.Union) or (args and len(args) == 1):
        return _base_type(args[0]) if args else annotation
    return annotation


def _range(name: str, default: tuple) -> tuple:
    """(low, high) of an option: its config field's bounds (strict ones as the inclusive edge)."""
    b = option_ranges().get(name)
    if b is None:
        return default
    return b.get("ge", b.get("gt")), b.get("le", b.get("lt"))


def bad_values(param) -> list[str]:
    """The meaningless values to try for one option."""
    t = _base_type(param.type_descriptor.annotation)
    if t is bool or param.is_flag:
        return []
    if t is int:
        vals = ["-1", HUGE]
        lo, hi = _range(param.name, (0, None))
        if lo is not None and lo >= 1:
            vals.append(str(int(lo) - 1))
        if hi is not None:
            vals.append(str(int(hi) + 1))
        return vals
    if t is float:
        vals = ["nan", "inf", "-inf"]
        lo, hi = _range(param.name, (None, None))
        if lo is not None:
            vals.append(str(lo - 1))
        if hi is not None:
            vals.append(str(hi + 1))
        return vals
    if t is str and param.name in CHOICES:
        return ["bogus"]
    return []


COMMANDS = _commands()


def test_every_command_is_walked():
    names = {n for n, _ in COMMANDS}
    assert set(REQUIRED) == names, "add the new command's required arguments to REQUIRED"


@pytest.mark.parametrize("name", [n for n, _ in COMMANDS])
def test_every_option_refuses_meaningless_values(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a stray hub lookup fails at once
    monkeypatch.chdir(tmp_path)
    command = dict(COMMANDS)[name]
    base = [a.format(tmp=tmp_path) for a in REQUIRED[name]]
    tried, failures = 0, []
    for param in command.params:
        if not param.opts or not param.opts[0].startswith("--") or param.name == "help":
            continue
        flag = param.opts[0]
        for value in bad_values(param):
            tried += 1
            argv = [*name.split(), *base, f"{flag}={value}"]
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main(argv)
            out, err = capsys.readouterr()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            why = None
            if e.value.code in (0, None):
                why = "exit 0"
            elif "Traceback" in out + err:
                why = "traceback"
            elif len(lines) != 1 and not (e.value.code == 2 and flag in err):
                why = f"{len(lines)} lines"
            elif flag not in err and value not in err and value.lower() not in err.lower():
                why = "the error names neither the option nor the value"
            elif sorted(p.name for p in tmp_path.iterdir()):
                why = f"created {sorted(p.name for p in tmp_path.iterdir())}"
            if why:
                failures.append(f"{name} {flag}={value}: {why}: {err.strip()[:200]!r}")
            for p in tmp_path.iterdir():  # keep the next try honest
                import shutil

                shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(f"{name}: {tried} invalid values tried")
    assert not failures, "\n".join(failures)
    if name not in ("run", "tokens info", "zoo info", "export", "families", "zoo partner-kinds"):
        assert tried > 0


def test_count_of_tries():
    """The number of (command, option, value) combinations the walk tries (reported)."""
    n = sum(len(bad_values(p)) for _, c in COMMANDS for p in c.params
            if p.opts and p.opts[0].startswith("--") and p.name != "help")
    print(f"{n} invalid option values over {len(COMMANDS)} commands")
    assert n > 200


def _config_fields(model_cls, prefix=()):
    """(key path, annotation) of every leaf field of a pipeline config model, nested."""
    from pydantic import BaseModel

    for name, f in model_cls.model_fields.items():
        ann = f.annotation
        inner = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            yield from _config_fields(sub, (*prefix, name))
        else:
            yield (*prefix, name), ann


def _toml_bad_values(ann) -> list[str]:
    t = _base_type(ann)
    is_list = typing.get_origin(ann) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(ann))
    vals = {int: ["-1", HUGE], float: ["nan", "inf", "-inf"]}.get(t, [])
    return [f"[{v}]" for v in vals] if is_list else vals


def test_every_numeric_config_key_of_run_is_checked(tmp_path, capsys, monkeypatch):
    """``unineurons run`` holds every numeric key of the TOML to the same rules, naming it."""
    from unineurons.pipeline import PipelineConfig

    monkeypatch.chdir(tmp_path)
    tried, failures = 0, []
    for key, ann in _config_fields(PipelineConfig):
        if len(key) < 2:
            continue
        section, *rest = key
        for value in _toml_bad_values(ann):
            tried += 1
            toml = tmp_path / "bad.toml"
            head = ".".join(rest[:-1])
            toml.write_text(f"out = '{tmp_path / 'out'}'\n[{section}{'.' + head if head else ''}]"
                            f"\n{rest[-1]} = {value}\n")
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main(["run", str(toml)])
            err = capsys.readouterr().err
            dotted = ".".join(key)
            named = dotted in err or (f"'{'.'.join(key[:-1])}'" in err and key[-1] in err)
            if e.value.code in (0, None) or "Traceback" in err or not named \
                    or len(err.strip().splitlines()) != 1 or (tmp_path / "out").exists():
                failures.append(f"{dotted} = {value}: {err.strip()[:200]!r}")
    print(f"run: {tried} invalid config values tried")
    assert tried > 20
    assert not failures, "\n".join(failures)
