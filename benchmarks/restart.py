"""Interventions restarting at the patched layer (models/partial.py) against full forwards.

    python benchmarks/restart.py [--layers 30] [--contexts 2] [--ctx 64] [--patches 16]

A randomly initialised Llama of SmolLM-135M's shape (30 layers, d_model 576, d_mlp 1536, 9
heads, 3 key-value heads, vocabulary 49,152; no download) and random tokens. The entropy
confirmation's workload: ``--patches`` single-neuron patches of the last layer (the entropy
search's default is 10 candidates + 10 random neurons x 4 values = 80), and the same number
in the middle layer, evaluated by ``evaluate_patches`` (one clean forward per batch, one per
patch) with restarts and with full forwards (restart disabled), in the same run. The metrics
of both must agree (checked here too).

Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch

from unineurons.analyses import interventions
from unineurons.analyses.interventions import evaluate_patches, make_patch
from unineurons.models.adapters import get_adapter
from unineurons.models.load import LoadedModel, parse_model_spec
from unineurons.progress import set_quiet


def smollm_like(layers: int) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    return LoadedModel(spec=parse_model_spec("."), model=m, adapter=get_adapter(m), tokenizer=None,
                       weights_sha256="random")


def timed(m, contexts, special, patches, restart: bool) -> tuple[float, list[dict]]:
    saved = interventions.restart_at
    if not restart:
        interventions.restart_at = lambda *a: nullcontext()
    try:
        t0 = time.perf_counter()
        _, res = evaluate_patches(m, contexts, special, patches, batch_size=contexts.shape[0])
        return time.perf_counter() - t0, res
    finally:
        interventions.restart_at = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--contexts", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--patches", type=int, default=16)
    args = ap.parse_args()
    set_quiet(True)
    m = smollm_like(args.layers)
    ad = m.adapter
    rng = np.random.default_rng(0)
    contexts = rng.integers(1, ad.vocab_size, size=(args.contexts, args.ctx))
    contexts[:, 0] = 0
    special = {"bos_id": 0, "eos_id": 0, "pad_id": None}
    tok = args.contexts * args.ctx
    print(f"llama {ad.n_layers} layers x {ad.d_mlp}, d_model {ad.d_model}, vocab {ad.vocab_size}; "
          f"{tok} tokens; {args.patches} patches per layer; threads {torch.get_num_threads()}")
    print(f"{'patched layer':<16}{'full forwards':>16}{'restart':>12}{'speed-up':>10}{'max |Δ metric|':>16}")
    for layer in (ad.n_layers - 1, ad.n_layers // 2):
        neurons = rng.choice(ad.d_mlp, size=args.patches, replace=False)
        patches = [make_patch([(layer, int(i))], [3.0]) for i in neurons]
        t_full, r_full = timed(m, contexts, special, patches, restart=False)
        t_part, r_part = timed(m, contexts, special, patches, restart=True)
        diff = max(abs(a[k] - b[k]) for a, b in zip(r_full, r_part, strict=True) for k in a)
        print(f"L{layer:<15}{t_full:>14.1f} s{t_part:>10.1f} s{t_full / t_part:>9.1f}x{diff:>16.1e}")


if __name__ == "__main__":
    main()
