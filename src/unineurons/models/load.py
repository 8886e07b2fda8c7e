"""Load Hugging Face causal LMs by spec: a local folder or ``HUB_ID[@REVISION]``.

Weights load from safetensors, or from ``pytorch_model.bin`` through PyTorch's restricted
unpickler (``torch.load(weights_only=True)``; never a full unpickle), see
:mod:`unineurons.models.checkpoint`; ``safetensors_only`` refuses ``.bin`` files. Every missing or
unexpected tensor is an error. Training checkpoints on the hub are revisions, e.g.
``stanford-crfm/alias-gpt2-small-x21@checkpoint-80000``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UnineuronsError
from .adapters import Adapter, get_adapter
from .checkpoint import file_sha256, find_weight_files, load_checkpoint, safetensors_only_default

__all__ = ["ModelSpec", "LoadedModel", "parse_model_spec", "load_model", "load_tokenizer",
           "check_compatible", "vocab_fingerprint"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. ``spec`` is the string exactly as the user gave it."""

    spec: str
    location: str  #: local folder path or hub id
    revision: str | None
    local: bool


def parse_model_spec(spec: str) -> ModelSpec:
    """``/path/to/folder`` (an existing folder) or ``org/name[@revision]``."""
    s = str(spec).strip()
    if not s:
        raise UnineuronsError("empty model spec; give a folder or HUB_ID[@REVISION]")
    if Path(s).is_dir():
        # absolute: runs record the location and are reopened from other folders
        return ModelSpec(spec=str(spec), location=str(Path(s).expanduser().absolute()),
                         revision=None, local=True)
    location, _, revision = s.partition("@")
    if s.startswith((".", "/", "~")) or not location:
        raise UnineuronsError(f"model folder {s} does not exist")
    return ModelSpec(spec=str(spec), location=location, revision=revision or None, local=False)


@dataclass
class LoadedModel:
    """A model ready for the activation stream."""

    spec: ModelSpec
    model: torch.nn.Module
    adapter: Adapter
    tokenizer: Any | None
    weights_sha256: str
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.spec


def _weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names and bytes, independent of file sharding."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hub_error(ms: ModelSpec, e: Exception) -> UnineuronsError:
    rev = f" at revision {ms.revision}" if ms.revision else ""
    return UnineuronsError(
        f"model {ms.spec}: cannot load {ms.location}{rev} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); offline and not cached, or no such "
        "model/revision: check the id, connect, or pass a local folder"
    )


def load_tokenizer(spec: str | ModelSpec) -> Any:
    """AutoTokenizer for a model spec or a tokenizer folder / hub id."""
    from transformers import AutoTokenizer

    ms = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    try:
        return AutoTokenizer.from_pretrained(ms.location, revision=ms.revision)
    except Exception as e:
        if ms.local:
            raise UnineuronsError(
                f"tokenizer {ms.spec}: cannot load a tokenizer from this folder ({e}); "
                "train one with `unineurons tokenizer train`"
            ) from None
        raise _hub_error(ms, e) from None


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               with_tokenizer: bool = True, safetensors_only: bool | None = None) -> LoadedModel:
    """Load a causal LM in eval mode, with its architecture adapter and weight hash.

    ``safetensors_only``: refuse ``.bin`` weights (default: ``UNINEURONS_SAFETENSORS_ONLY``).
    ``info`` (recorded in run manifests) holds the architecture's sizes, ``weights_format``
    (``safetensors`` or ``pytorch_bin``) and ``weight_files`` (file name -> sha256).

    Raises:
        UnineuronsError: no config or weights; a refused or unreadable weight file; missing or
            unexpected tensors; an unsupported architecture (see :mod:`.checkpoint`).
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are the ones that matter
    ms = parse_model_spec(spec)
    try:
        config = AutoConfig.from_pretrained(ms.location, revision=ms.revision)
    except Exception as e:
        if ms.local:
            raise UnineuronsError(f"model {ms.spec}: no readable config.json in the folder ({e})") from None
        raise _hub_error(ms, e) from None
    from .adapters import ARCHITECTURES

    if config.model_type not in ARCHITECTURES:
        raise UnineuronsError(
            f"model {ms.spec}: architecture {config.model_type!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    strict = safetensors_only_default() if safetensors_only is None else safetensors_only
    try:
        weights = find_weight_files(ms.location, ms.revision, ms.local, strict)
    except UnineuronsError as e:
        raise UnineuronsError(f"model {ms.spec}: {e}") from None
    except Exception as e:
        raise _hub_error(ms, e) from None
    model = load_checkpoint(config, weights, dtype, ms.spec)
    model.eval().to(device)
    tok = None
    if with_tokenizer:
        try:
            tok = load_tokenizer(ms)
        except UnineuronsError:
            tok = None  # weights without a tokenizer are usable; compatibility checks use vocab size
    adapter = get_adapter(model, ms.spec)
    return LoadedModel(
        spec=ms, model=model, adapter=adapter, tokenizer=tok, weights_sha256=_weights_hash(model),
        info={"model_type": config.model_type, "n_layers": adapter.n_layers,
              "d_mlp": adapter.d_mlp, "d_model": adapter.d_model, "vocab_size": adapter.vocab_size,
              "weights_format": weights.format,
              "weight_files": {p.name: file_sha256(p) for p in weights.files}},
    )


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 of the sorted (token, id) vocabulary: equal fingerprints tokenize identically."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(repr(items).encode()).hexdigest()


def check_compatible(models: list[LoadedModel], store_tokenizer_fp: str | None = None,
                     store_vocab_size: int | None = None) -> None:
    """Refuse models that would read the same token ids differently."""
    fps = {m.name: vocab_fingerprint(m.tokenizer) for m in models if m.tokenizer is not None}
    if len(set(fps.values())) > 1:
        names = ", ".join(fps)
        raise UnineuronsError(
            f"models {names} have different tokenizers; universality compares neurons on the same "
            "tokens, so every model must share one tokenizer"
        )
    if store_tokenizer_fp is not None:
        for name, fp in fps.items():
            if fp != store_tokenizer_fp:
                raise UnineuronsError(
                    f"model {name}: its tokenizer differs from the token store's; rebuild the "
                    "token store with this model's tokenizer"
                )
    if store_vocab_size is not None:
        for m in models:
            if m.adapter.vocab_size < store_vocab_size:
                raise UnineuronsError(
                    f"model {m.name}: vocabulary of {m.adapter.vocab_size} is smaller than the token "
                    f"store's tokenizer ({store_vocab_size}); use a matching tokenizer"
                )
