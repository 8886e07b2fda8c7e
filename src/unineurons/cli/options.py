"""Options several commands share, declared once (typer reads them as parameter defaults)."""

from __future__ import annotations

import typer

__all__ = ["BACKEND", "RAY_ADDRESS", "WORKERS", "CPUS_PER_WORKER", "CHECKPOINT_TOKENS",
           "SAFETENSORS_ONLY", "FAMILY", "FAMILY_SEEDS", "FAMILY_STEP", "FAMILIES_FILE",
           "MODEL_PATH"]

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
FAMILY = typer.Option(None, "--family", help=(
    "A seed family by name (`unineurons families`): its members, after any --model."
))
FAMILY_SEEDS = typer.Option(None, "--seeds", help=(
    "With --family: the members' seeds, e.g. 0-9 or 21,49 (default: all); the first is the "
    "reference."
))
FAMILY_STEP = typer.Option(None, "--step", help=(
    "With --family: the training step's checkpoint (the family's revision naming; default: main)."
))
FAMILIES_FILE = typer.Option(None, "--families-file", help=(
    "Extra seed family file (TOML like the built-in registry); repeat. Also: "
    "UNINEURONS_SEED_FAMILIES."
))
MODEL_PATH = typer.Option(None, "--model-path", help=(
    "SPEC=FOLDER: load the run's model SPEC from FOLDER, where it is now (moved since the run was "
    "made; its weights' sha256 is checked). Repeat for several."
))
