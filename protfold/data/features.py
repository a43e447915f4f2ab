"""Per-residue input features and ground truth from atom37 coordinates (AF2 supplement 1.2.9, 1.8, 1.9).

Everything here is vectorised torch on CPU, fp32, and takes cropped per-residue arrays:
  aatype [N] long (0..20), all_atom_positions [N, 37, 3], all_atom_mask [N, 37].

Conventions (the ones `protfold.geometry` and the losses use):
- backbone frame: origin CA, x-axis towards C, N in the xy-plane (`Rigid.from_3_points(N, CA, C)`);
- the 8 rigid groups of AF2 Table 2; ground-truth frames exist for the backbone (0), psi (3) and the
  chi groups of the residue type. Groups 1 (pre-omega) and 2 (phi) have no ground-truth frame: they
  involve atoms of the previous residue, as in AF2's `atom37_to_frames`;
- torsions [N, 7, 2] as (sin, cos) in `geometry.torsion_sin_cos`'s convention: omega, phi, psi,
  chi1..chi4. psi is measured with O (N, CA, C, O) and shifted by pi, which is AF2's convention: it
  equals the usual N-CA-C-N(i+1) psi up to O's small deviation from the peptide plane, and it is the
  angle Algorithm 24 rotates the psi group by (the psi default frame's y-axis points along CA - N).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from protfold import constants as rc
from protfold.geometry import Rigid, torsion_sin_cos

_N, _CA, _C, _CB, _O = (rc.atom_order[a] for a in ("N", "CA", "C", "CB", "O"))
_GLY = rc.restype_order["G"]


def _build_tables() -> dict[str, np.ndarray]:
    """Per residue type: the 3 base atoms (atom37) of each rigid group, existence, ambiguity."""
    n_types = rc.restype_num + 1
    # base atoms (point on -x axis, origin, point in xy-plane), AF2 `atom37_to_frames`
    base = np.zeros((n_types, 8, 3), dtype=np.int64)
    exists = np.zeros((n_types, 8), dtype=np.float32)
    base[:, 0] = [_C, _CA, _N]
    base[:, 3] = [_CA, _C, _O]
    exists[:, 0] = exists[:, 3] = 1.0  # X residues keep backbone and psi groups, as in AF2
    exists[: rc.restype_num, 4:] = rc.chi_angles_mask[: rc.restype_num]
    for r, name in enumerate(rc.resnames[: rc.restype_num]):
        for k, atoms in enumerate(rc.chi_angles_atoms[name]):
            base[r, 4 + k] = [rc.atom_order[a] for a in atoms[1:4]]
    ambiguous = np.zeros((n_types, 8), dtype=np.float32)
    ambiguous[:, 4:] = rc.chi_pi_periodic
    # 180-degree rotation about x for the pi-periodic group (alt frames), identity elsewhere
    flip = np.tile(np.eye(3, dtype=np.float32), (n_types, 8, 1, 1))
    flip[ambiguous > 0] = np.diag([1.0, -1.0, -1.0]).astype(np.float32)
    return {
        "group_base_atoms": base,
        "group_exists": exists,
        "group_is_ambiguous": ambiguous,
        "group_flip": flip,
        "chi_atoms": rc.chi_atom_indices,
        "chi_mask": rc.chi_angles_mask,
        "chi_pi_periodic": rc.chi_pi_periodic,
        "atom14_exists": rc.restype_atom14_mask,
        "atom37_exists": rc.restype_atom37_mask,
        "atom14_to_atom37": rc.restype_atom14_to_atom37,
        "atom37_to_atom14": rc.restype_atom37_to_atom14,
        "atom14_swap": rc.restype_atom14_swap_index,
        "atom14_ambiguous": rc.restype_atom14_is_ambiguous,
    }


_TABLES = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _build_tables().items()}


def _table(name: str, aatype: Tensor) -> Tensor:
    return _TABLES[name][aatype]


def _gather_atoms(x: Tensor, idx: Tensor) -> Tensor:
    """x [N, 37, ...], idx [N, ...k] atom37 indices -> [N, ...k, ...]."""
    n = x.shape[0]
    flat = idx.reshape(n, -1)
    out = torch.gather(x, 1, flat.reshape(n, -1, *([1] * (x.dim() - 2))).expand(n, flat.shape[1], *x.shape[2:]))
    return out.reshape(*idx.shape, *x.shape[2:])


def target_feat(aatype: Tensor) -> Tensor:
    """AF2 `make_target_feat`: [N] -> [N, 22].

    Channel 0 is AF2's `between_segment_residues` flag (always 0 for a single chain, as in the AF2 monomer
    pipeline); channels 1..21 are the one-hot residue type over the 20 amino acids and X.
    """
    out = torch.zeros(*aatype.shape, 22)
    out[..., 1:] = torch.nn.functional.one_hot(aatype, rc.restype_num + 1).float()
    return out


def atom_maps(aatype: Tensor) -> dict[str, Tensor]:
    """Atom existence and index maps by residue type (AF2 `make_atom14_masks`)."""
    return {
        "atom14_atom_exists": _table("atom14_exists", aatype),
        "atom37_atom_exists": _table("atom37_exists", aatype),
        "residx_atom14_to_atom37": _table("atom14_to_atom37", aatype),
        "residx_atom37_to_atom14": _table("atom37_to_atom14", aatype),
        "atom14_atom_is_ambiguous": _table("atom14_ambiguous", aatype),
    }


def atom14_ground_truth(aatype: Tensor, positions: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Atom14 ground truth and its ambiguous-swapped twin (AF2 `make_atom14_positions`).

    positions [N, 37, 3], mask [N, 37] -> atom14_gt_positions [N, 14, 3], atom14_gt_exists [N, 14],
    atom14_alt_gt_positions, atom14_alt_gt_exists (ASP OD1/OD2, GLU OE1/OE2, PHE and TYR CD1/CD2, CE1/CE2
    swapped). Positions are zero where the atom is absent.
    """
    idx = _table("atom14_to_atom37", aatype)
    exists = _table("atom14_exists", aatype)
    gt_exists = _gather_atoms(mask, idx) * exists
    gt_pos = _gather_atoms(positions, idx) * gt_exists[..., None]
    swap = _table("atom14_swap", aatype)
    alt_pos = torch.gather(gt_pos, 1, swap[..., None].expand(-1, -1, 3))
    alt_exists = torch.gather(gt_exists, 1, swap)
    return {
        "atom14_gt_positions": gt_pos,
        "atom14_gt_exists": gt_exists,
        "atom14_alt_gt_positions": alt_pos,
        "atom14_alt_gt_exists": alt_exists,
    }


