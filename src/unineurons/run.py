"""A run directory as Python objects: its tables as pandas DataFrames, its neurons as cards.

``Run(path)`` (or ``unineurons.open_run(path)``) reads nothing until asked: each table is read
on first use and re-read when its file changes (a stage run later in the same notebook shows
up). A table the run does not have is a :class:`~unineurons.errors.UnineuronsError` naming the
command that writes it. Tables and columns: ``docs/tables.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from .errors import UnineuronsError
from .rundir import RunDir

if TYPE_CHECKING:
    from .models.load import LoadedModel
    from .neuron import Neuron

__all__ = ["Run", "Zoo", "TABLES", "UNIVERSAL_COLUMNS"]

#: Every table a run directory can hold, and the command that writes it.
TABLES: dict[str, str] = {
    "neurons": "unineurons correlate (or unineurons analyze --model M --out RUN)",
    "matches": "unineurons correlate",
    "layers": "unineurons correlate",
    "layer_similarity": "unineurons correlate",
    "partner_kinds": "unineurons correlate (on a seed grid: zoo train --init-seeds --data-seeds)",
    "top_contexts": "unineurons analyze RUN",
    "families": "unineurons analyze RUN",
    "properties": "unineurons analyze RUN (on a correlate run)",
    "vocab": "unineurons analyze RUN",
    "entropy": "unineurons analyze RUN",
    "attention": "unineurons analyze RUN",
    "ablations": "unineurons ablate RUN",
    "interventions": "unineurons intervene RUN --neuron L{layer}.N{index}",
    "emergence": "unineurons dynamics ... --out RUN",
    "persistence": "unineurons dynamics ... --out RUN",
    "first_universal": "unineurons dynamics ... --out RUN",
    "trajectories": "unineurons dynamics ... --out RUN",
    "dynamics_ablations": "unineurons dynamics ... --ablate --out RUN",
}

#: The ``neurons.parquet`` column of each universality criterion.
UNIVERSAL_COLUMNS = {"paper": "is_universal", "calibrated": "is_universal_calibrated"}

Criterion = Literal["paper", "calibrated"]


def same_spec(a: str, b: str) -> bool:
    """Whether two model specs name the same model (a folder may be spelled differently)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


