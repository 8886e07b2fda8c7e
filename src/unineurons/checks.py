"""The one check that a token store and models belong together, used by every command that
streams a store through models (correlate, analyze, ablate, intervene, dynamics, zoo train).

A store built with another tokenizer gives token ids that mean other words to the model: every
number computed from it is meaningless, yet nothing crashes. A store whose contexts are longer
than the model's positions indexes past its position embeddings. Weights holding NaN or inf
make every activation NaN. All three are refused here, before any output is written, with one
line that names the store, the model and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UnineuronsError

__all__ = ["check_store_models", "model_positions", "check_finite_weights", "offline_if_unreachable",
           "resolve_path", "check_matrix_disk", "check_checkpoint_disk", "DISK_MARGIN"]


def model_positions(model: torch.nn.Module) -> int | None:
    """Positions the model can embed (GPT-2 ``n_positions``, GPT-NeoX / Llama
    ``max_position_embeddings``); None when its config does not say."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_finite_weights(name: str, model: torch.nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf (a broken checkpoint)."""
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UnineuronsError(
                f"model {name}: weight {key} holds NaN or inf values; the checkpoint is broken: "
                "use another checkpoint or retrain it"
            )


def _tokenizer_of(m: Any) -> Any | None:
    """The model's tokenizer: loaded with it, or from its local folder; None when the folder
    has no tokenizer files (transformers may then make up a default tokenizer for the
    architecture, which says nothing about this model) or a hub model was loaded without one
    (not looked up: no network)."""
    spec = m.spec
    if spec.local:
        folder = Path(spec.location)
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                    "vocab.json", "tokenizer.model")):
            return None
    if getattr(m, "tokenizer", None) is not None:
        return m.tokenizer
    if not spec.local:
        return None
    from .models.load import load_tokenizer

    try:
        return load_tokenizer(spec)
    except UnineuronsError:
        return None


def note(message: str) -> None:
    """A line on stderr that a check chose a fallback (not an error)."""
    print(f"note: {message}", file=sys.stderr)


def check_store_models(models: Sequence[Any], special: dict, ctx: int,
                       store: str | Path | None = None, batch_size: int | None = None) -> list[str]:
    """Refuse ``models`` (:class:`~unineurons.models.load.LoadedModel`) that cannot read the
    token store described by ``special`` (its manifest's ``tokenizer`` section) and ``ctx``.

    Checks, in order: the models share one tokenizer; each model's tokenizer (loaded with it,
    or from its folder) is the store's (same vocabulary fingerprint); the store's vocabulary
    fits each model's embedding; ``ctx`` fits each model's positions; weights are finite. A
    model folder without tokenizer files falls back to the store's tokenizer (vocabulary size
    checked) and a note says so. With ``batch_size``: one forward pass of ``[batch_size, ctx]``
    tokens with its vocabulary logits (:func:`forward_bytes`) must fit the memory available
    now, or the command is refused before it starts (the kernel would kill it half-way).
    Returns the notes.

    Raises:
        UnineuronsError: naming the store, the model and the fix.
    """
    from .models.load import vocab_fingerprint

    where = f"token store {store}" if store is not None else "the token store"
    notes: list[str] = []
    fps: dict[str, str] = {}
    for m in models:
        tok = _tokenizer_of(m)
        if tok is None:
            if m.spec.local:
                notes.append(f"model {m.name} has no tokenizer files; using {where}'s tokenizer "
                             f"(vocabulary {special.get('vocab_size')}) for it")
            continue
        fps[m.name] = vocab_fingerprint(tok)
    if len(set(fps.values())) > 1:
        raise UnineuronsError(
            f"models {', '.join(fps)} have different tokenizers; universality compares neurons "
            "on the same tokens, so every model must share one tokenizer"
        )
    want = special.get("vocab_sha256")
    for name, fp in fps.items():
        if want is not None and fp != want:
            raise UnineuronsError(
                f"{where} was built with another tokenizer than model {name}'s ({special.get('path')}"
                f", vocabulary {special.get('vocab_size')}); its token ids mean other words to the "
                "model: build a store with the model's tokenizer (`unineurons tokens build "
                "--tokenizer MODEL_FOLDER`) or pass one with --tokens"
            )
    for m in models:
        vocab = m.adapter.vocab_size
        if special.get("vocab_size") is not None and vocab < int(special["vocab_size"]):
            raise UnineuronsError(
                f"model {m.name}: vocabulary of {vocab} is smaller than {where}'s tokenizer "
                f"({special['vocab_size']}); build a store with the model's tokenizer or pass one "
                "with --tokens"
            )
        positions = model_positions(m.model)
        if positions is not None and ctx > positions:
            raise UnineuronsError(
                f"{where} has contexts of {ctx} tokens but model {m.name} has only {positions} "
                f"positions; build a store with --ctx {positions} (or less) for it"
            )
        check_finite_weights(m.name, m.model)
        if batch_size is not None and _device_of(m.model) == "cpu":
            check_memory(forward_bytes(m, batch_size, ctx),
                         f"model {m.name}: a forward pass of --batch-size {batch_size} x {ctx} tokens",
                         "lower --batch-size")
    for n in notes:
        note(n)
    return notes


