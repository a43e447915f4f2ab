"""Imported weights as a protfold checkpoint: what `protfold predict --ckpt_path` and `protfold fit
--model.init_from` read (see `protfold.train.module`), written atomically by `protfold convert`."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from protfold.config import ModelConfig, OptimConfig
from protfold.errors import ProtfoldInputError
from protfold.weights.files import one_line
from protfold.weights.importer import ImportedWeights, read_weights


def protfold_checkpoint(imported: ImportedWeights) -> dict[str, Any]:
    """A Lightning-style checkpoint dict of `ProtfoldModule`: the weights as `model.*` and as the EMA
    average (the imported weights are where the average starts), the hyperparameters that rebuild the
    model (`preset`, `model_overrides`) and the saved model configuration that `on_load_checkpoint` checks.
    The two weight sets are the same tensors, so `torch.save` stores them once."""
    from importlib.metadata import version  # the version without importing lightning (+115 MiB resident)

    weights = imported.state_dict
    return {
        "state_dict": {f"model.{name}": tensor for name, tensor in weights.items()},
        "ema": {"decay": OptimConfig().ema_decay, "shadow": dict(weights)},
        "hyper_parameters": {"preset": imported.config.preset, "model_overrides": imported.config.overrides or None},
        "model_config": asdict(imported.config.cfg),
        "pytorch-lightning_version": version("lightning"),
        "converted_from": {"path": str(imported.source), "format": imported.format},
    }


def convert(source: str | Path, out: str | Path, config: str | Path | ModelConfig | None = None, *,
            overwrite: bool = False) -> ImportedWeights:
    """`protfold convert`: read `source` (AF2 .npz, OpenFold or protfold checkpoint) and write the protfold
    checkpoint `out`. Writes only `out` (through a temporary file beside it, renamed when complete);
    refuses an existing `out` unless `overwrite`."""
    source, out = Path(source), Path(out)
    if out.is_dir():
        raise ProtfoldInputError(out, "is a folder; --out names the checkpoint file to write")
    if out.exists() and not overwrite:
        raise ProtfoldInputError(out, "exists; pass --overwrite to replace it")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ProtfoldInputError(out, "is the source file itself; write the checkpoint elsewhere")
    imported = read_weights(source, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(protfold_checkpoint(imported), tmp)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError on a full disk
        raise ProtfoldInputError(out, f"cannot write the checkpoint: {one_line(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return imported


__all__ = ["convert", "protfold_checkpoint"]
