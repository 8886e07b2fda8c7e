"""Callable subpackages: ``unineurons.correlate(...)`` and ``unineurons.report(...)``.

``correlate`` and ``report`` are both public API functions and subpackages of ``unineurons``.
Python's import system sets ``unineurons.correlate`` to the subpackage whenever any of its
modules is imported, so a plain function of that name at the package root would be replaced.
Instead the subpackage module itself is made callable: calling it runs the API function of
the same name (:func:`unineurons.api.correlate`, :func:`unineurons.api.report`), whatever was
imported before. Its attributes stay those of the subpackage.
"""

from __future__ import annotations

import inspect
import sys
import types
from importlib import import_module
from typing import Any

__all__ = ["make_callable"]


class _StageModule(types.ModuleType):
    """A subpackage whose call runs ``unineurons.api.<last part of its name>``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api_function()(*args, **kwargs)

    def _api_function(self) -> Any:
        return getattr(import_module("unineurons.api"), self.__name__.rpartition(".")[2])

    @property
    def __signature__(self) -> inspect.Signature:  # inspect.signature(unineurons.correlate)
        return inspect.signature(self._api_function())


def make_callable(module_name: str) -> None:
    """Make the already-imported module ``module_name`` callable (see the module docstring)."""
    sys.modules[module_name].__class__ = _StageModule