def offline_if_unreachable(host: str = "huggingface.co", timeout: float = 1.0) -> bool:
    """Switch the Hugging Face libraries to offline mode when the hub cannot be reached, so a
    hub lookup (a model or tokenizer that is not a local folder) fails at once from the cache
    instead of after half a minute of network retries. Respects ``HF_HUB_OFFLINE`` when set
    (either way). Returns whether offline mode is on."""
    import os
    import socket

    flag = os.environ.get("HF_HUB_OFFLINE")
    if flag is not None:
        return flag.strip().lower() not in ("", "0", "false", "no")
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        from urllib.parse import urlparse

        host = urlparse(endpoint).hostname or host
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:  # read at call time by huggingface_hub (and transformers through it)
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    return True


def resolve_path(recorded: str | Path, anchor: Path | None = None) -> Path | None:
    """Where a path recorded in a manifest is now: itself when absolute (or found from the
    working directory), else relative to ``anchor`` (the folder holding the manifest) or one
    of its parents, which is where a relative path was usually made from. None: not found."""
    p = Path(recorded).expanduser()
    if p.exists() or p.is_absolute():
        return p.absolute() if p.exists() else None
    for base in ([anchor, *anchor.absolute().parents] if anchor is not None else []):
        if (base / p).exists():
            return (base / p).absolute()
    return None


def run_model_source(entry: dict) -> str:
    """What to load for a run's model entry (``spec``, ``location``): the folder it was made
    from (recorded absolute), the spec when that is a folder from here, or the hub id.

    A folder given for it (``--model-path SPEC=FOLDER``, :func:`unineurons.relocate.relocated`)
    wins; the caller checks the weights' sha256 either way.

    Raises :class:`UnineuronsError` when the model was a local folder that is gone: it is
    never looked up on the hub instead."""
    from .relocate import moved_model

    spec, loc = str(entry["spec"]), entry.get("location")
    moved = moved_model(spec, loc)
    if moved is not None:
        return moved
    if loc and Path(loc).is_absolute():
        if Path(loc).is_dir():
            return loc
        raise UnineuronsError(
            f"model {spec}: the run was made from the folder {loc}, which no longer exists (moved "
            f"or deleted); put it back there, or pass --model-path {spec}=FOLDER (its weights' "
            "sha256 is checked)"
        )
    if Path(spec).expanduser().is_dir():
        return spec
    if spec.startswith((".", "/", "~")) or (loc and Path(loc) != Path(spec.partition("@")[0])):
        raise UnineuronsError(
            f"model {spec}: the run recorded a local folder that does not exist from "
            f"{Path.cwd()}; run the command from the folder the run was made in, or pass "
            f"--model-path {spec}=FOLDER"
        )
    return spec


def _device_of(model: Any) -> str:
    p = next(iter(model.parameters()), None)
    return "cpu" if p is None else p.device.type


#: float32 ``[batch, ctx, vocab]`` tensors alive at once in a scored forward pass: the logits,
#: their log-softmax and the softmax (loss, entropy, KL of the patched runs)
LOGIT_COPIES = 3


def forward_bytes(m: Any, batch_size: int, ctx: int) -> int:
    """Working memory of one forward pass of a loaded model over ``[batch_size, ctx]`` tokens
    with its full vocabulary logits, beyond its weights: the planner's per-block workspace
    (:func:`~unineurons.correlate.plan.forward_workspace`), every layer's captured neuron
    activations and ``LOGIT_COPIES`` float32 logit tensors. Bytes; an estimate for refusing
    sizes that cannot fit, not a plan."""
    from .correlate.plan import ModelShape, forward_workspace

    ad = m.adapter
    heads = int(getattr(m.model.config, "num_attention_heads", 0) or 0)
    shape = ModelShape(ad.n_layers, ad.d_mlp, d_model=ad.d_model, n_heads=heads,
                       vocab_size=ad.vocab_size)
    bt = batch_size * ctx
    return (forward_workspace(shape, batch_size, ctx) + 4 * bt * ad.n_layers * ad.d_mlp
            + LOGIT_COPIES * 4 * bt * ad.vocab_size)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (Linux ``MemAvailable``, else the
    free physical pages); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need_bytes: int, what: str, fix: str) -> None:
    """Refuse to start work whose estimated peak ``need_bytes`` exceeds the available memory
    (the kernel would kill the process half-way, with no message)."""
    have = available_memory()
    if have is not None and need_bytes > have:
        raise UnineuronsError(f"{what} needs about {need_bytes / 1e9:,.1f} GB of memory, "
                              f"{have / 1e9:,.1f} GB are available; {fix}")


