"""The seed zoo: K small GPT-2 models that differ only in their seed, with checkpoints.

Each seed decides both the initial weights and the order in which the token store's rows are
read; everything else (shape, hyper-parameters, data) is shared, so what differs between the
models is exactly what universality asks about. Checkpoints are plain Hugging Face folders::

    from unineurons.zoo import train_zoo, zoo_checkpoints
    zoo = train_zoo("tokens/train", "zoo", preset="tiny", seeds=(0, 1, 2, 3, 4),
                    heldout="tokens/heldout")
    zoo_checkpoints(zoo)  # {seed: {step: Path("zoo/seed0/step300"), ...}, ...}

CLI: ``unineurons zoo train`` and ``unineurons zoo info``.
"""

from __future__ import annotations

from .config import PRESETS, ZooConfig, lr_at
from .run import default_checkpoints, parse_int_list, train_zoo, zoo_checkpoints, zoo_info
from .train import ZooSpec, batch_rows, build_model, train_seed

__all__ = ["ZooConfig", "PRESETS", "lr_at", "train_zoo", "zoo_checkpoints", "zoo_info",
           "parse_int_list", "default_checkpoints", "ZooSpec", "batch_rows", "build_model",
           "train_seed"]
