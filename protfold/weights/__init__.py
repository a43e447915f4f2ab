"""Start from published weights: AlphaFold2 `.npz` and OpenFold checkpoints in, protfold models and
checkpoints out (issue 13).

    from protfold.weights import load_model
    model = load_model("params_model_3_ptm.npz", "af2_ptm")   # an AlphaFold in eval mode, float32
    outputs = model(batch, n_recycles=3)

Supported: the template-free monomer models, AF2's `params_model_{3,4,5}.npz` and `..._ptm.npz` and
OpenFold's state dicts of the same networks (plain, a Lightning checkpoint's `state_dict`, or its EMA
weights `ema.params`). Templates and multimer are refused with a reason, as are unreadable files and shapes
that do not fit the chosen configuration.

  mapping.py    the one name/layout table, AF2 <-> OpenFold <-> protfold
  files.py      recognising and reading files; the refusals that need no configuration
  importer.py   configuration (preset, JSON of sizes, or read from the file), shape checks, conversion
  checkpoint.py protfold checkpoints (`protfold convert`)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from protfold.config import ModelConfig
from protfold.weights.checkpoint import convert, protfold_checkpoint
from protfold.weights.importer import (
    ImportedWeights,
    ResolvedConfig,
    as_preset,
    export_af2,
    read_config,
    read_external_weights,
    read_weights,
)

if TYPE_CHECKING:
    from protfold.model.alphafold import AlphaFold


def load_model(path: str | Path, config: str | Path | ModelConfig | None = None) -> AlphaFold:
    """The AlphaFold of an AF2 `.npz`, an OpenFold checkpoint or a protfold checkpoint, in eval mode (float32).

    config: a preset name (`af2`, `af2_ptm`, ...), a JSON file of ModelConfig sizes (a bare object, or one
    with `protfold_model_config` like the test fixture's config.json), a ModelConfig, or None: a protfold
    checkpoint's own configuration, else the sizes read from the parameters.
    """
    from protfold.model.alphafold import AlphaFold

    imported = read_weights(path, config)
    model = AlphaFold(cfg=imported.config.cfg)
    model.load_state_dict(imported.state_dict)
    return model.eval()


__all__ = ["ImportedWeights", "ResolvedConfig", "as_preset", "convert", "export_af2", "load_model",
           "protfold_checkpoint", "read_config", "read_external_weights", "read_weights"]