def _frames_from_points(neg_x: Tensor, origin: Tensor, xy: Tensor) -> Rigid:
    """Frame with its origin at `origin`, x-axis pointing away from `neg_x`, `xy` in the xy-plane."""
    return Rigid.from_3_points(xy, origin, 2.0 * origin - neg_x)


def backbone_frames(positions: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """backbone_rigid_tensor [N, 4, 4] (origin CA, x to C, N in xy-plane) and backbone_rigid_mask [N]."""
    rigid = Rigid.from_3_points(positions[:, _N], positions[:, _CA], positions[:, _C])
    ok = mask[:, _N] * mask[:, _CA] * mask[:, _C]
    return {"backbone_rigid_tensor": _identity_where_missing(rigid.to_tensor_4x4(), ok), "backbone_rigid_mask": ok}


def _identity_where_missing(frames: Tensor, ok: Tensor) -> Tensor:
    eye = torch.eye(4, dtype=frames.dtype)
    return torch.where(ok[..., None, None] > 0, frames, eye)


def rigid_group_frames(aatype: Tensor, positions: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Ground-truth frames of the 8 rigid groups (AF2 `atom37_to_frames`).

    Returns rigidgroups_gt_frames [N, 8, 4, 4], rigidgroups_alt_gt_frames (pi-periodic chi group rotated by
    180 degrees about x), rigidgroups_gt_exists [N, 8] (group exists and its 3 base atoms are observed),
    rigidgroups_group_exists [N, 8], rigidgroups_group_is_ambiguous [N, 8]. Missing frames are identity.
    """
    base = _table("group_base_atoms", aatype)  # [N, 8, 3]
    pts = _gather_atoms(positions, base)  # [N, 8, 3, 3]
    frames = _frames_from_points(pts[..., 0, :], pts[..., 1, :], pts[..., 2, :])
    # the backbone group is the backbone frame: x towards C (AF2 flips its (C, CA, N) frame to get this)
    bb = Rigid.from_3_points(positions[:, _N], positions[:, _CA], positions[:, _C])
    frames = Rigid(torch.cat([bb.rot[:, None], frames.rot[:, 1:]], 1), torch.cat([bb.trans[:, None], frames.trans[:, 1:]], 1))
    group_exists = _table("group_exists", aatype)
    gt_exists = _gather_atoms(mask, base).prod(-1) * group_exists
    alt = Rigid(frames.rot @ _table("group_flip", aatype), frames.trans)
    return {
        "rigidgroups_gt_frames": _identity_where_missing(frames.to_tensor_4x4(), gt_exists),
        "rigidgroups_alt_gt_frames": _identity_where_missing(alt.to_tensor_4x4(), gt_exists),
        "rigidgroups_gt_exists": gt_exists,
        "rigidgroups_group_exists": group_exists,
        "rigidgroups_group_is_ambiguous": _table("group_is_ambiguous", aatype),
    }


def previous_residue_atoms(positions: Tensor, mask: Tensor, residue_index: Tensor) -> tuple[Tensor, Tensor]:
    """Atoms of the preceding residue along the array, masked where residue_index does not step by 1.

    AF2-DIFF: AF2 uses the previous array row even across gaps in the chain; a gap then yields a bogus
    omega/phi. Here they are masked out.
    """
    prev_pos = torch.cat([torch.zeros_like(positions[:1]), positions[:-1]], dim=0)
    prev_mask = torch.cat([torch.zeros_like(mask[:1]), mask[:-1]], dim=0)
    step = torch.ones_like(residue_index, dtype=torch.bool)
    step[1:] = (residue_index[1:] - residue_index[:-1]) == 1
    step[0] = False
    return prev_pos, prev_mask * step[:, None].to(mask.dtype)


def torsion_angles(
    aatype: Tensor, positions: Tensor, mask: Tensor, prev_positions: Tensor, prev_mask: Tensor
) -> dict[str, Tensor]:
    """Ground-truth torsions (AF2 `atom37_to_torsion_angles`), 7 per residue: omega, phi, psi, chi1..4.

    prev_positions [N, 37, 3] / prev_mask [N, 37]: atoms of each residue's predecessor in the chain
    (`previous_residue_atoms`, or gathered from the uncropped chain so crop edges keep omega and phi).
    Returns torsion_angles_sin_cos [N, 7, 2], alt_torsion_angles_sin_cos (pi-periodic chis shifted by pi),
    torsion_angles_mask [N, 7], chi_angles_sin_cos [N, 4, 2], chi_mask [N, 4]. Masked angles are set to
    angle 0 (sin 0, cos 1) so they stay valid rotations.
    """
    n_ = positions[:, _N]
    ca, c, o = positions[:, _CA], positions[:, _C], positions[:, _O]
    p_ca, p_c = prev_positions[:, _CA], prev_positions[:, _C]
    chi_idx = _table("chi_atoms", aatype)  # [N, 4, 4]
    chi_pts = _gather_atoms(positions, chi_idx)  # [N, 4, 4, 3]
    quads = torch.stack(
        [
            torch.stack([p_ca, p_c, n_, ca], dim=1),  # omega
            torch.stack([p_c, n_, ca, c], dim=1),  # phi
            torch.stack([n_, ca, c, o], dim=1),  # psi (with O, see module docstring)
        ],
        dim=1,
    )  # [N, 3, 4, 3]
    quads = torch.cat([quads, chi_pts], dim=1)  # [N, 7, 4, 3]
    sin_cos = torsion_sin_cos(quads[..., 0, :], quads[..., 1, :], quads[..., 2, :], quads[..., 3, :])
    sin_cos[:, 2] = -sin_cos[:, 2]  # psi: AF2's mirror_psi_mask

    bb_mask = torch.stack(
        [
            prev_mask[:, _CA] * prev_mask[:, _C] * mask[:, _N] * mask[:, _CA],
            prev_mask[:, _C] * mask[:, _N] * mask[:, _CA] * mask[:, _C],
            mask[:, _N] * mask[:, _CA] * mask[:, _C] * mask[:, _O],
        ],
        dim=1,
    )
    chi_mask = _table("chi_mask", aatype) * _gather_atoms(mask, chi_idx).prod(-1)
    tmask = torch.cat([bb_mask, chi_mask], dim=1)
    zero_angle = torch.tensor([0.0, 1.0])
    sin_cos = torch.where(tmask[..., None] > 0, sin_cos, zero_angle)
    flip = torch.ones_like(tmask)
    flip[:, 3:] = 1.0 - 2.0 * _table("chi_pi_periodic", aatype)
    alt = sin_cos * flip[..., None]
    return {
        "torsion_angles_sin_cos": sin_cos,
        "alt_torsion_angles_sin_cos": alt,
        "torsion_angles_mask": tmask,
        "chi_angles_sin_cos": sin_cos[:, 3:],
        "chi_mask": chi_mask,
    }


def pseudo_beta(aatype: Tensor, positions: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """CB position (CA for glycine) [N, 3] and its mask [N] (AF2 `pseudo_beta_fn`)."""
    is_gly = (aatype == _GLY)
    pos = torch.where(is_gly[:, None], positions[:, _CA], positions[:, _CB])
    m = torch.where(is_gly, mask[:, _CA], mask[:, _CB])
    return {"pseudo_beta": pos * m[:, None], "pseudo_beta_mask": m}


def ground_truth(
    aatype: Tensor,
    positions: Tensor,
    mask: Tensor,
    *,
    prev_positions: Tensor,
    prev_mask: Tensor,
) -> dict[str, Tensor]:
    """All structure-derived features of one (cropped) chain; see the functions above for each key."""
    positions = positions * mask[..., None]
    out = {"all_atom_positions": positions, "all_atom_mask": mask}
    maps = atom_maps(aatype)
    maps.pop("residx_atom37_to_atom14")
    out.update(maps)
    out.update(atom14_ground_truth(aatype, positions, mask))
    out.update(backbone_frames(positions, mask))
    out.update(rigid_group_frames(aatype, positions, mask))
    out.update(torsion_angles(aatype, positions, mask, prev_positions, prev_mask))
    out.update(pseudo_beta(aatype, positions, mask))
    return out
