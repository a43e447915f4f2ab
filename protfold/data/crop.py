"""Cropping, padding and batching (AF2 supplement 1.2.8, 1.11.5).

Crops are index arrays into the chain (sorted, so residues stay in sequence order) applied alike to
every per-residue array and to the MSA columns. Padding and `collate` know each output key's layout from
`FEATURE_DIMS`: which leading axes are residues (N), MSA rows (S) or extra-MSA rows (E).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from protfold import constants as rc
from protfold.config import DataConfig

# Per output key: the kind of each leading axis ("N" residues, "S" MSA rows, "E" extra rows).
FEATURE_DIMS: dict[str, tuple[str, ...]] = {
    "aatype": ("N",),
    "residue_index": ("N",),
    "seq_mask": ("N",),
    "target_feat": ("N",),
    "msa_feat": ("S", "N"),
    "msa_mask": ("S", "N"),
    "true_msa": ("S", "N"),
    "bert_mask": ("S", "N"),
    "extra_msa_feat": ("E", "N"),
    "extra_msa_mask": ("E", "N"),
    "all_atom_positions": ("N",),
    "all_atom_mask": ("N",),
    "atom14_gt_positions": ("N",),
    "atom14_gt_exists": ("N",),
    "atom14_alt_gt_positions": ("N",),
    "atom14_alt_gt_exists": ("N",),
    "atom14_atom_exists": ("N",),
    "atom14_atom_is_ambiguous": ("N",),
    "atom37_atom_exists": ("N",),
    "residx_atom14_to_atom37": ("N",),
    "backbone_rigid_tensor": ("N",),
    "backbone_rigid_mask": ("N",),
    "rigidgroups_gt_frames": ("N",),
    "rigidgroups_alt_gt_frames": ("N",),
    "rigidgroups_gt_exists": ("N",),
    "rigidgroups_group_exists": ("N",),
    "rigidgroups_group_is_ambiguous": ("N",),
    "torsion_angles_sin_cos": ("N",),
    "alt_torsion_angles_sin_cos": ("N",),
    "torsion_angles_mask": ("N",),
    "chi_angles_sin_cos": ("N",),
    "chi_mask": ("N",),
    "pseudo_beta": ("N",),
    "pseudo_beta_mask": ("N",),
    "resolution": (),
}
_FRAME_KEYS = ("backbone_rigid_tensor", "rigidgroups_gt_frames", "rigidgroups_alt_gt_frames")
_CA = rc.atom_order["CA"]


def contiguous_crop(n_res: int, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """A window of min(crop_size, n_res) consecutive residues starting uniformly at random."""
    if n_res <= crop_size:
        return np.arange(n_res)
    start = int(rng.integers(0, n_res - crop_size + 1))
    return np.arange(start, start + crop_size)


def spatial_crop(ca: np.ndarray, ca_mask: np.ndarray, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """The crop_size residues whose CA is nearest a random centre residue with an observed CA.

    Residues without CA rank last (they enter only when the chain has fewer observed residues than
    crop_size). Returned in sequence order. Falls back to a contiguous crop when no CA is observed.
    """
    n_res = ca.shape[0]
    observed = np.flatnonzero(ca_mask > 0)
    if n_res <= crop_size:
        return np.arange(n_res)
    if observed.size == 0:
        return contiguous_crop(n_res, crop_size, rng)
    centre = observed[int(rng.integers(0, observed.size))]
    dist = np.linalg.norm(ca - ca[centre], axis=-1)
    dist[ca_mask <= 0] = np.inf
    return np.sort(np.argsort(dist, kind="stable")[:crop_size])


def eval_crop(ca_mask: np.ndarray, crop_size: int) -> np.ndarray:
    """Deterministic crop for evaluation: the whole chain when it fits, else the contiguous window of
    crop_size residues with the most observed CA atoms (the first such window on ties)."""
    n_res = ca_mask.shape[0]
    if n_res <= crop_size:
        return np.arange(n_res)
    observed = np.concatenate([[0.0], np.cumsum(ca_mask > 0)])
    start = int(np.argmax(observed[crop_size:] - observed[: n_res - crop_size + 1]))
    return np.arange(start, start + crop_size)


def select_crop(raw: dict, cfg: DataConfig, rng: np.random.Generator, *, train: bool) -> np.ndarray:
    """Crop indices for one raw example by `cfg.crop_mode` ("mixed": spatial with `spatial_crop_prob`)."""
    ca = np.asarray(raw["all_atom_positions"])[:, _CA]
    ca_mask = np.asarray(raw["all_atom_mask"])[:, _CA]
    if not train:
        return eval_crop(ca_mask, cfg.crop_size)
    mode = cfg.crop_mode
    if mode == "mixed":
        mode = "spatial" if rng.random() < cfg.spatial_crop_prob else "contiguous"
    if mode == "spatial":
        return spatial_crop(ca, ca_mask, cfg.crop_size, rng)
    return contiguous_crop(ca.shape[0], cfg.crop_size, rng)


def _pad_axis(x: Tensor, axis: int, size: int) -> Tensor:
    if x.shape[axis] == size:
        return x
    if x.shape[axis] > size:
        raise ValueError(f"cannot pad axis {axis} of length {x.shape[axis]} down to {size}")
    shape = list(x.shape)
    shape[axis] = size - x.shape[axis]
    return torch.cat([x, x.new_zeros(shape)], dim=axis)


def pad_example(example: dict, sizes: dict[str, int]) -> dict:
    """Zero-pad every key of FEATURE_DIMS to sizes {"N": .., "S": .., "E": ..} (missing kinds untouched).

    Masks are therefore zero on padding; padded frames are identity so they stay valid transforms.
    """
    out = dict(example)
    for key, dims in FEATURE_DIMS.items():
        if key not in out:
            continue
        x = out[key]
        n_before = x.shape[dims.index("N")] if "N" in dims else None
        for axis, kind in enumerate(dims):
            if kind in sizes:
                x = _pad_axis(x, axis, sizes[kind])
        if key in _FRAME_KEYS and n_before is not None and x.shape[0] > n_before:
            x[n_before:] = torch.eye(4, dtype=x.dtype)
        out[key] = x
    return out


def collate(examples: list[dict]) -> dict:
    """Stack examples into a batch, zero-padding residues, MSA rows and extra rows to the longest item.

    Non-tensor keys (`id`) are kept as lists.
    """
    sizes = {}
    for kind, key in (("N", "aatype"), ("S", "msa_feat"), ("E", "extra_msa_feat")):
        if all(key in ex for ex in examples):
            sizes[kind] = max(ex[key].shape[FEATURE_DIMS[key].index(kind)] for ex in examples)
    padded = [pad_example(ex, sizes) for ex in examples]
    batch: dict = {}
    for key in padded[0]:
        values = [ex[key] for ex in padded]
        batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else list(values)
    return batch
