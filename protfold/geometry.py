"""Rigid frames, quaternions, torsions -> rigid groups -> atoms (AF2 supplement 1.8).

Used by the data pipeline (ground-truth frames and torsions) and by the model (structure module), so it
sits below both. Frames are (rotation [*, 3, 3], translation [*, 3]); a frame maps local coordinates to
global ones: x_global = R @ x_local + t. Callers keep these in fp32 (the model's fp32 island).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from protfold import constants as rc


@dataclass(frozen=True)
class Rigid:
    """A batch of rigid transforms. rot: [*, 3, 3], trans: [*, 3]."""

    rot: Tensor
    trans: Tensor

    @staticmethod
    def identity(shape: tuple[int, ...], *, dtype=torch.float32, device=None) -> Rigid:
        rot = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        return Rigid(rot, torch.zeros(*shape, 3, dtype=dtype, device=device))

    @staticmethod
    def from_3_points(x1: Tensor, x2: Tensor, x3: Tensor, eps: float = 1e-8) -> Rigid:
        """AF2 supplement Algorithm 21: origin x2, x-axis towards x3, x1 in the xy-plane.

        For backbone frames call with (N, CA, C). x*: [*, 3].
        """
        v1 = x3 - x2
        v2 = x1 - x2
        e1 = v1 / torch.sqrt(torch.sum(v1**2, dim=-1, keepdim=True) + eps)
        u2 = v2 - e1 * torch.sum(e1 * v2, dim=-1, keepdim=True)
        e2 = u2 / torch.sqrt(torch.sum(u2**2, dim=-1, keepdim=True) + eps)
        e3 = torch.cross(e1, e2, dim=-1)
        return Rigid(torch.stack([e1, e2, e3], dim=-1), x2)

    @staticmethod
    def from_tensor_4x4(t: Tensor) -> Rigid:
        return Rigid(t[..., :3, :3], t[..., :3, 3])

    def to_tensor_4x4(self) -> Tensor:
        out = self.rot.new_zeros(*self.rot.shape[:-2], 4, 4)
        out[..., :3, :3] = self.rot
        out[..., :3, 3] = self.trans
        out[..., 3, 3] = 1.0
        return out

    @property
    def shape(self) -> torch.Size:
        return self.trans.shape[:-1]

    def __getitem__(self, index) -> Rigid:
        if not isinstance(index, tuple):
            index = (index,)
        return Rigid(self.rot[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def unsqueeze(self, dim: int) -> Rigid:
        """Insert a batch dimension (dim counts over the batch dims only)."""
        if dim >= 0:
            return Rigid(self.rot.unsqueeze(dim), self.trans.unsqueeze(dim))
        return Rigid(self.rot.unsqueeze(dim - 2), self.trans.unsqueeze(dim - 1))

    def compose(self, other: Rigid) -> Rigid:
        """self ∘ other: apply other first, then self."""
        rot = self.rot @ other.rot
        trans = (self.rot @ other.trans.unsqueeze(-1)).squeeze(-1) + self.trans
        return Rigid(rot, trans)

    def apply(self, points: Tensor) -> Tensor:
        """points [*, 3] (broadcast against the frame's batch) -> R p + t."""
        return torch.einsum("...ij,...j->...i", self.rot, points) + self.trans

    def invert_apply(self, points: Tensor) -> Tensor:
        """points [*, 3] -> R^T (p - t)."""
        return torch.einsum("...ji,...j->...i", self.rot, points - self.trans)

    def detach_rot(self) -> Rigid:
        """AF2 stops the rotation gradient between structure-module layers (supplement 1.8.3)."""
        return Rigid(self.rot.detach(), self.trans)

    def scale_translation(self, factor: float) -> Rigid:
        return Rigid(self.rot, self.trans * factor)

    def to(self, dtype: torch.dtype) -> Rigid:
        return Rigid(self.rot.to(dtype), self.trans.to(dtype))

    def map(self, fn) -> Rigid:
        """Apply a tensor function to rot and trans alike, e.g. lambda x: x.expand(...)."""
        return Rigid(fn(self.rot), fn(self.trans))

    @staticmethod
    def cat(rigids: list[Rigid], dim: int) -> Rigid:
        """Concatenate along a batch dimension (dim counts over the batch dims only)."""
        rot_dim, trans_dim = (dim, dim) if dim >= 0 else (dim - 2, dim - 1)
        return Rigid(torch.cat([r.rot for r in rigids], dim=rot_dim), torch.cat([r.trans for r in rigids], dim=trans_dim))


def quaternion_to_rotation(q: Tensor) -> Tensor:
    """Unit quaternions q = (a, b, c, d) [*, 4] -> rotation matrices [*, 3, 3] (AF2 Algorithm 23)."""
    q = q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    a, b, c, d = q.unbind(-1)
    rows = [
        a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c),
        2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b),
        2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d,
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def rigid_from_quaternion_update(update: Tensor) -> Rigid:
    """Backbone update (AF2 Algorithm 23): update [*, 6] = (b, c, d, t_x, t_y, t_z), quaternion (1, b, c, d)."""
    ones = torch.ones_like(update[..., :1])
    return Rigid(quaternion_to_rotation(torch.cat([ones, update[..., :3]], dim=-1)), update[..., 3:])


