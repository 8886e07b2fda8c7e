"""Checkpoint files: find a model's weight files, read them safely, load them strictly.

Two weight formats are read, and nothing else:

- **safetensors** (``model.safetensors`` or sharded ``model-*.safetensors`` with an index):
  a flat table of tensors, no code.
- **PyTorch pickles** (``pytorch_model.bin`` or its shards), which checkpoints saved before
  safetensors ship only (the Stanford CRFM GPT-2 branches date from 2021). They are read
  with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler admits tensors and
  plain containers only. A file whose unpickling would build any other object (the way a
  crafted pickle runs code) is refused with :class:`~unineurons.errors.UnineuronsError`
  before anything is built. A full unpickle never happens.

``safetensors_only`` (the CLI's ``--safetensors-only``, or ``UNINEURONS_SAFETENSORS_ONLY=1``)
refuses ``.bin`` weights altogether.

Loading is strict: the state dict goes through transformers' own key handling (renamed
legacy keys such as NeoX's ``embed_out``, the base-model prefix, its ignore lists for
non-learned buffers), and every key still missing or unexpected afterwards — tied weights
aside, which transformers ties itself — is an error naming the keys. Without this, a head
stored under a name transformers does not expect would load as random weights, silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UnineuronsError

__all__ = ["WeightFiles", "find_weight_files", "read_state_dict", "load_checkpoint",
           "file_sha256", "safetensors_only_default", "strict_weights", "SAFETENSORS_ONLY_ENV"]

#: Environment variable: ``1`` makes every load refuse ``.bin`` weights (as ``--safetensors-only``).
SAFETENSORS_ONLY_ENV = "UNINEURONS_SAFETENSORS_ONLY"

#: Candidate files in the order they are preferred: (file name, format, is an index).
_CANDIDATES = (
    ("model.safetensors", "safetensors", False),
    ("model.safetensors.index.json", "safetensors", True),
    ("pytorch_model.bin", "pytorch_bin", False),
    ("pytorch_model.bin.index.json", "pytorch_bin", True),
)

#: Unexpected keys that are constants, not weights, in checkpoints of older transformers
#: versions and that transformers 5's own ignore lists do not cover (GPT-2 saved its
#: attention's -1e4 mask fill value as a persistent buffer until 2021).
_LEGACY_CONSTANTS = re.compile(r"(^|\.)attn\.masked_bias$")


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of one model revision.

    ``format`` is ``"safetensors"`` or ``"pytorch_bin"``; ``files`` the local paths (hub files
    are in the Hugging Face cache), in shard order.
    """

    format: str
    files: tuple[Path, ...]


def safetensors_only_default() -> bool:
    """Whether ``UNINEURONS_SAFETENSORS_ONLY`` asks for safetensors-only loading."""
    return os.environ.get(SAFETENSORS_ONLY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def strict_weights(enabled: bool) -> Iterator[None]:
    """Within the block, loads without an explicit ``safetensors_only`` refuse ``.bin``
    weights when ``enabled`` (sets :data:`SAFETENSORS_ONLY_ENV`, so local Ray workers
    inherit it). ``enabled=False`` leaves the environment as it is."""
    if not enabled:
        yield
        return
    old = os.environ.get(SAFETENSORS_ONLY_ENV)
    os.environ[SAFETENSORS_ONLY_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SAFETENSORS_ONLY_ENV, None)
        else:
            os.environ[SAFETENSORS_ONLY_ENV] = old


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex), cached per (real path, size, mtime) in this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _fetch(location: str, revision: str | None, local: bool, name: str) -> Path | None:
    """A file of the model: from the folder, or the hub (its cache when offline); None when
    the model has no such file (or, offline, when it is not cached)."""
    if local:
        p = Path(location) / name
        return p if p.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(location, name, revision=revision))
    except EntryNotFoundError:  # absent on the hub, or offline and not in the cache
        return None


