"""The correlate stage: stream activations once per pass, accumulate co-moments, summarise.

``run_correlate`` is the whole stage: load the models and the token store, plan passes that
fit the memory budget, stream every model once per batch, fold each batch into the planned
:class:`~unineurons.accumulators.CoMoments` blocks (one GEMM per block) and the per-model
:class:`~unineurons.accumulators.LayerCov`, save resumable state every ``checkpoint_tokens``,
and finally turn co-moments into max / argmax / top-k / baseline / ceiling per neuron.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..accumulators.comoments import CoMoments, LayerCov, batch_matmul_dtype, shift_of, shifted, sum64
from ..checks import check_checkpoint_disk, check_matrix_disk, check_plan_memory, check_store_models
from ..errors import UnineuronsError
from ..io import load_checkpoint, load_tensors, save_checkpoint, save_tensors
from ..models.load import LoadedModel, load_model
from ..progress import progress, track
from ..rundir import RunDir
from ..stream import MaskConfig, activation_stream
from ..tokens import TokenStore
from .calibrate import block_null
from .config import CorrelateConfig
from .extras import unit_extras, write_extras
from .maxcorr import block_results
from .plan import ModelShape, Plan, Unit, full_matrix_bytes, plan_units, stream_bytes
from .rotation import rotation_for
from .summarize import finalize

__all__ = ["run_correlate", "CorrelateResult", "plan_for", "accumulate_tokens", "segments"]

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class CorrelateResult:
    run: RunDir
    neurons: object  #: pandas DataFrame (neurons.parquet)
    layers: object  #: pandas DataFrame (per model x layer summary)
    plan: Plan
    elapsed_s: float
    reused: bool = False


def _config_hash(cfg: CorrelateConfig, models: list[LoadedModel], store: TokenStore,
                 accumulate: int) -> str:
    """What the numbers depend on: not the device, the backend, the checkpoint interval or the
    budget (except through the fold size, which changes rounding and is hashed as used)."""
    d = cfg.model_dump(exclude={"device", "checkpoint_tokens", "memory_budget", "backend",
                                "ray_address", "workers", "cpus_per_worker"})
    if d.get("similarity", True):  # the default: hashes of runs made before the option stay
        d.pop("similarity", None)
    d["accumulate_tokens"] = accumulate
    d["weights"] = [m.weights_sha256 for m in models]
    d["token_sha256"] = store.manifest.get("sha256")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _stream(cfg: CorrelateConfig, shapes: list[ModelShape], ctx: int, accumulate: int) -> int:
    """:func:`~unineurons.correlate.plan.stream_bytes` of this run. Weights are float32 whatever
    ``--dtype`` says (``load_model``'s default; ``--dtype`` is the co-moment GEMMs' dtype); the
    baseline's rotations stay in host memory, which is the budget's memory on CPU only."""
    cbytes = batch_matmul_dtype(cfg.dtype).itemsize
    return stream_bytes(shapes, accumulate, cfg.batch_size, ctx, cbytes,
                        rotations=not cfg.device.startswith("cuda"))


def accumulate_tokens(cfg: CorrelateConfig, shapes: list[ModelShape], ctx: int) -> int:
    """``cfg.accumulate_tokens``, or when unset the largest power of two in [256, 8192] whose
    buffers take at most a quarter of the memory budget."""
    if cfg.accumulate_tokens is not None:
        return cfg.accumulate_tokens
    acc = 8192
    while acc > 256 and _stream(cfg, shapes, ctx, acc) > cfg.budget_bytes // 4:
        acc //= 2
    return acc


def plan_for(cfg: CorrelateConfig, shapes: list[ModelShape], ctx: int) -> Plan:
    """The pass plan of ``cfg`` for models of ``shapes`` and contexts of ``ctx`` tokens."""
    stream = _stream(cfg, shapes, ctx, accumulate_tokens(cfg, shapes, ctx))
    return plan_units(shapes, cfg.pairs, cfg.budget_bytes, stream, ceiling=cfg.ceiling,
                      null_rotations=cfg.null_rotations, halves=2 if cfg.split_half else 1,
                      similarity=cfg.similarity)


def segments(c0: int, c1: int, n_ctx: int, halves: int) -> list[tuple[int, int, int]]:
    """Contexts ``[c0, c1)`` of ``n_ctx`` cut at the split-half boundary ``n_ctx // 2``:
    ``(start, stop, half)`` pieces, each inside one half (half 0 only without a split)."""
    if halves == 1:
        return [(c0, c1, 0)] if c0 < c1 else []
    cuts = ((0, n_ctx // 2), (n_ctx // 2, n_ctx))
    return [(max(c0, s), min(c1, e), h) for h, (s, e) in enumerate(cuts) if max(c0, s) < min(c1, e)]


def _rotations(cfg: CorrelateConfig, models: list[LoadedModel]) -> list[list[torch.Tensor]]:
    """Per model, its baseline rotation of every layer (a QR of ``[d_mlp, d_mlp]`` each:
    seconds per layer at GPT-2 small's 3072)."""
    out: list[list[torch.Tensor]] = []
    with progress("baseline rotations", sum(m.adapter.n_layers for m in models),
                  unit="rotations") as bar:
        for m in models:
            ad = m.adapter
            out.append([])
            for layer in range(ad.n_layers):
                out[-1].append(rotation_for(cfg.seed, m.weights_sha256, layer, ad.d_mlp))
                bar.advance(1)
    return out


class _PassState:
    """The accumulators of one pass, plus the persistent per-model layer covariances.

    ``layercov`` None: accumulate fresh layer covariances in this pass (the first); a list:
    keep those, finished, and do not update them (an empty list: hold none, as a Ray shard of
    a later pass does).

    ``halves`` 2 (``--split-half``): every accumulator twice, one per half of the contexts:
    block ``key`` and ``key.h1``, layer covariances ``[half 0 of each model, half 1 ...]``.
    """

    def __init__(self, units: list[Unit], shapes: list[ModelShape], device: str,
                 cdtype: torch.dtype, layercov: list[LayerCov] | None, halves: int = 1):
        self.units = units
        self.device = device
        self.co = {u.key() + ("" if h == 0 else f".h{h}"): CoMoments(
            (u.l1 - u.l0) * shapes[u.a].d_mlp, shapes[u.b].n, device=device, compute_dtype=cdtype)
            for h in range(halves) for u in units if h == 0 or u.kind == "pair"}
        self.fresh_layercov = layercov is None
        self.layercov = layercov if layercov is not None else [
            LayerCov(s.n_layers, s.d_mlp, device, cdtype) for _ in range(halves) for s in shapes]
        self.plan_key = ""  #: the run's pass layout (``_plan_key``), saved with checkpoints
        # one float32 product workspace for every block's fold (CoMoments.update_shifted):
        # no fresh block-sized allocation per fold. The plan counts a fold's product as a
        # block-sized temporary (plan.work_bytes); the largest block's float32 product is at
        # most half of that, and release_work() frees it before the blocks are summarised
        self._work_numel = max(((u.l1 - u.l0) * shapes[u.a].d_mlp * shapes[u.b].n for u in units),
                               default=0) if cdtype == torch.float32 else 0
        self._work: torch.Tensor | None = None

    def work(self) -> torch.Tensor | None:
        """The fold's float32 product workspace (``None`` unless the compute dtype is float32)."""
        if self._work is None and self._work_numel:
            self._work = torch.empty(self._work_numel, dtype=torch.float32, device=self.device)
        return self._work

    def release_work(self) -> None:
        """Free the product workspace (streaming is over)."""
        self._work = None

    def models_needed(self, n_models: int) -> list[int]:
        """Indices of the models this pass must run: those in its units, all while the layer
        covariances are accumulated."""
        return sorted({u.a for u in self.units} | {u.b for u in self.units} |
                      (set(range(n_models)) if self.fresh_layercov else set()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, lc in enumerate(self.layercov):
            out.update({f"layercov.{i}.{k}": v for k, v in lc.state_dict().items()})
        for key, co in self.co.items():
            out.update({f"unit.{key}.{k}": v for k, v in co.state_dict().items()})
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for i, lc in enumerate(self.layercov):
            lc.load_state_dict({k: state[f"layercov.{i}.{k}"] for k in ("n", "mean", "c")})
        for key, co in self.co.items():
            co.load_state_dict({k: state[f"unit.{key}.{k}"] for k in ("n", "mean_x", "mean_y", "c")})

    def merge_from(self, get: Callable[[str], torch.Tensor]) -> None:
        """Merge in another state of the same pass given by ``get(name)`` for the names of
        :meth:`state_dict` (e.g. a Ray shard's file), one block at a time: at most one block
        of it is in memory at once. Fresh layer covariances merge too."""
        if self.fresh_layercov:
            for i, lc in enumerate(self.layercov):
                lc.merge(LayerCov(0, 0, self.device).load_state_dict(
                    {k: get(f"layercov.{i}.{k}") for k in ("n", "mean", "c")}))
        for key, co in self.co.items():
            co.merge(CoMoments(0, 0, self.device).load_state_dict(
                {k: get(f"unit.{key}.{k}") for k in ("n", "mean_x", "mean_y", "c")}))


def _plan_key(plan: Plan) -> str:
    """The pass layout a checkpoint belongs to: resuming into another layout (a changed
    --memory-budget or --batch-size) would load blocks that are not there."""
    return hashlib.sha256(json.dumps([[u.key() for u in p] for p in plan.passes]).encode()).hexdigest()


def _save_checkpoint(run: RunDir, st: _PassState, meta: dict) -> None:
    save_checkpoint(run.state_dir / CHECKPOINT, st.state_dict(), {**meta, "plan": st.plan_key})


def _unit_results(u: Unit, co: CoMoments, layercov: list[LayerCov], rots: list[list[torch.Tensor]],
                  shapes: list[ModelShape], cfg: CorrelateConfig, keys: list[str] | None = None,
                  half: bool = False) -> dict[str, torch.Tensor]:
    """Summaries of one finished block, keyed by name; ``keys`` (the models' weight hashes):
    also the calibrated null (``row_null``, ``col_null``); ``half``: one half of a split, top-1
    only."""
    da = shapes[u.a].d_mlp
    rows = slice(u.l0 * da, u.l1 * da)
    n = co.n
    m2_rows = layercov[u.a].m2()[rows]
    cov_b = layercov[u.b].c
    tiles = {"d_rows": da, "d_cols": shapes[u.b].d_mlp}
    if u.kind == "ceiling":
        # max correlation of each neuron with its own model's activations rotated per layer
        res = block_results(co.c, n, m2_rows, layercov[u.b].m2(), k=1, col_cov=cov_b,
                            col_rot=rots[u.b], **tiles, desc="ceiling correlations")
        return {"ceiling": res["row_base"]}
    rotate = cfg.baseline == "rotation"
    res = block_results(
        co.c, n, m2_rows, layercov[u.b].m2(), k=1 if half else cfg.top_k, **tiles,
        col_cov=cov_b if rotate else None, col_rot=rots[u.b] if rotate else None,
        row_cov=layercov[u.a].c[u.l0:u.l1] if rotate else None,
        row_rot=rots[u.a][u.l0:u.l1] if rotate else None,
        rows_dir=u.rows_dir, cols_dir=u.cols_dir, want_rho=cfg.save_full_matrix and not half,
    )
    if keys and cfg.null_rotations:
        def rot(m: int, first: int) -> Callable[[int, int], torch.Tensor]:
            return lambda layer, r: rotation_for(cfg.seed, keys[m], first + layer,
                                                 shapes[m].d_mlp, draw=r, device=co.c.device)
        res.update(block_null(co.c, n, m2_rows, layercov[u.b].m2(), n_rot=cfg.null_rotations, **tiles,
                              col_cov=cov_b if u.rows_dir else None,
                              col_rot=rot(u.b, 0) if u.rows_dir else None,
                              row_cov=layercov[u.a].c[u.l0:u.l1] if u.cols_dir else None,
                              row_rot=rot(u.a, u.l0) if u.cols_dir else None))
    if "col_topi" in res:  # row indices of this block -> flat indices of model a
        res["col_topi"] = torch.where(res["col_topi"] >= 0, res["col_topi"] + rows.start,
                                      res["col_topi"])
    return res


def run_correlate(cfg: CorrelateConfig, out: str | Path, *, resume: bool = False,
                  models: list[LoadedModel] | None = None) -> CorrelateResult:
    """Run the correlate stage into the run directory ``out``; see the module docstring."""
    t_start = time.time()
    # everything that can fail on bad input is checked before the run directory exists,
    # so a refused run leaves nothing behind
    prior = RunDir.create(out) if Path(out).exists() else None  # refuses anything else
    store = TokenStore.open(cfg.tokens)
    contexts = store.contexts(cfg.n_tokens)
    special = store.manifest["tokenizer"]
    if models is None:
        models = [load_model(spec, device=cfg.driver_device)
                  for spec in track(cfg.models, "loading models", unit="models")]
    check_store_models(models, special, store.ctx, store.path)  # the check every command shares
    shapes = [ModelShape(m.adapter.n_layers, m.adapter.d_mlp,
                         sum(p.numel() for p in m.model.parameters()), d_model=m.adapter.d_model,
                         n_heads=int(m.model.config.num_attention_heads),
                         vocab_size=m.adapter.vocab_size) for m in models]
    accumulate = accumulate_tokens(cfg, shapes, store.ctx)
    chash = _config_hash(cfg, models, store, accumulate)
    done = prior.manifest().get("correlate") if prior else None
    if prior and done and done.get("config_hash") == chash and prior.has_table("neurons"):
        return CorrelateResult(prior, prior.read_table("neurons"), prior.read_table("layers"),
                               plan=None, elapsed_s=0.0, reused=True)  # type: ignore[arg-type]
    plan = plan_for(cfg, shapes, store.ctx)
    if cfg.backend == "local":
        check_plan_memory(plan.peak_bytes, cfg.driver_device)  # not killed half-way, silently
    if cfg.save_full_matrix:  # refused now, not when the disk fills hours in
        check_matrix_disk(plan, shapes, out, prior.state_dir if prior else None)
    check_checkpoint_disk(plan, shapes, out, stream_tokens=contexts.shape[0] * store.ctx,
                          checkpoint_tokens=cfg.checkpoint_tokens,
                          halves=2 if cfg.split_half else 1,
                          state_dir=prior.state_dir if prior else None,
                          also=2 * full_matrix_bytes(plan, shapes) if cfg.save_full_matrix else 0)
    run = RunDir.create(out)
    ckpt_path = run.state_dir / CHECKPOINT
    if done and not resume:
        raise UnineuronsError(
            f"run directory {run.path} already holds correlate results of another configuration; "
            "choose a new --out"
        )
    if ckpt_path.is_file() and not resume:
        raise UnineuronsError(
            f"run directory {run.path} holds an unfinished correlate run; add --resume to continue "
            "it, or choose a new --out"
        )

    cdtype = batch_matmul_dtype(cfg.dtype)
    if cfg.dtype == "tf32" and cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    rots = _rotations(cfg, models)
    mask = MaskConfig(cfg.drop_bos, cfg.drop_eos, cfg.drop_pad, cfg.drop_newline)

    start_pass, cursor, kept = 0, 0, 0
    saved: dict[str, torch.Tensor] | None = None
    if resume and ckpt_path.is_file():
        saved, prog = load_checkpoint(
            ckpt_path, chash, "correlate checkpoint",
            f"run directory {run.path} holds a checkpoint of a different configuration (models, "
            "tokens or options changed); resume with the same command, or choose a new --out")
        if prog.get("plan", _plan_key(plan)) != _plan_key(plan):
            raise UnineuronsError(
                f"run directory {run.path} holds a checkpoint of another pass plan (--memory-budget, "
                "--batch-size or --accumulate-tokens changed); resume with the options it was "
                "started with, or choose a new --out")
        start_pass, cursor, kept = prog["pass"], prog["cursor"], prog["kept_tokens"]

    halves = 2 if cfg.split_half else 1
    keys = [m.weights_sha256 for m in models]
    layercov: list[LayerCov] | None = None
    full_lc: list[LayerCov] = []  # of all contexts: the halves merged when split
    if start_pass > 0:
        lc_state, _ = load_tensors(run.state_dir / "layercov.safetensors", "layer covariances")
        layercov = [LayerCov(s.n_layers, s.d_mlp, cfg.driver_device, cdtype).load_state_dict(
            {k: lc_state[f"{i}.{k}"] for k in ("n", "mean", "c")})
            for i, s in enumerate(shapes * halves)]
        full_lc = _merged_halves(layercov, len(shapes), cfg.driver_device)

    n_ctx = contexts.shape[0]
    if cfg.split_half and n_ctx < 2:
        raise UnineuronsError(f"--split-half needs at least 2 contexts, {cfg.tokens} gives {n_ctx}; "
                              "use more --n-tokens")
    for p in range(start_pass, len(plan.passes)):
        units = plan.passes[p]
        st = _PassState(units, shapes, cfg.driver_device, cdtype, layercov, halves)
        st.plan_key = _plan_key(plan)
        if saved and p == start_pass:
            st.load(saved)
        else:
            cursor, kept = 0, 0 if p == 0 else kept
        need = st.models_needed(len(models))
        if cfg.backend == "ray":
            # token shards on Ray workers; the merged state for all contexts lands in st
            from .distributed import ray_pass

            cursor, kept = ray_pass(run, cfg, st, models, shapes, contexts, accumulate,
                                    cursor=cursor, kept=kept, pass_index=p,
                                    n_passes=len(plan.passes), chash=chash)
        else:
            cursor, kept = _stream_pass(
                run, cfg, st, [models[i] for i in need], need, shapes, contexts, special, mask,
                store.ctx, cdtype, accumulate, cursor=cursor, kept=kept, pass_index=p,
                n_passes=len(plan.passes), chash=chash)
        st.release_work()
        if kept == 0:
            raise UnineuronsError(
                f"no token positions left after masking in {n_ctx} contexts of {cfg.tokens}; "
                "use more tokens or keep newline positions (--keep-newline)"
            )
        layercov = st.layercov
        if p == 0:
            save_tensors(run.state_dir / "layercov.safetensors",
                         {f"{i}.{k}": v for i, lc in enumerate(layercov)
                          for k, v in lc.state_dict().items()})
            full_lc = _merged_halves(layercov, len(shapes), cfg.driver_device)
        results = {}
        # the per-block summaries: max correlations, baselines, null, similarity, matching
        rows_of = {u.key(): (u.l1 - u.l0) * shapes[u.a].d_mlp for u in units}
        with progress(f"summarising pass {p + 1}/{len(plan.passes)}", sum(rows_of.values()),
                      unit="neurons") as bar:
            for u in units:
                if halves == 2 and u.kind == "pair":
                    # each half alone, then half 1 merged into half 0 in place: all contexts
                    h1 = st.co.pop(f"{u.key()}.h1")
                    for part, co in enumerate((st.co[u.key()], h1)):
                        lc = layercov[part * len(shapes):(part + 1) * len(shapes)]
                        for k, v in _unit_results(u, co, lc, rots, shapes, cfg, keys, half=True).items():
                            results[f"{u.key()}.h{part}.{k}"] = v
                        results[f"{u.key()}.h{part}.n"] = co.n
                    st.co[u.key()].merge(h1)
                    del h1
                for k, v in _unit_results(u, st.co[u.key()], full_lc, rots, shapes, cfg, keys).items():
                    results[f"{u.key()}.{k}"] = v
                if cfg.similarity:  # layer similarity and one-to-one matching (--no-similarity: off)
                    results.update(unit_extras(u, st.co[u.key()], full_lc, rots, shapes))
                bar.advance(rows_of[u.key()])
        save_tensors(run.state_dir / f"results.{p}.safetensors", results)
        # the pass is done: the next checkpoint starts the next pass from token 0
        save_checkpoint(ckpt_path, {}, {"config_hash": chash, "pass": p + 1, "cursor": 0,
                                        "kept_tokens": kept, "plan": st.plan_key})
        saved = None

    all_results: dict[str, torch.Tensor] = {}
    for p in range(len(plan.passes)):
        r, _ = load_tensors(run.state_dir / f"results.{p}.safetensors", "pass results")
        all_results.update(r)
    elapsed = time.time() - t_start
    neurons, layers = finalize(run, cfg, models, store, plan, shapes, all_results, full_lc,
                               kept_tokens=kept, n_contexts=n_ctx, config_hash=chash,
                               elapsed_s=elapsed)
    if not cfg.similarity and run.has_table("layer_similarity"):
        run.table_path("layer_similarity").unlink()  # of an earlier run with similarity on
    neurons, layers = write_extras(run, [m.name for m in models], shapes, plan, all_results,
                                   cfg.threshold, [m.spec.location for m in models])
    # results are in the run directory now; the resumable state is no longer needed
    for f in run.state_dir.glob("*.safetensors"):
        f.unlink()
    return CorrelateResult(run, neurons, layers, plan, elapsed)


def _merged_halves(layercov: list[LayerCov], n_models: int, device: str) -> list[LayerCov]:
    """The layer covariances of all contexts: the list itself, or with ``--split-half`` (twice
    as many entries, half 0 first) each model's two halves merged into a new one."""
    if len(layercov) == n_models:
        return layercov
    return [LayerCov(0, 0, device).load_state_dict(layercov[i].state_dict()).merge(
        layercov[n_models + i]) for i in range(n_models)]


def _stream_pass(run: RunDir, cfg: CorrelateConfig, st: _PassState, pass_models: list[LoadedModel],
                 need: list[int], shapes: list[ModelShape], contexts, special: dict, mask: MaskConfig,
                 ctx: int, cdtype: torch.dtype, accumulate: int, *, cursor: int, kept: int,
                 pass_index: int, n_passes: int, chash: str) -> tuple[int, int]:
    """Stream contexts ``[cursor:]`` through ``pass_models`` into ``st``, folding every
    ``accumulate`` kept tokens and checkpointing (only right after a fold, so a checkpoint
    never holds half a fold). Returns the final (cursor, kept tokens)."""
    n_ctx = contexts.shape[0]
    since = 0
    with progress(f"correlate pass {pass_index + 1}/{n_passes}", total=n_ctx * ctx) as bar:
        bar.advance(cursor * ctx)
        for c0, c1, half in segments(cursor, n_ctx, n_ctx, 2 if cfg.split_half else 1):
            stream = activation_stream(pass_models, contexts[:c1], special, batch_size=cfg.batch_size,
                                       start=c0, mask=mask, device=cfg.device)
            for end, n_folded, last in _folds(stream, c1, need, st, shapes, cdtype, accumulate, half):
                since += (end - cursor) * ctx
                bar.advance((end - cursor) * ctx)
                cursor = end
                if pass_index == 0:
                    kept += n_folded
                if since >= cfg.checkpoint_tokens and not (last and c1 == n_ctx):
                    _save_checkpoint(run, st, {"config_hash": chash, "pass": pass_index,
                                               "cursor": cursor, "kept_tokens": kept})
                    since = 0
    return cursor, kept


def _folds(stream: Iterator, n_ctx: int, need: list[int], st: _PassState,
           shapes: list[ModelShape], cdtype: torch.dtype, accumulate: int, half: int = 0
           ) -> Iterator[tuple[int, int, bool]]:
    """Fold the batches of ``stream`` (over contexts ``[.., n_ctx)``) into ``st`` (into its
    accumulators of split half ``half``) every ``accumulate`` kept tokens and at the end.
    After each fold yield (context cursor after it, kept tokens it folded, whether it was the
    last)."""
    pending: list = []  # forward batches not yet folded in
    n_pending = 0
    for batch in stream:
        pending.append(batch)
        n_pending += batch.n
        last = batch.start + batch.n_contexts >= n_ctx
        if n_pending < accumulate and not last:
            continue
        acts = [torch.cat([b.acts[j] for b in pending]) for j in range(len(need))]
        end, n_folded = pending[-1].start + pending[-1].n_contexts, n_pending
        # drop the batches before the shifted copies exist: the plan counts one float32 copy
        # of the buffered rows plus one in the compute dtype, not three
        pending, n_pending, batch = [], 0, None
        _fold(acts, need, st, shapes, cdtype, half)
        del acts
        yield end, n_folded, last


@torch.inference_mode()
def _fold(acts: list[torch.Tensor], need: list[int], st: _PassState, shapes: list[ModelShape],
          cdtype: torch.dtype, half: int = 0) -> None:
    """Shift each model's activations once, then one GEMM per planned block (of ``half``)."""
    if acts[0].shape[0] == 0:
        return
    shift, xs, sums = {}, {}, {}
    for j, i in enumerate(need):
        shift[i] = shift_of(acts[j])  # [L*d] float64
        xs[i] = shifted(acts[j], shift[i], cdtype)  # [n, L*d]
        sums[i] = sum64(xs[i])  # [L*d] once per model, sliced for every block below
    if st.fresh_layercov:
        for i in range(len(shapes)):
            st.layercov[half * len(shapes) + i].update_shifted(shift[i], xs[i], sums[i])
    for u in st.units:
        da = shapes[u.a].d_mlp
        rows = slice(u.l0 * da, u.l1 * da)
        key = u.key() + (f".h{half}" if half and u.kind == "pair" else "")  # ceiling: all contexts
        st.co[key].update_shifted(shift[u.a][rows], shift[u.b], xs[u.a][:, rows], xs[u.b], st.work(),
                                  (sums[u.a][rows], sums[u.b]))