class Run:
    """A run directory: tables as DataFrames (read lazily), universal neurons, neuron cards.

    Args:
        path: the run directory (made by ``unineurons correlate``, ``analyze --out``,
            ``dynamics``, or the pipeline's ``out/run``).
        result: the engine's result object of the stage that returned this run (the API
            functions set it: e.g. :class:`~unineurons.correlate.engine.CorrelateResult`);
            None for a run opened from disk.

    Raises:
        UnineuronsError: ``path`` is not a unineurons run directory, or one of another format
            version.

    Table attributes (``run.neurons``, ``run.matches``, ``run.layers``, ``run.top_contexts``,
    ``run.families``, ``run.properties``, ``run.vocab``, ``run.entropy``, ``run.attention``,
    ``run.ablations``, ``run.interventions``, and the dynamics tables ``run.emergence``,
    ``run.persistence``, ``run.first_universal``, ``run.trajectories``,
    ``run.dynamics_ablations``) are pandas DataFrames, one row per the table's documented key.
    Any other ``NAME.parquet`` of the run reads as ``run.NAME`` too.
    """

    def __init__(self, path: str | os.PathLike | Run, *, result: Any = None):
        self._rd = RunDir.open(path.path if isinstance(path, Run) else path)
        self.path = self._rd.path
        self.result = result
        self._cache: dict[str, tuple[tuple[int, int], pd.DataFrame]] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    # ---- tables --------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (config, package versions, models, token store, per-stage sections)."""
        return self._rd.manifest()

    @property
    def tables(self) -> list[str]:
        """Names of the tables this run holds (``NAME.parquet`` files), sorted."""
        return sorted(p.stem for p in self.path.glob("*.parquet") if not p.name.startswith("."))

    def has(self, name: str) -> bool:
        """Whether the run holds ``name.parquet``."""
        return self._rd.has_table(name)

    def table(self, name: str) -> pd.DataFrame:
        """The table ``name.parquet`` as a DataFrame (cached until the file changes).

        Raises:
            UnineuronsError: the run has no such table; the message names the command that
                writes it.
        """
        p = self._rd.table_path(name)
        try:
            st = p.stat()
        except FileNotFoundError:
            maker = TABLES.get(name)
            how = (f"make it with `{maker}` (Python: unineurons.{maker.split()[1]}(...))" if maker
                   else f"the run's tables are: {', '.join(self.tables) or 'none'}")
            raise UnineuronsError(f"run {self.path} has no {name}.parquet; {how}") from None
        key = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, self._rd.read_table(name))
            self._cache[name] = hit
        return hit[1]

    def __getattr__(self, name: str) -> pd.DataFrame:
        # tables other stages may add (NAME.parquet) read as run.NAME; anything else is absent
        if name.startswith("_") or "_rd" not in self.__dict__ or not self.has(name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.table(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.tables))

    # ---- models --------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        """Model specs of the run in manifest order (the correlate reference first)."""
        specs = [e["spec"] for e in self.manifest.get("models") or []]
        if not specs and self.has("neurons"):
            specs = list(pd.unique(self.neurons["model"]))
        return specs

    @property
    def reference(self) -> str:
        """The first model with correlation values (whose neurons were tested for universality),
        else the first model.

        Raises:
            UnineuronsError: the run lists no model.
        """
        models = self.models
        if not models:
            raise UnineuronsError(f"run {self.path} lists no models; run `unineurons correlate` "
                                  "or `unineurons analyze --model M --out RUN` into it")
        if self.has("neurons") and "max_corr" in self.neurons.columns:
            n = self.neurons
            have = set(n.loc[n["max_corr"].notna(), "model"])
            for m in models:
                if m in have:
                    return m
        return models[0]

    def model(self, model: str | int | None = None) -> str:
        """The run's spec for ``model``: None = :attr:`reference`, an int = the index in
        :attr:`models`, a str = that spec (a folder may be spelled differently).

        Raises:
            UnineuronsError: no such model in the run (the message lists them).
        """
        if model is None:
            return self.reference
        models = self.models
        if isinstance(model, int) and not isinstance(model, bool):
            if not 0 <= model < len(models):
                raise UnineuronsError(f"model index {model} is out of range: run {self.path} has "
                                      f"{len(models)} models (0..{len(models) - 1})")
            return models[model]
        hit = next((m for m in models if same_spec(str(model), m)), None)
        if hit is None:
            raise UnineuronsError(f"model {model} is not part of run {self.path}; its models "
                                  f"are: {', '.join(models)}")
        return hit

    def loaded_model(self, model: str | int | None = None, device: str = "cpu") -> LoadedModel:
        """The run's model loaded in float32 (kept for later calls), refusing changed weights.

        Raises:
            UnineuronsError: the model does not load, or its weights' sha256 differs from the
                one the run recorded.
        """
        from .analyses.interventions import load_run_model

        spec = self.model(model)
        key = (spec, device)
        if key not in self._loaded:
            entry = next((e for e in self.manifest.get("models") or [] if e["spec"] == spec),
                         {"spec": spec})
            self._loaded[key] = load_run_model(entry, device)
        return self._loaded[key]

    # ---- universality --------------------------------------------------------------------
    def universal(self, criterion: Criterion = "paper", model: str | int | None = None
                  ) -> pd.DataFrame:
        """The universal neurons: rows of ``neurons.parquet``, most universal first.

        Args:
            criterion: ``"paper"``: excess correlation ϱ above the correlate threshold
                (``is_universal``; Gurnee et al. 2024 sec. 3, ϱ > 0.5). ``"calibrated"``:
                judged against the run's own null (``is_universal_calibrated``).
            model: restrict to one model (spec or index); default every model with the column
                (the reference, or every model with ``--pairs all``).

        Returns:
            One row per universal neuron, every column of ``neurons.parquet``, sorted by model
            (run order) then ``excess_corr`` descending.

        Raises:
            UnineuronsError: unknown criterion, or the run lacks the criterion's column.
        """
        if criterion not in UNIVERSAL_COLUMNS:
            raise UnineuronsError(f"criterion {criterion!r} is not one of: "
                                  f"{', '.join(UNIVERSAL_COLUMNS)}")
        col = UNIVERSAL_COLUMNS[criterion]
        n = self.neurons
        if col not in n.columns:
            if criterion == "paper":
                raise UnineuronsError(f"run {self.path} has no universality (column {col}): run "
                                      "`unineurons correlate` with two or more seeds into it")
            raise UnineuronsError(f"run {self.path} has no calibrated universality (column "
                                  f"{col}): it was made by a correlate stage without the "
                                  "calibrated criterion; re-run `unineurons correlate` into a "
                                  "new --out, or use criterion='paper'")
        n = n[n[col].notna()]
        if model is not None:
            n = n[n["model"] == self.model(model)]
        out = n[n[col].astype(bool)]
        order = {m: i for i, m in enumerate(self.models)}
        sort = out.assign(_m=out["model"].map(order).fillna(len(order)))
        keys = ["_m", "excess_corr"] if "excess_corr" in out.columns else ["_m"]
        sort = sort.sort_values(keys, ascending=[True, False][: len(keys)], kind="stable")
        return sort.drop(columns="_m").reset_index(drop=True)

    # ---- neurons -------------------------------------------------------------------------
    def neuron(self, address: str, model: str | int | None = None) -> Neuron:
        """The card of one neuron: statistics, matches in every seed, top contexts, vocabulary.

        Args:
            address: ``L{layer}.N{index}``, e.g. ``"L3.N12"``.
            model: the model (spec or index in :attr:`models`); default :attr:`reference`.

        Raises:
            UnineuronsError: bad address, unknown model, or a neuron the model does not have.
        """
        from .neuron import Neuron

        return Neuron(self, address, self.model(model))

    def to_transformer_lens_names(self, neurons: pd.DataFrame | list[str] | None = None,
                                  model: str | int | None = None) -> pd.DataFrame:
        """TransformerLens hook names and Hugging Face module paths of neurons.

        A neuron's activation here is the input of the MLP's output projection; in
        TransformerLens that is ``blocks.{layer}.mlp.hook_post`` (index ``neuron`` in its last
        dimension), for gated MLPs too. In Hugging Face transformers it is the input of the
        module ``hf_module`` (e.g. ``transformer.h.3.mlp.c_proj``): a forward pre-hook there
        sees ``args[0][..., neuron]``.

        Args:
            neurons: a DataFrame with ``model``, ``layer``, ``neuron`` columns (e.g.
                :meth:`universal`), or a list of addresses of ``model``; default the
                universal neurons (paper criterion).
            model: the model of a list of addresses (default :attr:`reference`).

        Returns:
            The rows with columns ``model``, ``address``, ``layer``, ``neuron``, ``tl_hook``,
            ``tl_index``, ``hf_module``, ``model_type`` added in front (other columns kept).

        Raises:
            UnineuronsError: a bad address, or a model whose architecture the run does not
                record and whose config does not load.
        """
        from .interop import name_table

        if neurons is None:
            neurons = self.universal("paper")
        elif not isinstance(neurons, pd.DataFrame):
            from .models.adapters import parse_neuron

            spec = self.model(model)
            pairs = [parse_neuron(a) for a in neurons]
            neurons = pd.DataFrame({"model": spec, "layer": [p[0] for p in pairs],
                                    "neuron": [p[1] for p in pairs]})
        return name_table(neurons, self.manifest)

    def export(self, path: str | os.PathLike | None = None, format: Literal["csv", "json"] = "csv",
               criterion: Criterion = "paper", model: str | int | None = None,
               all_neurons: bool = False) -> str:
        """The universal neurons (or every neuron) with their TransformerLens and Hugging Face
        names (:meth:`to_transformer_lens_names`) and universality columns, as CSV or JSON.

        Args:
            path: file to write (atomically); None: only return the text.
            format: ``"csv"`` (one row per neuron) or ``"json"`` (``{"run", "criterion",
                "n", "neurons": [objects]}``, NaN as null).
            criterion: universality criterion of :meth:`universal`.
            model: one model only (default every model with the criterion's column).
            all_neurons: every neuron of ``neurons.parquet``, not only the universal ones.

        Returns:
            The text written.

        Raises:
            UnineuronsError: bad format or criterion, a run without the criterion's column.
        """
        from .interop import export_neurons

        if format not in ("csv", "json"):
            raise UnineuronsError(f"format {format!r} is not one of: csv, json")
        if all_neurons:
            rows = self.neurons if model is None else \
                self.neurons[self.neurons["model"] == self.model(model)]
        else:
            rows = self.universal(criterion, model)
        meta = {"run": str(self.path), "criterion": "all" if all_neurons else criterion}
        return export_neurons(self.to_transformer_lens_names(rows), format, path, meta)

    def step(self, step: int) -> Run:
        """The run directory of one checkpoint step of a ``dynamics`` run (``steps/step{t}``).

        Raises:
            UnineuronsError: this run has no such step.
        """
        runs = (self.manifest.get("dynamics") or {}).get("runs") or {}
        if str(step) not in runs:
            have = ", ".join(sorted(runs, key=int)) or "none (not a dynamics run)"
            raise UnineuronsError(f"run {self.path} has no step {step}; its steps: {have}")
        return Run(self.path / runs[str(step)]["path"])

    # ---- display -------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}: {len(self.models)} models, tables {', '.join(self.tables)})"

    def _repr_html_(self) -> str:
        from .cards import run_html

        return run_html(self)