def find_weight_files(location: str, revision: str | None, local: bool,
                      safetensors_only: bool) -> WeightFiles:
    """The weight files of a model folder or hub revision: safetensors when present, else
    (unless ``safetensors_only``) PyTorch ``.bin`` files.

    Raises:
        UnineuronsError: no weight file of an admitted format; a shard index that is not
            JSON or names a file that is missing.
        Exception: hub errors (no such repo or revision, no connection) pass through for the
            caller's message.
    """
    for name, fmt, is_index in _CANDIDATES:
        if safetensors_only and fmt != "safetensors":
            continue
        p = _fetch(location, revision, local, name)
        if p is None:
            continue
        if not is_index:
            return WeightFiles(fmt, (p,))
        try:
            weight_map = json.loads(p.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UnineuronsError(f"{name} of {location} is not a shard index ({e}); the "
                                  "checkpoint is damaged: download it again") from None
        files = []
        for s in shards:
            if Path(s).name != s:
                raise UnineuronsError(f"{name} of {location} names the shard {s!r} outside the "
                                      "model folder; refused")
            f = _fetch(location, revision, local, s)
            if f is None:
                raise UnineuronsError(f"{location}: shard {s} listed in {name} is missing (offline "
                                      "and not cached, or an incomplete download)")
            files.append(f)
        return WeightFiles(fmt, tuple(files))
    allowed = ("model.safetensors" if safetensors_only
               else "model.safetensors or pytorch_model.bin")
    hint = (" (--safetensors-only refuses pytorch_model.bin; drop it to load .bin weights "
            "through PyTorch's restricted unpickler)" if safetensors_only else "")
    where = "in the folder" if local else "(offline and not cached, or the revision has none)"
    raise UnineuronsError(f"{location}: no {allowed} (or sharded index) found {where}{hint}")


def read_state_dict(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Tensors of one weight file, on the CPU.

    ``pytorch_bin`` files go through ``torch.load(weights_only=True)`` only.

    Raises:
        UnineuronsError: the pickle holds anything but tensors and plain containers (refused,
            nothing of it executed); the file is unreadable; it is not a flat name -> tensor map.
    """
    name = Path(path).name
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UnineuronsError(f"{name}: not a readable safetensors file ({e})") from None
    else:
        import zipfile

        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True,
                            mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()
            why = next((ln.strip() for ln in first if "Unsupported global" in ln
                        or "GLOBAL" in ln), first[0] if first else "")
            raise UnineuronsError(
                f"{name}: refused; unpickling it would build objects other than tensors and plain "
                f"containers ({why[:200]}), which is how a pickle runs code. Only "
                "torch.load(weights_only=True) is used; get safetensors weights from a source you "
                "trust"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise UnineuronsError(f"{name}: not a readable PyTorch checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                  ) from None
    if not isinstance(sd, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UnineuronsError(f"{name}: not a flat map of tensor names to tensors (a training "
                              "checkpoint, not model weights?); give the model's weights file")
    return dict(sd)


def _keys(keys: Any, limit: int = 8) -> str:
    ks = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
    more = f" and {len(ks) - limit} more" if len(ks) > limit else ""
    return ", ".join(ks[:limit]) + more


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own load report is replaced by our errors: silence it meanwhile."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_checkpoint(config: Any, weights: WeightFiles, dtype: torch.dtype, spec: str
                    ) -> torch.nn.Module:
    """The causal LM of ``config`` with exactly the tensors of ``weights``.

    Keys go through transformers' renaming and prefix handling (``from_pretrained`` with a
    ``state_dict``); tied weights are tied by transformers. Every key then still missing,
    unexpected (bar the constants of :data:`_LEGACY_CONSTANTS`) or of another shape is an
    error.

    Raises:
        UnineuronsError: unreadable or refused files (see :func:`read_state_dict`), a tensor in
            two shards, missing / unexpected / mis-shaped keys (named in the message).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    sd: dict[str, torch.Tensor] = {}
    for f in weights.files:
        part = read_state_dict(f, weights.format)
        dup = set(part) & set(sd)
        if dup:
            raise UnineuronsError(f"model {spec}: tensor {_keys(dup)} appears in two shards; the "
                                  "checkpoint is damaged")
        sd.update(part)
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnineuronsError(f"model {spec}: {config.model_type} has no causal-LM class in "
                              "transformers") from None
    with _quiet_transformers():
        model, info = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    del sd
    missing = set(info.get("missing_keys") or ())
    unexpected = {k for k in info.get("unexpected_keys") or () if not _LEGACY_CONSTANTS.search(k)}
    mismatched = info.get("mismatched_keys") or ()
    problems = []
    if missing:
        problems.append(f"missing {_keys(missing)} (they would be random weights)")
    if unexpected:
        problems.append(f"unexpected {_keys(unexpected)} (not used by {cls.__name__})")
    if mismatched:
        problems.append(f"of another shape than the config says: {_keys(mismatched)}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"])[:300])
    if problems:
        files = ", ".join(p.name for p in weights.files)
        raise UnineuronsError(
            f"model {spec}: the weights in {files} do not match the {config.model_type} "
            f"architecture: tensors {'; '.join(problems)}; the checkpoint is incomplete or "
            "stored under other names: convert it to the transformers layout"
        )
    return model
