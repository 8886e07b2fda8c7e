"""The accumulator protocol and the one shared check every accumulator must pass.

Every statistic unineurons computes over tokens is a *mergeable accumulator* (a monoid):

- ``update(*batch) -> self``      fold one batch in;
- ``merge(other) -> self``        fold another accumulator's state in;
- ``state_dict() -> dict``        tensors only (saved as safetensors: no pickle);
- ``load_state_dict(d) -> self``  restore;
- ``result()``                    the statistic.

Because states merge, resuming (save states + a cursor) and distributing (shard tokens, merge
states) need no extra code paths. :func:`check_accumulator` states the laws; the test suite runs
it over every class registered with :func:`register` and asserts how many it found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Accumulator", "register", "REGISTRY", "check_accumulator", "Example"]


@runtime_checkable
class Accumulator(Protocol):
    def update(self, *batch: Any) -> Accumulator: ...
    def merge(self, other: Accumulator) -> Accumulator: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Accumulator: ...
    def result(self) -> Any: ...


#: ``make()`` returns a fresh empty accumulator; ``batches`` are argument tuples for update.
Example = tuple[Callable[[], Any], Sequence[tuple]]

#: name -> function(seed) returning an :data:`Example`, filled by :func:`register`.
REGISTRY: dict[str, Callable[[int], Example]] = {}


def register(example: Callable[[int], Example]):
    """Class decorator: register an accumulator with a function that builds test examples."""

    def deco(cls):
        REGISTRY[cls.__name__] = example
        return cls

    return deco


def _flatten(res: Any) -> list[torch.Tensor]:
    if isinstance(res, torch.Tensor):
        return [res]
    if isinstance(res, dict):
        return [t for k in sorted(res) for t in _flatten(res[k])]
    if isinstance(res, (list, tuple)):
        return [t for r in res for t in _flatten(r)]
    if hasattr(res, "__dataclass_fields__"):
        return [t for k in res.__dataclass_fields__ for t in _flatten(getattr(res, k))]
    return [torch.as_tensor(res)]


def _assert_close(a: Any, b: Any, what: str, rtol: float, atol: float) -> None:
    fa, fb = _flatten(a), _flatten(b)
    assert len(fa) == len(fb), f"{what}: results have different structure"
    for x, y in zip(fa, fb, strict=True):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        assert x.shape == y.shape, f"{what}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if x.dtype.is_floating_point or y.dtype.is_floating_point:
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol,
                                       equal_nan=True, msg=lambda m, w=what: f"{w}: {m}")
        else:
            assert torch.equal(x, y), f"{what}: integer results differ"


def check_accumulator(name: str, seed: int = 0, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    """The accumulator laws, checked on the registered example for ``name``.

    1. split-and-merge equals one pass; 2. merge is associative; 3. an empty accumulator is
    a neutral element on both sides; 4. the state round-trips through safetensors.
    """
    import tempfile
    from pathlib import Path

    from ..io import load_tensors, save_tensors

    make, batches = REGISTRY[name](seed)
    assert len(batches) >= 3, "examples need at least three batches"

    one = make()
    for b in batches:
        one.update(*b)
    ref = one.result()

    parts = [make().update(*b) for b in batches]
    left = make()
    for p in parts:
        left.merge(p)
    _assert_close(left.result(), ref, f"{name}: split+merge vs one pass", rtol, atol)

    # (a + b) + c == a + (b + c), with a, b, c themselves multi-batch states
    k = len(batches) // 3
    groups = [batches[:k], batches[k:2 * k], batches[2 * k:]]

    def build(bs):
        acc = make()
        for b in bs:
            acc.update(*b)
        return acc

    ab_c = build(groups[0]).merge(build(groups[1])).merge(build(groups[2]))
    a_bc = build(groups[0]).merge(build(groups[1]).merge(build(groups[2])))
    _assert_close(ab_c.result(), a_bc.result(), f"{name}: associativity", rtol, atol)

    e1 = make().merge(build(batches))
    e2 = build(batches).merge(make())
    _assert_close(e1.result(), ref, f"{name}: empty + x", rtol, atol)
    _assert_close(e2.result(), ref, f"{name}: x + empty", rtol, atol)

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "state.safetensors"
        save_tensors(path, one.state_dict())
        state, _ = load_tensors(path)
        back = make().load_state_dict(state)
    _assert_close(back.result(), ref, f"{name}: state round trip", 0.0, 0.0)
    # a restored state keeps accumulating like the original
    extra = batches[0]
    _assert_close(back.update(*extra).result(), one.update(*extra).result(),
                  f"{name}: update after restore", rtol, atol)
