"""Reading protfold (Lightning) checkpoints with one clear error for anything that is not one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from protfold.errors import ProtfoldInputError
from protfold.weights.files import load_torch


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint at `path`, its tensors on the CPU (memory-mapped where torch allows, so checking a large
    file reads little of it). ProtfoldInputError naming the file if it is missing, unreadable, or not a
    Lightning checkpoint with protfold model weights."""
    path = Path(path)
    if not path.is_file():
        raise ProtfoldInputError(path, "checkpoint not found" if not path.exists() else "not a file")
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ProtfoldInputError(path, "not a protfold checkpoint (no Lightning state_dict in it)")
    if not any(key.startswith("model.") for key in ckpt["state_dict"]):
        raise ProtfoldInputError(path, "checkpoint holds no protfold model weights")
    return ckpt
