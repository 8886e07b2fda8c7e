"""The run directory: the results store every stage reads and writes.

Layout (see docs/tables.md for every table's columns)::

    RUN/
      .unineurons.json        marker: kind "run" and the package version that made it
      manifest.json           config, package versions, models (spec, revision, weight hash),
                              token store (path, sha256, tokens used), elapsed times
      neurons.parquet         one row per model x layer x neuron; stages add columns
      matches.parquet         one row per neuron x partner
      pairs/A__B.safetensors  per-pair arrays (max, argmax, top-k, baseline)
      state/                  resumable accumulator states + cursor
      figures/, report/

Tables join on ``(model, layer, neuron)``; ``model`` is the model spec exactly as given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .errors import UnineuronsError
from .io import MARKER, prepare_out_dir, read_json, write_json, write_parquet

__all__ = ["RunDir", "NEURON_KEYS", "pair_file_name", "FORMAT_VERSION", "read_parquet"]

#: Bumped when the layout or a table's meaning changes; older runs are refused, not misread.
FORMAT_VERSION = 1

NEURON_KEYS = ["model", "layer", "neuron"]


def pair_file_name(a: str, b: str) -> str:
    """A file-system-safe name for the pair of model specs (a, b)."""

    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._@-]+", "_", s.strip("/")).strip("_")[-80:]

    return f"{clean(a)}__{clean(b)}.safetensors"


class RunDir:
    """A run directory on disk. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- lifecycle -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        """Make (or reuse) ``path`` as a run directory; refuses folders holding anything else."""
        rd = cls(prepare_out_dir(path, "run"))
        rd._check_version()
        return rd

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run directory, refusing ones made by another format version."""
        p = Path(path)
        if not (p / MARKER).is_file():
            raise UnineuronsError(
                f"{p} is not a unineurons run directory (no {MARKER}); make one with "
                "`unineurons correlate ... --out RUN` or `unineurons analyze --model M --out RUN`"
            )
        rd = cls(p)
        rd._check_version()
        from . import lock

        if lock.hold_on_open:  # a CLI command writes what it opens: one command at a time
            lock.acquire(p, "run directory")
        return rd

    def _check_version(self) -> None:
        m = self.path / "manifest.json"
        if m.is_file():
            v = read_json(m, "run manifest").get("format_version")
            if v != FORMAT_VERSION:
                raise UnineuronsError(
                    f"run directory {self.path} has format version {v}, this unineurons "
                    f"({__version__}) reads version {FORMAT_VERSION}; re-run it into a new --out"
                )

    # ---- paths ---------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    @property
    def pairs_dir(self) -> Path:
        return self.path / "pairs"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    # ---- manifest ------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        p = self.path / "manifest.json"
        return read_json(p, "run manifest") if p.is_file() else {}

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        """Set top-level manifest sections (e.g. ``correlate={...}``), keeping the rest."""
        m = self.manifest()
        m.setdefault("format_version", FORMAT_VERSION)
        m.setdefault("unineurons_version", __version__)
        m.update(sections)
        write_json(self.path / "manifest.json", m)
        return m

    # ---- tables --------------------------------------------------------------------------
    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def read_table(self, name: str) -> pd.DataFrame:
        p = self.table_path(name)
        if not p.is_file():
            raise UnineuronsError(f"run {self.path} has no {name}.parquet yet")
        return read_parquet(p, f"run {self.path}: table")

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        p = self.table_path(name)
        write_parquet(df, p)
        return p

    def update_neurons(self, columns: pd.DataFrame) -> pd.DataFrame:
        """Merge per-neuron columns into neurons.parquet on (model, layer, neuron).

        Columns already present are replaced by the new values; rows missing from the table
        are added (a single-model analysis has no correlation rows).
        """
        missing = [k for k in NEURON_KEYS if k not in columns.columns]
        if missing:
            raise ValueError(f"update_neurons needs key columns {missing}")
        if self.has_table("neurons"):
            old = self.read_table("neurons")
            new_cols = [c for c in columns.columns if c not in NEURON_KEYS]
            old = old.drop(columns=[c for c in new_cols if c in old.columns])
            df = old.merge(columns, on=NEURON_KEYS, how="outer")
        else:
            df = columns.copy()
        if "address" not in df.columns or df["address"].isna().any():
            df["address"] = "L" + df["layer"].astype(int).astype(str) + ".N" + \
                df["neuron"].astype(int).astype(str)
        front = NEURON_KEYS + ["address"]
        df = df[front + [c for c in df.columns if c not in front]]
        df = df.sort_values(NEURON_KEYS, kind="stable").reset_index(drop=True)
        self.write_table("neurons", df)
        return df


def read_parquet(path: Path, what: str = "table") -> pd.DataFrame:
    """``pd.read_parquet(path)``; a damaged file is a clear error naming it, not a traceback."""
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for damage
        raise UnineuronsError(
            f"{what} {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is corrupt or truncated: delete it and re-run the stage that writes it"
        ) from None
