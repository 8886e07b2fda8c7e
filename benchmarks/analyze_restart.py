"""`analyze` end to end: interventions restarting at the patched layer against full forwards.

    python benchmarks/analyze_restart.py [--n-tokens 512] [--ctx 64] [--layers 30]
                                         [--device cpu|cuda] [--batch-size 8]
                                         [--tokenizer-vocab 49152] [--threads N] [--quick]

Setup (not timed): a byte-level BPE tokenizer of 49,152 tokens (``--tokenizer-vocab``) trained
on the interpreter's standard library (``unineurons.tokenizer.train_tokenizer("stdlib",
...)``), a randomly
initialised Llama of SmolLM-135M's shape (30 layers, d_model 576, d_mlp 1536, 9 heads, 3
key-value heads, vocabulary 49,152, tied embeddings; no download) saved with it as a model
folder, and a token store of ``--n-tokens`` stdlib tokens in contexts of ``--ctx``. Ten
neurons of the last layer get an output weight inside the unembedding's effective null space
(the entropy neurons' signature, analyses/entropy.py): a random model has none, and without
candidates the entropy search skips its confirmation, the phase this measures. With them,
the defaults give 10 candidates + 10 random neurons x 4 values = 80 patches of the last layer.

Then ``unineurons.api.analyze`` (the ``unineurons analyze --model M --tokens S --out R``
path: no correlate run is needed, the model is analysed on its own) runs twice in this
process on the same inputs with its default options and ``--device``: as shipped
("after": patched forwards restart at the patched layer, models/partial.py) and with the
restart disabled ("before": every patched forward runs the whole model; the monkeypatch of
benchmarks/restart.py). The restart run goes first, so any warm-up lands on it. Times are
wall seconds and this process's CPU seconds (``time.process_time``, all threads), for the
whole call and per phase: the token pass (``analyze_pass.accumulate``), the entropy
confirmation (``evaluate_patches`` called by the entropy search) and the rest (loading,
weight, vocabulary, role and attention analyses, tables). Every table the two runs write must
agree (strings and integers exactly, floats to 1e-6 relative); the script exits non-zero
otherwise.

The rest does not depend on the tokens but grows with the tokenizer's vocabulary: the
vocabulary moments and lists cover every neuron (46,080) against every real token, both
sides. On the shared 2-core CPU (load ~8) the weight statistics alone took 8 minutes of one
analyze at 49,152 tokens; there,
``--tokenizer-vocab 4096`` keeps the model's 49,152 rows (the rest are padding rows, which
analyze handles as Pythia's) and so every forward's full vocabulary head, and shrinks the rest.

``--quick``: 3 layers of a tiny shape (d_model 64, d_mlp 256, vocabulary 512) on 256
tokens, seconds on a CPU (tests/test_bench_analyze_restart.py).

Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers.utils import logging as hf_logging

from unineurons import api
from unineurons.analyses import analyze as analyze_mod
from unineurons.analyses import entropy, interventions
from unineurons.analyses.vocab import real_vocab_size
from unineurons.models.adapters import get_adapter
from unineurons.models.load import LoadedModel, parse_model_spec
from unineurons.progress import set_quiet

PHASES = ("analyze", "token pass", "entropy confirmation", "rest")
FULL = dict(layers=30, d_model=576, d_mlp=1536, heads=9, kv_heads=3, vocab=49152,
            tok_chars=12_000_000)
QUICK = dict(layers=3, d_model=64, d_mlp=256, heads=4, kv_heads=2, vocab=512, tok_chars=300_000)
N_PLANTED = 10  # the entropy search's default max_candidates


# ---- setup (not timed) ---------------------------------------------------------------------
def plant_entropy_neurons(m: LoadedModel, n: int, seed: int = 0) -> list[int]:
    """Give ``n`` seeded neurons of the last layer an output weight inside the unembedding's
    effective null space (entropy.null_space, default dimensions) with twice the layer's
    largest output norm, so they are the entropy search's candidates. Returns their indices."""
    ad = m.adapter
    basis = entropy.null_space(m, entropy.default_null_dims(ad.d_model)).float()  # [d, k]
    down = m.model.model.layers[-1].mlp.down_proj.weight  # [d_model, d_mlp]: column i = w_out
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(ad.d_mlp, size=n, replace=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        big = 2 * down.norm(dim=0).max()
        w = basis @ torch.randn(basis.shape[1], n, generator=gen)  # [d, n]
        down[:, torch.from_numpy(idx)] = w / w.norm(dim=0, keepdim=True) * big
    return [int(i) for i in idx]


def build_inputs(root: Path, shape: dict, n_tokens: int, ctx: int) -> tuple[Path, Path]:
    """(model folder, token store folder) under ``root``: a tokenizer of ``shape["tok_vocab"]``
    tokens, a random Llama of ``shape`` (``shape["vocab"]`` embedding rows; rows past the
    tokenizer's are padding, as Pythia's) with planted entropy neurons, and ``n_tokens`` stdlib
    tokens in contexts of ``ctx``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unineurons.tokenizer import train_tokenizer
    from unineurons.tokens import build_token_store

    tok = train_tokenizer("stdlib", shape["tok_vocab"], root / "tokenizer",
                          max_chars=shape["tok_chars"])
    vocab = AutoTokenizer.from_pretrained(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=shape["layers"], hidden_size=shape["d_model"],
                      intermediate_size=shape["d_mlp"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      max_position_embeddings=max(2048, ctx), tie_word_embeddings=True,
                      bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
                      pad_token_id=vocab.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    loaded = LoadedModel(spec=parse_model_spec("."), model=model, adapter=get_adapter(model),
                         tokenizer=None, weights_sha256="random")
    real_vocab_size(loaded, vocab)  # the null space over real tokens, as analyze computes it
    plant_entropy_neurons(loaded, N_PLANTED)
    path = root / "model"
    model.save_pretrained(path, safe_serialization=True)
    vocab.save_pretrained(path)
    store = root / "tokens"
    build_token_store("stdlib", str(tok), ctx, n_tokens, store)
    return path, store


# ---- timing hooks --------------------------------------------------------------------------
@dataclass
class Timings:
    """Wall and CPU seconds per phase, and what the entropy confirmation evaluated."""

    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    confirmation: list[tuple[int, int, int]] = field(default_factory=list)  # (contexts, ctx, patches)


def _sync(device: str) -> None:
    if device.startswith("cuda"):  # kernels are asynchronous: time what they did
        torch.cuda.synchronize(device)


@contextmanager
def phase_timers(t: Timings, device: str) -> Iterator[None]:
    """Time the token pass and the entropy confirmation inside analyze by wrapping the
    functions analyze calls (module attributes, restored in ``finally``)."""
    targets: list[tuple[object, str, str]] = [
        (analyze_mod, "accumulate", "token pass"),
        (entropy, "evaluate_patches", "entropy confirmation"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]

    def wrap(fn: Callable, phase: str) -> Callable:
        def timed(*args, **kwargs):
            if phase == "entropy confirmation":
                ctx, patches = args[1], args[3]
                t.confirmation.append((int(ctx.shape[0]), int(ctx.shape[1]), len(patches)))
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                t.wall[phase] += time.perf_counter() - w0
                t.cpu[phase] += time.process_time() - c0
        return timed

    try:
        for (mod, name, phase), (_, _, fn) in zip(targets, saved, strict=True):
            setattr(mod, name, wrap(fn, phase))
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


@contextmanager
def full_forwards() -> Iterator[None]:
    """The code before the restart: patched forwards run every block (no restart, nothing
    recorded), as benchmarks/restart.py disables it."""
    restart, record = interventions.restart_at, interventions.record_block_inputs
    interventions.restart_at = lambda *a: nullcontext()
    interventions.record_block_inputs = lambda ad, layers: record(ad, [])
    try:
        yield
    finally:
        interventions.restart_at, interventions.record_block_inputs = restart, record


def timed_analyze(model: Path, store: Path, out: Path, n_tokens: int, device: str,
                  batch_size: int, restart: bool) -> Timings:
    """One ``api.analyze`` of ``model`` on ``store`` into the new run ``out``, timed."""
    t = Timings()
    with phase_timers(t, device), (nullcontext() if restart else full_forwards()):
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        api.analyze(models=[str(model)], tokens=str(store), out=str(out), n_tokens=n_tokens,
                    device=device, batch_size=batch_size)
        _sync(device)
        t.wall["analyze"] = time.perf_counter() - w0
        t.cpu["analyze"] = time.process_time() - c0
    for d in (t.wall, t.cpu):
        d["rest"] = d["analyze"] - d["token pass"] - d["entropy confirmation"]
    return t


# ---- outputs -------------------------------------------------------------------------------
def _values(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[pa.ChunkedArray]]:
    """A column's leaf values (lists flattened, to any depth) and the list lengths above them."""
    lengths = []
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths.append(pc.list_value_length(col))
        col = pc.list_flatten(col)
    return col, lengths


def compare_runs(a: Path, b: Path, rtol: float = 1e-6, atol: float = 1e-9
                 ) -> tuple[list[str], float, list[str]]:
    """Compare every table two analyze runs wrote: ``(tables, max |Δ| / max(|a|, |b|) of float
    values, differences)``. Floats (also inside lists) agree to ``|Δ| <= rtol * max(|a|, |b|)
    + atol`` with NaN and null in the same places, everything else exactly; no
    ``differences``: they agree."""
    names = sorted(p.name for p in a.glob("*.parquet"))
    diffs = [f"{p.name} only in {b.name}" for p in b.glob("*.parquet") if p.name not in names]
    worst = 0.0
    for name in names:
        if not (b / name).exists():
            diffs.append(f"{name} only in {a.name}")
            continue
        x, y = pq.read_table(a / name), pq.read_table(b / name)
        if x.schema != y.schema or x.num_rows != y.num_rows:
            diffs.append(f"{name}: columns or rows differ")
            continue
        for c in x.column_names:
            (u, lu), (v, lv) = _values(x[c]), _values(y[c])
            if not all(p.equals(q) for p, q in zip(lu, lv, strict=True)):
                diffs.append(f"{name}.{c}: list lengths differ")
            elif not pa.types.is_floating(u.type):
                if not u.equals(v):
                    diffs.append(f"{name}.{c}: values differ")
            else:
                uf = pc.fill_null(u, float("nan")).to_numpy().astype(np.float64)
                vf = pc.fill_null(v, float("nan")).to_numpy().astype(np.float64)
                if not np.array_equal(np.isnan(uf), np.isnan(vf)):
                    diffs.append(f"{name}.{c}: NaN in different rows")
                    continue
                ok = ~np.isnan(uf)
                if ok.any():
                    d = np.abs(uf[ok] - vf[ok])
                    big = np.maximum(np.abs(uf[ok]), np.abs(vf[ok]))
                    worst = max(worst, float((d / np.maximum(big, 1e-300)).max()))
                    if (d > rtol * big + atol).any():
                        diffs.append(f"{name}.{c}: |Δ| up to {d.max():.2e} beyond "
                                     f"{rtol:g} relative + {atol:g}")
    return names, worst, diffs


def table(before: Timings, after: Timings) -> list[str]:
    """Rows before / after / ratio; per phase wall and CPU seconds."""
    head = f"{'':<8}" + "".join(f"{p + ' wall':>26}{'CPU':>9}" for p in PHASES)
    lines = [head]
    for label, t in (("before", before), ("after", after)):
        lines.append(f"{label:<8}" + "".join(f"{t.wall[p]:>24.1f} s{t.cpu[p]:>7.1f} s"
                                             for p in PHASES))

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0.05 else "-"  # a phase under 0.05 s has no ratio

    lines.append(f"{'ratio':<8}" + "".join(f"{ratio(before.wall[p], after.wall[p]):>26}"
                                           f"{ratio(before.cpu[p], after.cpu[p]):>9}"
                                           for p in PHASES))
    return lines


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print its table; return ``{"before": Timings, "after": Timings,
    "tables": [...], "max_rel_diff": float, "diffs": [...], "lines": [...]}``."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=None,
                    help="tokens analyze streams (default 512; 256 with --quick)")
    ap.add_argument("--ctx", type=int, default=None, help="context length (default 64; 32 with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="layers (default 30; 3 with --quick)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (analyze's --device)")
    ap.add_argument("--batch-size", type=int, default=8, help="analyze's --batch-size (contexts)")
    ap.add_argument("--tokenizer-vocab", type=int, default=None, help=(
        "tokens of the trained tokenizer (default: the model's vocabulary); fewer make the "
        "vocabulary statistics cheaper while every forward keeps the model's full head"))
    ap.add_argument("--threads", type=int, default=None, help=(
        "torch CPU threads (default: torch's); 1 keeps CPU seconds free of threads spinning "
        "for a core on a busy machine"))
    ap.add_argument("--quick", action="store_true", help="tiny shape: seconds on a CPU")
    args = ap.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    if args.layers is not None:
        shape["layers"] = args.layers
    shape["tok_vocab"] = args.tokenizer_vocab or shape["vocab"]
    if not 259 <= shape["tok_vocab"] <= shape["vocab"]:
        ap.error(f"--tokenizer-vocab must be in 259..{shape['vocab']} (bytes + 3 specials, "
                 "at most the model's rows)")
    n_tokens = args.n_tokens or (256 if args.quick else 512)
    ctx = args.ctx or (32 if args.quick else 64)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    set_quiet(True)
    hf_logging.disable_progress_bar()  # the model save's shard bar
    if args.device.startswith("cuda"):  # CUDA context and cuBLAS outside the timed calls
        x = torch.ones(64, 64, device=args.device)
        (x @ x).sum().item()

    with tempfile.TemporaryDirectory(prefix="analyze_restart_") as tmp:
        root = Path(tmp)
        model, store = build_inputs(root, shape, n_tokens, ctx)
        after = timed_analyze(model, store, root / "run_after", n_tokens, args.device,
                              args.batch_size, restart=True)
        before = timed_analyze(model, store, root / "run_before", n_tokens, args.device,
                               args.batch_size, restart=False)
        names, worst, diffs = compare_runs(root / "run_before", root / "run_after")

    n_ctx = -(-n_tokens // ctx)
    conf = ", ".join(f"{c} contexts x {t} tokens = {c * t} tokens x (1 clean + {p} patched) "
                     "forwards" for c, t, p in after.confirmation) or "none (no candidates)"
    lines = [f"analyze on a random Llama: {shape['layers']} layers x {shape['d_mlp']} neurons, "
             f"d_model {shape['d_model']}, vocabulary {shape['vocab']} rows "
             f"({shape['tok_vocab']} tokenizer tokens); device {args.device}, "
             f"torch threads {torch.get_num_threads()}, batch {args.batch_size} contexts",
             f"token pass: {n_ctx * ctx} tokens ({n_ctx} contexts of {ctx}); "
             f"entropy confirmation: {conf}",
             "before = patched forwards run the whole model; after = they restart at the "
             "patched layer (as shipped); seconds: wall, and this process's CPU", *table(before, after)]
    if diffs:
        lines.append(f"outputs DIFFER ({len(names)} tables): " + "; ".join(diffs))
    else:
        lines.append(f"outputs equal: {len(names)} tables ({', '.join(n[:-8] for n in names)}); "
                     f"max relative |Δ| of float columns {worst:.1e}")
    print("\n".join(lines))
    return {"before": before, "after": after, "tables": names, "max_rel_diff": worst,
            "diffs": diffs, "lines": lines}


if __name__ == "__main__":
    sys.exit(1 if main()["diffs"] else 0)
