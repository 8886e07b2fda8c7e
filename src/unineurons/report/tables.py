"""The run's tables as the report reads them: each read once, on first use.

Kept free of matplotlib so the browser data and the pipeline's config import it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from ..rundir import RunDir

__all__ = ["Tables", "Skip", "short_names", "DYNAMICS_TABLES"]

#: Tables of `unineurons dynamics`; with a separate dynamics run directory they come from there.
DYNAMICS_TABLES = ("emergence", "persistence", "first_universal", "trajectories",
                   "dynamics_ablations")


class Skip(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a figure function: the figure cannot be drawn from this run (the message
    says why and what to run)."""


class Tables:
    """The run's tables, read once each on first use, and what the figures share.

    ``reference`` is the first model (manifest order) with correlation values: the model whose
    neurons were tested for universality. ``models`` lists every spec the run knows.
    """

    def __init__(self, run: RunDir, dynamics: RunDir | None = None):
        self.run = run
        self.dynamics = dynamics
        self.manifest = run.manifest()
        #: the manifest holding the ``dynamics`` section (the dynamics run's, when separate)
        self.dynamics_manifest = dynamics.manifest() if dynamics is not None else self.manifest
        self._cache: dict[str, pd.DataFrame | None] = {}

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def get(self, name: str) -> pd.DataFrame | None:
        if name not in self._cache:
            src = self.run
            if self.dynamics is not None and name in DYNAMICS_TABLES:
                src = self.dynamics
            self._cache[name] = src.read_table(name) if src.has_table(name) else None
        return self._cache[name]

    def __getitem__(self, name: str) -> pd.DataFrame:
        df = self.get(name)
        if df is None:
            raise Skip(f"the run has no {name}.parquet")
        return df

    @property
    def models(self) -> list[str]:
        specs = [e["spec"] for e in self.manifest.get("models") or []]
        for name in ("neurons", "top_contexts", "matches"):
            df = self.get(name)
            if df is not None and "model" in df.columns:
                specs += [m for m in pd.unique(df["model"]) if m not in specs]
        return specs

    @property
    def corr_models(self) -> list[str]:
        """Models with correlation values (the references), in manifest order."""
        n = self.get("neurons")
        if n is None or "max_corr" not in n.columns:
            return []
        have = set(n.loc[n["max_corr"].notna(), "model"])
        return [m for m in self.models if m in have]

    @property
    def reference(self) -> str:
        refs = self.corr_models
        if refs:
            return refs[0]
        n = self.get("neurons")
        if n is not None and len(n):
            return str(n["model"].iloc[0])
        if self.models:
            return self.models[0]
        raise Skip("the run lists no models")

    @property
    def threshold(self) -> float:
        cfg = (self.manifest.get("correlate") or {}).get("config") or {}
        return float(cfg.get("threshold", 0.5))

    def neurons_of(self, model: str, columns: Sequence[str]) -> pd.DataFrame:
        """The model's rows of neurons.parquet; Skip when a column is missing or all-NaN."""
        n = self["neurons"]
        missing = [c for c in columns if c not in n.columns]
        if missing:
            raise Skip(f"neurons.parquet has no {', '.join(missing)} column(s)")
        sub = n[n["model"] == model]
        empty = [c for c in columns if sub[c].isna().all()]
        if sub.empty or empty:
            raise Skip(f"neurons.parquet has no values of {', '.join(empty or columns)} for "
                       f"model {model}")
        return sub

    def short(self, spec: str) -> str:
        return short_names(self.models).get(spec, spec)


def short_names(specs: Sequence[str]) -> dict[str, str]:
    """Readable, distinct labels for model specs: the last path parts (as few as keep them
    apart); hub ids keep ``name@revision``."""
    parts = {s: [p for p in re.split(r"[\\/]+", s) if p] or [s] for s in specs}
    for k in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {s: "/".join(p[-k:]) for s, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {s: s for s in specs}