@dataclass(frozen=True)
class Zoo:
    """A seed zoo folder (``train_zoo``): K GPT-2 models differing only in their seed.

    Raises:
        UnineuronsError: on construction, when ``path`` is not a zoo.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        self.info()  # refuses a folder that is not a zoo

    def info(self) -> dict[str, Any]:
        """Preset, model shape, steps, and per seed its checkpoints and last losses (nats)."""
        from .zoo import zoo_info

        return zoo_info(self.path)

    @property
    def seeds(self) -> list[int]:
        """The zoo's seeds, sorted."""
        return sorted(int(s) for s in self.info()["per_seed"])

    def checkpoints(self) -> dict[int, dict[int, Path]]:
        """``{seed: {step: checkpoint folder}}`` of every checkpoint written."""
        from .zoo import zoo_checkpoints

        return zoo_checkpoints(self.path)

    def models(self, step: int | None = None, seeds: Sequence[int] | None = None) -> list[str]:
        """Checkpoint folders of ``seeds`` (default all, sorted; the first is the reference)
        at ``step`` (default the last step all of them have): the ``models`` of ``correlate``.

        Raises:
            UnineuronsError: a seed the zoo lacks, or a step some seed has no checkpoint of.
        """
        from .pipeline import zoo_models

        return zoo_models(self.path, list(self.seeds if seeds is None else seeds), step)

    def __fspath__(self) -> str:
        return str(self.path)


def _table_property(name: str) -> property:
    def get(self: Run) -> pd.DataFrame:
        return self.table(name)

    return property(get, doc=f"``{name}.parquet`` as a DataFrame (written by ``{TABLES[name]}``; "
                             "docs/tables.md). Raises UnineuronsError when the run has none.")


for _name in TABLES:
    setattr(Run, _name, _table_property(_name))