def check_plan_memory(peak_bytes: int, device: str) -> None:
    """Refuse a memory plan whose estimated peak exceeds what the device has free now: host
    memory for ``cpu``, the GPU's free memory for ``cuda[:i]``."""
    fix = "lower --memory-budget (more passes) or --batch-size"
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if peak_bytes > free:
                raise UnineuronsError(f"the plan needs about {peak_bytes / 1e9:,.1f} GB on {device}, "
                                      f"{free / 1e9:,.1f} GB are free there; {fix}")
        return
    check_memory(peak_bytes, "the plan", fix)


#: Free disk kept beyond an estimate of what a run writes: a share of it, and bytes for the
#: tables, the manifest and file headers that the estimate leaves out.
DISK_MARGIN = (0.05, 64 * 2**20)


def _written(state_dir: Path | None, pattern: str) -> int:
    """Bytes of a resumed run's state files matching ``pattern`` (0 for a new run)."""
    if state_dir is None or not state_dir.is_dir():
        return 0
    return sum(f.stat().st_size for f in state_dir.glob(pattern))


def check_matrix_disk(plan: Any, shapes: Sequence[Any], out: str | Path,
                      state_dir: Path | None = None) -> None:
    """``--save-full-matrix``: refuse a correlate run whose full correlation matrices
    (:func:`~unineurons.correlate.plan.full_matrix_bytes`) do not fit, with
    :data:`DISK_MARGIN`, in the free space of the disk of ``out`` (of its nearest existing
    folder). Each matrix is on disk twice until the run ends: in its pass's results under
    ``state/`` and in its pair file under ``pairs/``. ``state_dir``: the run's state folder when
    ``out`` exists (a resumed run's finished passes are written already).

    Raises:
        UnineuronsError: not enough free disk (how much is needed, how much is free, the fix).
    """
    from .correlate.plan import fmt_bytes, full_matrix_bytes
    from .io import check_free_disk

    size = full_matrix_bytes(plan, list(shapes))
    have = _written(state_dir, "results.*.safetensors")
    if size == 0:
        return
    n = len({(u.a, u.b) for p in plan.passes for u in p if u.kind == "pair"})
    share, extra = DISK_MARGIN
    check_free_disk(out, max(0, int((2 * size - have) * (1 + share)) + extra),
                    f"--save-full-matrix: the full correlation matrices of {n} model pair(s) "
                    f"(float16, {fmt_bytes(size)}; on disk twice until the run ends, in state/ "
                    f"and pairs/) with a {share:.0%} margin",
                    fix="free space there, choose an --out on a larger disk, or drop "
                        "--save-full-matrix")


def check_checkpoint_disk(plan: Any, shapes: Sequence[Any], out: str | Path, *,
                          stream_tokens: int, checkpoint_tokens: int, halves: int = 1,
                          state_dir: Path | None = None, also: int = 0) -> None:
    """Refuse a correlate run whose resumable checkpoints cannot fit on the disk of ``out``
    (of its nearest existing folder), before anything is streamed: a run of GPT-2-small
    size would otherwise stream for hours and fail on its first save.

    A pass that streams more than ``checkpoint_tokens`` of its ``stream_tokens`` saves its
    whole state every ``checkpoint_tokens``: its co-moment blocks (``plan.pass_bytes``, float64,
    both split halves) and every model's within-layer covariances (float64 ``[L, d, d]`` per
    half). A save writes a new file before it replaces the last one, so the disk holds two
    states at once, plus the layer covariances' own file after the first pass; with
    :data:`DISK_MARGIN`. ``state_dir``: the run's state folder when resuming (the files there
    count as written already). ``also``: bytes the run writes besides (``--save-full-matrix``'s
    matrices, twice), so that both fit together.

    Raises:
        UnineuronsError: not enough free disk (need, free, the fix).
    """
    from .correlate.plan import fmt_bytes
    from .io import check_free_disk

    if stream_tokens <= checkpoint_tokens or not plan.pass_bytes:
        return
    layercov = halves * sum(s.n_layers * s.d_mlp * s.d_mlp * 8 for s in shapes)
    state = max(plan.pass_bytes) + layercov
    have = _written(state_dir, "*.safetensors")
    share, extra = DISK_MARGIN
    need = max(0, int((2 * state + layercov + also - have) * (1 + share)) + extra)
    check_free_disk(out, need,
                    f"correlate's checkpoints (every {checkpoint_tokens:,} of {stream_tokens:,} "
                    f"tokens a pass saves its accumulators, {fmt_bytes(state)}, twice on disk "
                    f"while a save replaces the last"
                    + (", and the full matrices" if also else "") + f") with a {share:.0%} margin",
                    fix="free space there, choose an --out on a larger disk, or raise "
                        f"--checkpoint-tokens to at least {stream_tokens:,} (no resume point "
                        "within a pass then)")
