"""unineurons: find and study universal neurons across seeds of language models.

The package root is the public API: the functions the command line calls, one per command,
and the objects that read their results (Gurnee et al. 2024; Nandan et al. 2025)::

    import unineurons as un

    un.train_tokenizer("stdlib", 512, "tok")
    un.build_tokens("stdlib", "tok", "train", ctx=64, n_tokens=16_384)
    zoo = un.train_zoo("train", "zoo", preset="micro", seeds=[0, 1, 2], steps=30)
    run = un.correlate(models=zoo.models(), tokens="train", out="run")
    run.universal()                     # the universal neurons (DataFrame)
    un.analyze(run)
    run.neuron("L1.N12")                # a Neuron: statistics, matches, contexts, vocabulary

Everything is imported on first use, so ``import unineurons`` stays fast (no torch).
``unineurons.correlate`` and ``unineurons.report`` are also the names of subpackages: calling
them runs the stage (see :mod:`unineurons.api`).
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

#: The public API: every name here is documented in :mod:`unineurons.api` / :mod:`unineurons.run`.
__all__ = [
    "correlate", "analyze", "ablate", "intervene", "dynamics", "report", "train_zoo",
    "build_tokens", "train_tokenizer", "plan", "open_run", "Run", "Neuron", "Zoo",
    "UnineuronsError", "__version__",
]

_HOMES = {
    "analyze": "api", "ablate": "api", "intervene": "api", "dynamics": "api",
    "train_zoo": "api", "build_tokens": "api", "train_tokenizer": "api", "plan": "api",
    "open_run": "api", "Zoo": "run", "Run": "run", "Neuron": "neuron", "UnineuronsError": "errors",
    # subpackages whose modules are callable: calling one runs its stage (unineurons.api)
    "correlate": None, "report": None,
}


def __getattr__(name: str) -> object:
    """Import a public name on first use (PEP 562): the heavy modules load only when needed."""
    if name not in _HOMES:
        raise AttributeError(f"module 'unineurons' has no attribute {name!r}")
    home = _HOMES[name]
    if home is None:
        return _import_module(f"{__name__}.{name}")  # a callable subpackage (see _stage.py)
    value = getattr(_import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({k for k in globals() if not k.startswith("_")} | set(__all__))
