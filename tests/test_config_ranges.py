"""Every numeric field of every stage config has its range in the config model itself (issue 17,
item 7): a model built from Python refuses an out-of-range value, and the CLI / TOML paths read
the same range from it (``unineurons.config.option_ranges``).

The fields are read from the models, so a new numeric field without a range fails here until
it gets one (or is listed in UNBOUNDED with the reason)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from pydantic import BaseModel, ValidationError

from unineurons.config import (
    MAX_INT,
    OPTION_RANGES,
    build,
    config_models,
    field_bounds,
    model_field_bounds,
    option_ranges,
)
from unineurons.errors import UnineuronsError

#: Numeric fields that may take any finite value, with the reason.
UNBOUNDED = {
    ("InterveneConfig", "values"): "activation values to patch in: any finite real is a valid "
                                   "intervention (negative, beyond the observed range)",
    ("RoleConfig", "entropy_values"): "activation values (or scales of the largest activation) "
                                      "an entropy candidate is fixed at: any finite real",
}

#: Fields a model needs besides the one under test (required, or needed by a validator).
REQUIRED = {
    "CorrelateConfig": {"models": ["a", "b"], "tokens": "t"},
    "AblateConfig": {},
    "InterveneConfig": {"neurons": ["L0.N1"]},
    "DynamicsConfig": {"zoo": "z", "tokens": "t"},
}


def _numeric(ann) -> type | None:
    """int or float when the annotation holds a number (directly, optional, or as items)."""
    for a in (ann, *typing.get_args(ann)):
        if a in (int, float):
            return a
        for b in typing.get_args(a):
            if b in (int, float):
                return b
            if typing.get_origin(b) is typing.Annotated and typing.get_args(b)[0] in (int, float):
                return typing.get_args(b)[0]
        if typing.get_origin(a) is typing.Annotated and typing.get_args(a)[0] in (int, float):
            return typing.get_args(a)[0]
    return None


def _fields(cls):
    """(name, kind, bounds, is_list) of every numeric field of a config class."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _numeric(hints[f.name])
            if kind is not None:
                yield f.name, kind, cls.BOUNDS.get(f.name, {}), False
        return
    for name, f in cls.model_fields.items():
        kind = _numeric(f.annotation)
        if kind is None:
            continue
        is_list = typing.get_origin(f.annotation) in (list, tuple) or any(
            typing.get_origin(a) in (list, tuple) for a in typing.get_args(f.annotation))
        yield name, kind, field_bounds(f), is_list


CASES = [(cls, name, kind, b, is_list) for cls in config_models() for name, kind, b, is_list in _fields(cls)]


def test_the_walk_finds_the_fields():
    names = {(c.__name__, n) for c, n, *_ in CASES}
    assert ("CorrelateConfig", "threshold") in names and ("ZooConfig", "lr") in names
    assert ("DynamicsConfig", "seeds") in names and ("RoleConfig", "null_quantile") in names
    assert len(CASES) > 80


@pytest.mark.parametrize("cls,name,kind,bounds,is_list", CASES,
                         ids=[f"{c.__name__}.{n}" for c, n, *_ in CASES])
def test_every_numeric_field_has_a_range(cls, name, kind, bounds, is_list):
    if (cls.__name__, name) in UNBOUNDED:
        assert not bounds, "listed as unbounded but has bounds: drop it from UNBOUNDED"
        for bad in (float("nan"), float("inf"), float("-inf")):  # finite all the same
            with pytest.raises(ValidationError, match=name):
                _make(cls, **{name: [bad] if is_list else bad})
        return
    assert bounds, f"{cls.__name__}.{name} has no range: give it Field(ge=..., le=...)"
    if kind is int:  # an int needs both ends: beyond int64 torch and numpy cannot index
        assert ("ge" in bounds or "gt" in bounds) and ("le" in bounds or "lt" in bounds), bounds
        assert bounds.get("le", bounds.get("lt")) <= MAX_INT


def _outside(bounds, kind):
    """Values just outside each end of ``bounds``."""
    out = []
    for k, v in bounds.items():
        step = 1 if kind is int else max(abs(v), 1.0) * 1e-6
        out.append({"ge": v - step, "gt": v, "le": v + step, "lt": v}[k])
    return [kind(x) if kind is int else float(x) for x in out]


def _make(cls, **kw):
    if dataclasses.is_dataclass(cls):
        from unineurons.zoo.config import ZooConfig

        return ZooConfig.from_preset("micro", **kw)
    return cls(**{**REQUIRED.get(cls.__name__, {}), **kw})


@pytest.mark.parametrize("cls,name,kind,bounds,is_list", [c for c in CASES if c[3]],
                         ids=[f"{c.__name__}.{n}" for c, n, _, b, _ in CASES if b])
def test_the_model_itself_refuses_out_of_range(cls, name, kind, bounds, is_list):
    """Built directly from Python (as the API does), not through the CLI."""
    _make(cls)  # the defaults pass
    for bad in _outside(bounds, kind):
        value = [bad] if is_list else bad
        with pytest.raises((ValidationError, UnineuronsError)) as e:
            _make(cls, **{name: value})
        assert name in str(e.value)
    for bad in (float("nan"), float("inf")):
        if kind is float:
            with pytest.raises((ValidationError, UnineuronsError)):
                _make(cls, **{name: [bad] if is_list else bad})


def test_one_line_error_names_option_and_range():
    from unineurons.correlate.config import CorrelateConfig

    with pytest.raises(UnineuronsError) as e:
        build(CorrelateConfig, models=["a", "b"], tokens="t", threshold=5.0)
    assert str(e.value) == "option --threshold: 5.0 is out of range; it must be >= -1 and <= 1"
    with pytest.raises(ValidationError, match="threshold"):
        CorrelateConfig(models=["a", "b"], tokens="t", threshold=5)


def test_toml_error_names_key_and_range():
    from unineurons.pipeline import load_config

    with pytest.raises(UnineuronsError) as e:
        load_config(text="[zoo]\nseeds = [0, -1]\n")
    assert str(e.value) == "config: key 'zoo.seeds': -1 is out of range; it must be >= 0 and <= 4294967295"
    with pytest.raises(UnineuronsError, match=r"key 'correlate.batch_size': 0 is out of range; it must be >= 1"):
        load_config(text="[correlate]\nbatch_size = 0\n")


def test_api_kwargs_are_held_to_the_range():
    """api.py builds configs from kwargs with config.build: the range reaches it."""
    from unineurons.analyses.analyze import AnalyzeConfig

    with pytest.raises(UnineuronsError, match=r"option --vr-threshold: 1.5 is out of range; it must be >= 0 and <= 1"):
        build(AnalyzeConfig, vr_threshold=1.5)


def test_one_name_one_range():
    """A name means the same in every config, so the CLI's pre-check by option name (before a
    command makes anything) holds each option to its config field's range."""
    seen: dict[str, tuple[str, dict]] = {}
    for cls in config_models():
        for name, b in model_field_bounds(cls).items():
            if name in OPTION_RANGES:
                continue  # a CLI-only option of a command with no config model
            if name in seen:
                assert seen[name][1] == b, f"{name}: {seen[name][0]} {seen[name][1]} vs {cls.__name__} {b}"
            seen[name] = (cls.__name__, b)
    r = option_ranges()
    assert r["threshold"] == {"ge": -1, "le": 1} and r["dpi"] == {"ge": 50, "le": 600}
    assert issubclass(config_models()[0], BaseModel)
