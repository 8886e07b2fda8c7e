"""``unineurons tokenizer ...`` and ``unineurons tokens ...``: the data stages of the CLI.

Thin wrappers over :mod:`unineurons.tokenizer` and :mod:`unineurons.tokens`.
"""

from __future__ import annotations

from pathlib import Path

import typer

SOURCE_HELP = ("Corpus: a text file or folder, jsonl:PATH (.jsonl, .jsonl.zst, .jsonl.gz or a "
               "folder of them; a 'text' field per line), hf:NAME[:SPLIT][?config=C&column=COL"
               "&streaming=1] (a datasets folder saved with save_to_disk, or a hub id when "
               "online; 'text' column by default), or stdlib "
               "(this Python's standard library sources, offline).")

tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)
tokens_app = typer.Typer(help="Build and inspect token stores (tokens.npy + manifest.json).",
                         no_args_is_help=True)


@tokenizer_app.command("train")
def tokenizer_train(
    source: str = typer.Option(..., "--source", help=SOURCE_HELP),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Vocabulary size, special tokens "
                                   "included (at least 259: 256 bytes + BOS, EOS, pad)."),
    out: Path = typer.Option(..., "--out", help="Folder to write; AutoTokenizer.from_pretrained "
                             "loads it. Must be new, empty or a unineurons tokenizer."),
    max_chars: int = typer.Option(20_000_000, "--max-chars", help="Train on at most this many "
                                  "characters, sampled in seeded order across the corpus."),
    heldout_fraction: float = typer.Option(0.1, "--heldout-fraction", help="Leave out the "
                                           "documents a heldout token store at this fraction "
                                           "holds, so heldout text stays unseen."),
) -> None:
    """Train a byte-level BPE tokenizer with <|bos|>, <|endoftext|> (EOS) and <|pad|>."""
    from ..tokenizer import train_tokenizer
    from . import console

    path = train_tokenizer(source, vocab_size, out, max_chars=max_chars,
                           heldout_fraction=heldout_fraction)
    console.print(f"tokenizer with {vocab_size} tokens written to {path}", highlight=False)


@tokens_app.command("build")
def tokens_build(
    source: str = typer.Option(..., "--source", help=SOURCE_HELP),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer folder or HF hub id "
                                  "(e.g. gpt2, or a model folder that has a tokenizer)."),
    ctx: int = typer.Option(512, "--ctx", help="Context length: each row is BOS + ctx-1 tokens."),
    n_tokens: int = typer.Option(..., "--n-tokens", help="Tokens to store; rounded up to whole "
                                 "contexts (fewer if the corpus split runs out)."),
    out: Path = typer.Option(..., "--out", help="Store folder to write; must be new, empty or a "
                             "token store (which is then replaced)."),
    split: str = typer.Option("train", "--split", help="train or heldout; the two never share "
                              "a document."),
    seed: int = typer.Option(0, "--seed", help="Seed of the document order."),
    heldout_fraction: float = typer.Option(0.1, "--heldout-fraction", help="Fraction of "
                                           "documents (by text hash) in the heldout split."),
) -> None:
    """Tokenize a corpus split into fixed-length contexts: DIR/tokens.npy + DIR/manifest.json."""
    from ..tokens import build_token_store
    from . import console

    store = build_token_store(source, tokenizer, ctx, n_tokens, out, split=split, seed=seed,
                              heldout_fraction=heldout_fraction)
    console.print(f"token store {store.path}: {store.n_contexts} contexts x {store.ctx} = "
                  f"{store.n_contexts * store.ctx:,} tokens from "
                  f"{store.manifest['n_documents']} documents ({split})", highlight=False)
    if store.n_contexts < n_tokens // ctx:
        from . import err_console

        err_console.print(f"note: the {split} split of {source} holds only "
                          f"{store.n_contexts * store.ctx:,} tokens, fewer than the {n_tokens:,} "
                          "asked for; use a larger corpus for more", highlight=False, soft_wrap=True)


@tokens_app.command("info")
def tokens_info(
    path: Path = typer.Argument(..., help="Token store folder."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Recompute tokens.npy's "
                                "sha256 and compare it with the manifest."),
) -> None:
    """Print a token store's manifest summary (after checking its hash)."""
    from ..tokens import TokenStore
    from . import console

    store = TokenStore.open(path, verify=verify)
    m, t = store.manifest, store.manifest["tokenizer"]
    rows = [
        ("path", str(store.path)),
        ("source", m["source"]),
        ("split", f"{m['split']} (heldout fraction {m['heldout_fraction']}, seed {m['seed']})"),
        ("contexts", f"{m['n_contexts']:,} x ctx {m['ctx']} = {m['n_tokens']:,} tokens "
                     f"({m['dtype']})"),
        ("documents", f"{m['n_documents']:,}"),
        ("tokenizer", f"{t['path']} (vocab {t['vocab_size']:,}, sha256 {t['vocab_sha256'][:12]})"),
        ("special ids", f"bos {t['bos_id']}, eos {t['eos_id']}, pad {t['pad_id']}, "
                        f"{len(t['newline_ids'])} newline tokens"),
        ("sha256", m["sha256"] + (" (verified)" if verify else " (not verified)")),
        ("created by", m["created_by"]),
    ]
    for key, value in rows:
        console.print(f"{key:>12}: {value}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``tokenizer`` and ``tokens`` command groups to ``app``."""
    app.add_typer(tokenizer_app, name="tokenizer")
    app.add_typer(tokens_app, name="tokens")
