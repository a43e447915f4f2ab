"""Structural violation losses (AF2 supplement 1.9.11): peptide bonds and angles, inter- and intra-residue clashes.

All functions act on atom14 coordinates [B, N, 14, 3] in Angstrom with an atom-exists mask [B, N, 14].
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from protfold import constants as rc
from protfold.geometry import Rigid, frames_to_atom14, torsion_angles_to_frames

N_IDX, CA_IDX, C_IDX = 0, 1, 2  # atom14 slots shared by all residue types
_CYS_SG = rc.restype_name_to_atom14_names["CYS"].index("SG")
_BOND_CUTOFF = 2.0  # Angstrom; covalent bonds in the idealised geometry are <= 1.81 (C-S), 1-3 pairs >= 2.2


def _radii() -> np.ndarray:
    """van der Waals radius of every atom14 slot per residue type [21, 14] (element = first letter)."""
    radii = np.zeros((rc.restype_num + 1, 14), dtype=np.float32)
    for r, name in enumerate(rc.resnames[: rc.restype_num]):
        for i, atom in enumerate(rc.restype_name_to_atom14_names[name]):
            if atom:
                radii[r, i] = rc.van_der_waals_radius[atom[0]]
    return radii


@functools.lru_cache(maxsize=1)
def _intra_residue_tables() -> tuple[np.ndarray, np.ndarray]:
    """Lower distance bounds [21, 14, 14] and the pairs they apply to [21, 14, 14], i < j.

    # AF2-DIFF: AF2 bounds every intra-residue pair from a table of stereochemical bond lengths and angles
    # (upper and lower bounds for bonded pairs and 1-3 pairs). Our atoms are always built from the idealised
    # rigid groups, so bond lengths and bond angles are exact by construction; only torsions move atoms of a
    # residue against each other. We therefore derive the covalent graph from the idealised geometry (pairs
    # closer than 2.0 A with extended torsions, plus proline's N-CD ring bond), skip 1-2 and 1-3 pairs, and
    # give every other pair AF2's non-bonded lower bound r_vdW(a) + r_vdW(b) - overlap tolerance.
    """
    n_types = rc.restype_num + 1
    aatype = torch.arange(n_types)
    angles = torch.zeros(n_types, 7, 2, dtype=torch.float64)
    angles[..., 1] = -1.0  # every torsion at 180 degrees (sin 0, cos -1): extended, no accidental contacts
    frames = torsion_angles_to_frames(Rigid.identity((n_types,), dtype=torch.float64), angles, aatype)
    pos = frames_to_atom14(frames, aatype).numpy()
    exists = rc.restype_atom14_mask > 0
    dist = np.linalg.norm(pos[:, :, None] - pos[:, None, :], axis=-1)
    pair_exists = exists[:, :, None] & exists[:, None, :]
    bonded = (dist < _BOND_CUTOFF) & pair_exists & ~np.eye(14, dtype=bool)
    pro = rc.restype_order["P"]
    cd = rc.restype_name_to_atom14_names["PRO"].index("CD")
    bonded[pro, N_IDX, cd] = bonded[pro, cd, N_IDX] = True
    adj = bonded.astype(np.int64)
    near = (adj + adj @ adj) > 0  # 1-2 and 1-3 neighbours
    apply = pair_exists & ~near & np.triu(np.ones((14, 14), dtype=bool), k=1)[None]
    radii = _radii()
    lower = (radii[:, :, None] + radii[:, None, :]) * apply
    return lower.astype(np.float32), apply.astype(np.float32)


def _pairs(x: Tensor, y: Tensor, eps: float) -> Tensor:
    return torch.sqrt(eps + torch.sum((x - y) ** 2, dim=-1))


def between_residue_bond_loss(
    atom14: Tensor, exists: Tensor, residue_index: Tensor, aatype: Tensor, *, tolerance_factor: float = 12.0,
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """Peptide-bond length C(i)-N(i+1) and angles CA-C-N, C-N-CA against AF2's between-residue statistics.

    Each error beyond tolerance_factor x stddev is penalised linearly (flat-bottom). Returns c_n_loss,
    ca_c_n_loss, c_n_ca_loss [B] (means over connected pairs), per_residue_loss_sum [B, N] and
    per_residue_violation [B, N].
    """
    ca, c = atom14[:, :-1, CA_IDX], atom14[:, :-1, C_IDX]
    n_next, ca_next = atom14[:, 1:, N_IDX], atom14[:, 1:, CA_IDX]
    connected = (residue_index[:, 1:] - residue_index[:, :-1] == 1).to(atom14.dtype)
    proline = (aatype[:, 1:] == rc.restype_order["P"]).to(atom14.dtype)
    c_n = _pairs(c, n_next, eps)
    gt_len = rc.between_res_bond_length_c_n[0] * (1 - proline) + rc.between_res_bond_length_c_n[1] * proline
    gt_std = (rc.between_res_bond_length_stddev_c_n[0] * (1 - proline)
              + rc.between_res_bond_length_stddev_c_n[1] * proline)
    terms = {"c_n": (c_n, gt_len, gt_std, exists[:, :-1, C_IDX] * exists[:, 1:, N_IDX] * connected)}
    c_ca_unit = (ca - c) / _pairs(ca, c, eps)[..., None]
    c_n_unit = (n_next - c) / c_n[..., None]
    n_ca_unit = (ca_next - n_next) / _pairs(ca_next, n_next, eps)[..., None]
    mean, std = rc.between_res_cos_angles_ca_c_n
    terms["ca_c_n"] = (torch.sum(c_ca_unit * c_n_unit, -1), mean, std,
                       exists[:, :-1, CA_IDX] * exists[:, :-1, C_IDX] * exists[:, 1:, N_IDX] * connected)
    mean, std = rc.between_res_cos_angles_c_n_ca
    terms["c_n_ca"] = (torch.sum(-c_n_unit * n_ca_unit, -1), mean, std,
                       exists[:, :-1, C_IDX] * exists[:, 1:, N_IDX] * exists[:, 1:, CA_IDX] * connected)
    out: dict[str, Tensor] = {}
    per_link = torch.zeros_like(c_n)
    violated = torch.zeros_like(c_n)
    for name, (value, gt, std, mask) in terms.items():
        error = torch.sqrt(eps + (value - gt) ** 2)
        loss = torch.relu(error - tolerance_factor * std)
        out[f"{name}_loss"] = torch.sum(mask * loss, -1) / (torch.sum(mask, -1) + eps)
        per_link = per_link + mask * loss
        violated = torch.maximum(violated, mask * (error > tolerance_factor * std).to(c_n.dtype))
    pad = torch.nn.functional.pad
    out["per_residue_loss_sum"] = 0.5 * (pad(per_link, (0, 1)) + pad(per_link, (1, 0)))
    out["per_residue_violation"] = torch.maximum(pad(violated, (0, 1)), pad(violated, (1, 0)))
    return out


def between_residue_clash_loss(
    atom14: Tensor, exists: Tensor, residue_index: Tensor, aatype: Tensor, *, overlap_tolerance: float = 1.5,
    eps: float = 1e-10,
) -> dict[str, Tensor]:
    """Clashes between atoms of different residues: distance below r_vdW(a) + r_vdW(b) - overlap_tolerance.

    The peptide bond C(i)-N(i+1) and disulfide SG-SG pairs are excluded. Returns mean_loss [B] (per scored
    pair), per_atom_loss_sum [B, N, 14] and per_atom_clash [B, N, 14].
    """
    b, n = atom14.shape[:2]
    radius = torch.as_tensor(_radii(), device=atom14.device, dtype=atom14.dtype)[aatype]  # [B, N, 14]
    flat = atom14.reshape(b, n * 14, 3)
    dist = torch.sqrt(eps + torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2)
    dist = dist.reshape(b, n, 14, n, 14)
    later = (residue_index[:, :, None] < residue_index[:, None, :]).to(atom14.dtype)  # [B, N, N]
    mask = exists[:, :, :, None, None] * exists[:, None, None] * later[:, :, None, :, None]
    bond = (residue_index[:, :, None] + 1 == residue_index[:, None, :]).to(atom14.dtype)
    mask[:, :, C_IDX, :, N_IDX] = mask[:, :, C_IDX, :, N_IDX] * (1.0 - bond)
    cys = (aatype == rc.restype_order["C"]).to(atom14.dtype)
    mask[:, :, _CYS_SG, :, _CYS_SG] = mask[:, :, _CYS_SG, :, _CYS_SG] * (1.0 - cys[:, :, None] * cys[:, None, :])
    lower = radius[:, :, :, None, None] + radius[:, None, None] - overlap_tolerance
    error = mask * torch.relu(lower - dist)
    return {
        "mean_loss": torch.sum(error, dim=(1, 2, 3, 4)) / (1e-6 + torch.sum(mask, dim=(1, 2, 3, 4))),
        "per_atom_loss_sum": torch.sum(error, dim=(3, 4)) + torch.sum(error, dim=(1, 2)),
        "per_atom_clash": torch.maximum(
            torch.amax(mask * (dist < lower).to(dist.dtype), dim=(3, 4)),
            torch.amax(mask * (dist < lower).to(dist.dtype), dim=(1, 2)),
        ),
    }


def within_residue_clash_loss(
    atom14: Tensor, exists: Tensor, aatype: Tensor, *, overlap_tolerance: float = 1.5, eps: float = 1e-10
) -> dict[str, Tensor]:
    """Non-bonded clashes inside one residue (pairs beyond 1-3 in the covalent graph, see the AF2-DIFF note).

    Returns per_atom_loss_sum [B, N, 14] and per_atom_violation [B, N, 14].
    """
    lower_t, apply_t = (torch.as_tensor(a, device=atom14.device, dtype=atom14.dtype) for a in _intra_residue_tables())
    dist = torch.sqrt(eps + torch.sum((atom14[..., :, None, :] - atom14[..., None, :, :]) ** 2, dim=-1))
    mask = apply_t[aatype] * exists[..., :, None] * exists[..., None, :]
    lower = lower_t[aatype] - overlap_tolerance
    error = mask * torch.relu(lower - dist)
    hit = mask * (dist < lower).to(dist.dtype)
    return {
        "per_atom_loss_sum": error.sum(-1) + error.sum(-2),
        "per_atom_violation": torch.maximum(hit.amax(-1), hit.amax(-2)),
    }


def violation_loss(
    atom14: Tensor, exists: Tensor, residue_index: Tensor, aatype: Tensor, *, tolerance_factor: float = 12.0,
    overlap_tolerance: float = 1.5,
) -> Tensor:
    """AF2 supplement 1.9.11 Eq. 44-47: bond + angle terms plus clash energy per atom. [B, N, 14, 3] -> [B]."""
    bonds = between_residue_bond_loss(atom14, exists, residue_index, aatype, tolerance_factor=tolerance_factor)
    inter = between_residue_clash_loss(atom14, exists, residue_index, aatype, overlap_tolerance=overlap_tolerance)
    intra = within_residue_clash_loss(atom14, exists, aatype, overlap_tolerance=overlap_tolerance)
    clash = torch.sum(inter["per_atom_loss_sum"] + intra["per_atom_loss_sum"], dim=(-2, -1))
    clash = clash / (1e-6 + torch.sum(exists, dim=(-2, -1)))
    return bonds["c_n_loss"] + bonds["ca_c_n_loss"] + bonds["c_n_ca_loss"] + clash


__all__ = [
    "between_residue_bond_loss",
    "between_residue_clash_loss",
    "violation_loss",
    "within_residue_clash_loss",
]
