"""Synthetic inputs of exact benchmark shapes: a raw cache entry (ideal helix + side chains, random MSA).

Benchmarks need realistic shapes and finite losses, not realistic proteins. The chain is one ideal
alpha helix: C-alpha atoms on a helix of radius 2.3 A, rise 1.5 A and 100 degrees per residue (3.83 A
between consecutive C-alphas); each residue's backbone frame is built from its neighbours' C-alphas
(AF2 Algorithm 21), N, CA, C, O and side chains are placed from AF2's idealised rigid groups with helical
phi/psi/omega (-57, -47, 180 degrees) and side-chain chi angles drawn from the three staggered rotamers
(-60, 180, 60). The sequence is uniform over the 20 amino acids. The MSA is the query plus noisy copies
(30% substitutions, 10% gaps, 5% of positions with deletions), like the data tests' synthetic MSAs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protfold import constants as rc
from protfold.config import DataConfig
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.geometry import Rigid, atom14_to_atom37, frames_to_atom14, torsion_angles_to_frames

__all__ = ["helix_chain", "random_msa", "synthetic_batch", "synthetic_raw", "to_device"]

_RADIUS, _RISE, _TURN = 2.3, 1.5, math.radians(100.0)
_BACKBONE_DEG = (180.0, -57.0, -47.0)  # omega, phi, psi of an alpha helix
_ROTAMERS_DEG = np.array([-60.0, 180.0, 60.0])


def helix_chain(aatype: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Atom37 positions [L, 37, 3] (float32) and mask [L, 37] of an ideal helix with side chains."""
    n = len(aatype)
    k = torch.arange(-1, n + 1, dtype=torch.float64)
    ca = torch.stack([_RADIUS * torch.cos(_TURN * k), _RADIUS * torch.sin(_TURN * k), _RISE * k], dim=-1)
    # origin at CA_i, x-axis towards CA_{i+1} (where C lies), CA_{i-1} (the N side) in the xy-plane
    backbone = Rigid.from_3_points(ca[:-2], ca[1:-1], ca[2:])
    degrees = np.empty((n, 7))
    degrees[:, :3] = _BACKBONE_DEG
    degrees[:, 3:] = rng.choice(_ROTAMERS_DEG, size=(n, 4))
    theta = torch.from_numpy(np.radians(degrees))
    angles = torch.stack([torch.sin(theta), torch.cos(theta)], dim=-1)  # [L, 7, 2]
    aa = torch.from_numpy(aatype.astype(np.int64))
    frames = torsion_angles_to_frames(backbone, angles, aa)
    atom37 = atom14_to_atom37(frames_to_atom14(frames, aa), aa)
    mask = np.asarray(rc.restype_atom37_mask, dtype=np.float32)[aatype]
    return atom37.to(torch.float32).numpy(), mask


def random_msa(aatype: np.ndarray, depth: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MSA [depth, L] (int8, row 0 = query) and deletion matrix [depth, L] (int32)."""
    length = len(aatype)
    msa = np.tile(aatype.astype(np.int8), (depth, 1))
    sub = rng.random((depth, length)) < 0.3
    msa[sub] = rng.integers(0, 20, size=int(sub.sum()))
    msa[rng.random((depth, length)) < 0.1] = rc.msa_gap_index
    msa[0] = aatype
    deletions = (rng.random((depth, length)) < 0.05) * rng.integers(1, 20, size=(depth, length))
    deletions[0] = 0
    return msa, deletions.astype(np.int32)


def synthetic_raw(n_res: int, msa_depth: int, *, seed: int = 0) -> dict:
    """A raw cache entry (format of `protfold.data.pipeline.make_example`) with exactly n_res residues."""
    rng = np.random.default_rng(seed)
    aatype = rng.integers(0, 20, size=n_res).astype(np.int64)
    positions, mask = helix_chain(aatype, rng)
    msa, deletions = random_msa(aatype, msa_depth, rng)
    return {
        "id": f"synthetic_{n_res}",
        "sequence": rc.aatype_to_sequence(aatype),
        "aatype": aatype,
        "all_atom_positions": positions,
        "all_atom_mask": mask,
        "residue_index": np.arange(n_res, dtype=np.int64),
        "resolution": np.float32(1.5),
        "msa": msa,
        "deletion_matrix": deletions,
    }


def synthetic_batch(crop: int, rows: int, extra_rows: int, *, seed: int = 0) -> dict:
    """A collated training batch of one example: N = crop, S = rows, E = extra_rows (MSA depth rows+extra+1).

    Goes through `make_example(..., train=True)` like real data, so every feature and ground-truth key exists.
    """
    raw = synthetic_raw(crop, rows + extra_rows + 1, seed=seed)
    cfg = DataConfig(crop_size=crop, max_msa_clusters=rows, max_extra_msa=extra_rows)
    return collate([make_example(raw, cfg, seed=seed, train=True)])


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
