"""One raw cache entry -> one model-ready example (AF2 supplement 1.2).

Order: crop -> MSA sampling, masking and clustering -> input features -> ground truth -> padding. All
randomness comes from one `numpy.random.Generator(seed)`, so a seed fixes the example.

Training (`train=True`): crop by `cfg.crop_mode`, then pad residues to `cfg.crop_size`, MSA rows to
`cfg.max_msa_clusters` and extra rows to `cfg.max_extra_msa`, all with zero masks, so every training batch has
the same shapes whatever the chain's length and alignment depth: compiled blocks (`memory.compile_blocks`) then
compile once per run instead of once per new depth. The model masks every padded row (attention keys, the outer
product mean, the global column mean, the masked-MSA loss), so padding changes no output or gradient
(tests/data/test_fixed_shapes.py). Evaluation (`train=False`): AF2 evaluates uncropped, so the chain is kept whole when
it fits `cfg.crop_size`; a longer chain gets a deterministic contiguous crop (the window with the most
observed residues) and nothing is padded. MSA sampling and BERT masking run in both modes, as in AF2
(the masked-MSA loss is reported in evaluation too); the seed makes them reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from protfold.config import DataConfig
from protfold.data import crop as crop_lib
from protfold.data import features
from protfold.data.msa import make_msa_features

RESIDUE_KEYS = ("aatype", "all_atom_positions", "all_atom_mask", "residue_index")


def _previous_atoms(raw: dict, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    """Atoms of each cropped residue's predecessor in the full chain (so crop edges keep omega and phi)."""
    pos = np.asarray(raw["all_atom_positions"], dtype=np.float32)
    mask = np.asarray(raw["all_atom_mask"], dtype=np.float32)
    resid = np.asarray(raw["residue_index"])
    prev = np.maximum(idx - 1, 0)
    valid = (idx > 0) & (resid[idx] - resid[prev] == 1)
    return torch.from_numpy(pos[prev]), torch.from_numpy(mask[prev] * valid[:, None])


def training_sizes(cfg: DataConfig) -> dict[str, int]:
    """The fixed sizes every training example is padded to: residues, MSA rows, extra MSA rows."""
    return {"N": cfg.crop_size, "S": cfg.max_msa_clusters, "E": cfg.max_extra_msa}


def make_example(raw: dict, cfg: DataConfig, *, seed: int, train: bool) -> dict:
    """Features and ground truth of one chain; keys and shapes in `crop.FEATURE_DIMS` plus `id` (str).

    raw: the cache entry (`aatype` [L], `all_atom_positions` [L, 37, 3], `all_atom_mask` [L, 37],
    `residue_index` [L], `resolution`, `msa` [N_msa, L], `deletion_matrix` [N_msa, L], `id`).
    """
    rng = np.random.default_rng(seed)
    idx = crop_lib.select_crop(raw, cfg, rng, train=train)
    aatype = torch.from_numpy(np.asarray(raw["aatype"], dtype=np.int64)[idx])
    positions = torch.from_numpy(np.asarray(raw["all_atom_positions"], dtype=np.float32)[idx])
    mask = torch.from_numpy(np.asarray(raw["all_atom_mask"], dtype=np.float32)[idx])
    prev_pos, prev_mask = _previous_atoms(raw, idx)

    msa = np.asarray(raw["msa"])[:, idx]
    deletions = np.asarray(raw["deletion_matrix"])[:, idx]
    example: dict = {
        "aatype": aatype,
        "residue_index": torch.from_numpy(np.asarray(raw["residue_index"], dtype=np.int64)[idx]),
        "seq_mask": torch.ones(len(idx), dtype=torch.float32),
        "target_feat": features.target_feat(aatype),
    }
    example.update(make_msa_features(msa, deletions, cfg, rng))
    example.update(features.ground_truth(aatype, positions, mask, prev_positions=prev_pos, prev_mask=prev_mask))
    resolution = float(raw.get("resolution", np.nan))
    # unknown resolution -> 0.0: outside every resolution filter (pLDDT uses 0.1-3.0 A) and NaN-free
    example["resolution"] = torch.tensor(0.0 if np.isnan(resolution) else resolution, dtype=torch.float32)
    if train:
        example = crop_lib.pad_example(example, training_sizes(cfg))
    example["id"] = str(raw.get("id", ""))
    return example