def torsion_sin_cos(a0: Tensor, a1: Tensor, a2: Tensor, a3: Tensor, eps: float = 1e-8) -> Tensor:
    """Torsion of four atoms [*, 3] as (sin, cos) [*, 2], in AF2's convention (supplement 1.8.1).

    The frame has its origin at a2, its x-axis along a1 -> a2 and a0 in its xy-plane; the angle is that
    of a3 about the x-axis, atan2(z, y). This is the rotation Algorithm 24 applies about x.
    """
    e0 = a2 - a1
    e0 = e0 / torch.sqrt(torch.sum(e0**2, dim=-1, keepdim=True) + eps)
    v = a0 - a2
    e1 = v - e0 * torch.sum(e0 * v, dim=-1, keepdim=True)
    e1 = e1 / torch.sqrt(torch.sum(e1**2, dim=-1, keepdim=True) + eps)
    e2 = torch.cross(e0, e1, dim=-1)
    rel = a3 - a2
    y, z = torch.sum(rel * e1, dim=-1), torch.sum(rel * e2, dim=-1)
    norm = torch.sqrt(y * y + z * z + eps)
    return torch.stack([z / norm, y / norm], dim=-1)


def _rotation_about_x(sin_cos: Tensor) -> Rigid:
    """sin_cos [*, 2] -> rigid rotating about the x-axis by that angle (AF2 Algorithm 25 makeRotX)."""
    s, c = sin_cos[..., 0], sin_cos[..., 1]
    zeros, ones = torch.zeros_like(s), torch.ones_like(s)
    rot = torch.stack([ones, zeros, zeros, zeros, c, -s, zeros, s, c], dim=-1).reshape(*s.shape, 3, 3)
    return Rigid(rot, torch.zeros(*s.shape, 3, dtype=s.dtype, device=s.device))


def _table(array, like: Tensor) -> Tensor:
    return torch.as_tensor(array, device=like.device)


def torsion_angles_to_frames(backbone: Rigid, angles: Tensor, aatype: Tensor) -> Rigid:
    """AF2 Algorithm 24 (lines 1-10): frames of the 8 rigid groups in global coordinates.

    backbone: [*, N]; angles: [*, N, 7, 2] (sin, cos) for omega, phi, psi, chi1..4; aatype: [*, N].
    Returns Rigid [*, N, 8].
    """
    default = Rigid.from_tensor_4x4(_table(rc.restype_rigid_group_default_frame, angles).to(angles.dtype)[aatype])
    # group 0 (backbone) gets angle 0: sin 0, cos 1
    zero_angle = torch.zeros_like(angles[..., :1, :])
    zero_angle[..., 1] = 1.0
    rotations = _rotation_about_x(torch.cat([zero_angle, angles], dim=-2))  # [*, N, 8]
    local = default.compose(rotations)
    # chi2..chi4 frames are given in the previous chi frame: chain them
    chi_frames = [local[..., 4]]
    for k in range(5, 8):
        chi_frames.append(chi_frames[-1].compose(local[..., k]))
    groups = Rigid.cat([local[..., :5]] + [f.unsqueeze(-1) for f in chi_frames[1:]], dim=-1)
    return backbone.unsqueeze(-1).compose(groups)


def frames_to_atom14(frames: Rigid, aatype: Tensor) -> Tensor:
    """AF2 Algorithm 24 (line 11): atom14 positions [*, N, 14, 3] from group frames [*, N, 8]."""
    group = _table(rc.restype_atom14_to_rigid_group, frames.trans)[aatype]  # [*, N, 14]
    local = _table(rc.restype_atom14_rigid_group_positions, frames.trans).to(frames.trans.dtype)[aatype]
    mask = _table(rc.restype_atom14_mask, frames.trans).to(frames.trans.dtype)[aatype]
    rot = torch.gather(frames.rot, -3, group[..., None, None].expand(*group.shape, 3, 3))
    trans = torch.gather(frames.trans, -2, group[..., None].expand(*group.shape, 3))
    return Rigid(rot, trans).apply(local) * mask[..., None]


def _regather(atoms: Tensor, aatype: Tensor, index_table, mask_table) -> Tensor:
    """Re-index the atom axis (the one after aatype's dims) by residue type; slots a type lacks are zero."""
    idx = _table(index_table, atoms)[aatype]  # [*, N, A_out]
    mask = _table(mask_table, atoms).to(atoms.dtype)[aatype]
    extra = atoms.shape[aatype.dim() + 1 :]
    trailing = (1,) * len(extra)
    gathered = torch.gather(atoms, aatype.dim(), idx.reshape(*idx.shape, *trailing).expand(*idx.shape, *extra))
    return gathered * mask.reshape(*mask.shape, *trailing)


def atom14_to_atom37(atom14: Tensor, aatype: Tensor) -> Tensor:
    """[*, N, 14, ...] -> [*, N, 37, ...] by residue type (missing slots zero)."""
    return _regather(atom14, aatype, rc.restype_atom37_to_atom14, rc.restype_atom37_mask)


def atom37_to_atom14(atom37: Tensor, aatype: Tensor) -> Tensor:
    """[*, N, 37, ...] -> [*, N, 14, ...] by residue type (missing slots zero)."""
    return _regather(atom37, aatype, rc.restype_atom14_to_atom37, rc.restype_atom14_mask)
