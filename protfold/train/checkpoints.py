"""Reading protfold (Lightning) checkpoints with one clear error for anything that is not one."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from protfold.errors import ProtfoldInputError

# What torch.load raises on files that are not checkpoints (text, truncated zip archives, other pickles).
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
               AttributeError, ImportError, zipfile.BadZipFile, UnicodeDecodeError, OSError)


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = True) -> dict[str, Any]:
    """The checkpoint at `path`, its tensors on the CPU (memory-mapped where torch allows, so checking a large
    file reads little of it). ProtfoldInputError naming the file if it is missing, unreadable, or not a
    Lightning checkpoint with model weights."""
    path = Path(path)
    if not path.is_file():
        raise ProtfoldInputError(path, "checkpoint not found" if not path.exists() else "not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except _UNREADABLE as err:
        if mmap and "mmap" in str(err):  # torch's legacy (non-zip) format cannot be memory-mapped
            return read_checkpoint(path, mmap=False)
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ProtfoldInputError(path, f"not a readable checkpoint ({detail})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ProtfoldInputError(path, "not a protfold checkpoint (no Lightning state_dict in it)")
    if not any(key.startswith("model.") for key in ckpt["state_dict"]):
        raise ProtfoldInputError(path, "checkpoint holds no protfold model weights")
    return ckpt
