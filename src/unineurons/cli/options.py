"""Options several commands share, declared once (typer reads them as parameter defaults)."""

from __future__ import annotations

import typer

__all__ = ["BACKEND", "RAY_ADDRESS", "WORKERS", "CPUS_PER_WORKER", "CHECKPOINT_TOKENS"]

BACKEND = typer.Option("local", help=(
    "local: this process; ray: token shards on Ray workers, states merged here "
    "(pip install 'unineurons\\[ray]')."  # \[: rich would read [ray] as markup
))
RAY_ADDRESS = typer.Option(None, help=(
    "Ray cluster to join (auto or HOST:PORT; default: RAY_ADDRESS, else a local instance)."
))
WORKERS = typer.Option(1, help="Ray workers; each loads the models once (--backend ray).")
CPUS_PER_WORKER = typer.Option(1, help="CPU cores each Ray worker reserves (--backend ray).")
CHECKPOINT_TOKENS = typer.Option(1_000_000, help="Save resumable state every this many tokens.")
SAFETENSORS_ONLY = typer.Option(False, "--safetensors-only", help=(
    "Load safetensors weights only; refuse pytorch_model.bin (by default read through "
    "torch.load(weights_only=True), never a full unpickle). Also: UNINEURONS_SAFETENSORS_ONLY=1."
))
