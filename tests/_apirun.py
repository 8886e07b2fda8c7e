"""A run directory made through the public API, shared by test_api.py and test_show.py.

Three tiny GPT-2 "seeds": seed 0 and two copies with the MLP neurons of every layer permuted
(the same function, so every neuron's best match and its index are known) and neurons 0-15
re-drawn (so those are not universal). The run is made by ``unineurons.correlate``,
``analyze``, ``ablate`` and ``intervene`` once per test session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

D_MLP = 64
N_LAYERS = 2
BROKEN = range(0, 16)
#: analyze / correlate options the API and CLI runs share
CORRELATE = {"n_tokens": 1024, "batch_size": 8}
ANALYZE = {"top_k": 4, "batch_size": 16}
ABLATE = {"sizes": [1, 4, "all"], "random_draws": 2, "n_tokens": 256, "batch_size": 16}

_CACHE: dict[str, object] = {}


def permuted_models(root: Path, tokenizer: Path) -> tuple[list[str], list[list[torch.Tensor]]]:
    """Seed 0 and its two permuted copies; ``perms[s - 1][layer][j]`` is the seed-0 neuron that
    neuron ``j`` of seed ``s`` copies."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=2, n_inner=D_MLP, vocab_size=512,
                     n_positions=64, bos_token_id=0, eos_token_id=1)
    base = root / "seed0"
    GPT2LMHeadModel(cfg).save_pretrained(base, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(base)
    paths, perms = [str(base)], []
    g = torch.Generator().manual_seed(1)
    for s in (1, 2):
        out = root / f"seed{s}"
        shutil.copytree(base, out)
        sd = load_file(out / "model.safetensors")
        layer_perms = []
        for layer in range(N_LAYERS):
            perm = torch.randperm(D_MLP, generator=g)
            p = f"transformer.h.{layer}.mlp."
            sd[p + "c_fc.weight"] = sd[p + "c_fc.weight"][:, perm].contiguous()  # [d_model, d_mlp]
            sd[p + "c_fc.bias"] = sd[p + "c_fc.bias"][perm].contiguous()
            sd[p + "c_proj.weight"] = sd[p + "c_proj.weight"][perm].contiguous()  # [d_mlp, d_model]
            new = torch.argsort(perm)[list(BROKEN)]  # where the broken neurons went
            sd[p + "c_fc.weight"][:, new] = 0.2 * torch.randn(32, len(new), generator=g)
            layer_perms.append(perm)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        paths.append(str(out))
        perms.append(layer_perms)
    return paths, perms


def api_run(root: Path, tokenizer: Path, store: Path) -> tuple[Path, list[str], list]:
    """The shared run (made once): ``(run path, model specs, permutations)``."""
    if "run" in _CACHE:
        return _CACHE["run"]  # type: ignore[return-value]
    import unineurons as un

    models, perms = permuted_models(root, tokenizer)
    run = un.correlate(models=models, tokens=store, out=root / "run", **CORRELATE)
    un.analyze(run, **ANALYZE)
    un.ablate(run, **ABLATE)
    top = run.universal().iloc[0]
    un.intervene(run, f"L{top.layer}.N{top.neuron}", values=[0.0, 2.0], random_baseline=1,
                 n_tokens=128)
    _CACHE["run"] = (run.path, models, perms)
    return _CACHE["run"]  # type: ignore[return-value]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run directory (same models) that a test may change."""
    shutil.copytree(src, dst)
    return dst
