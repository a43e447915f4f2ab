"""Structure module (AF2 supplement 1.8): IPA, backbone update, torsion angles, all-atom coordinates.

Frames are `Rigid` objects in structure-module units (1 unit = `position_scale` Angstrom) inside the loop and
are reported in Angstrom. Frames, IPA points and quaternion updates always run in fp32 (`fp32_island`), also
under bf16 autocast.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from protfold.config import ModelConfig
from protfold.geometry import (
    Rigid,
    atom14_to_atom37,
    frames_to_atom14,
    rigid_from_quaternion_update,
    torsion_angles_to_frames,
)
from protfold.model.memory import fp32_island, recompute
from protfold.model.plan import MemoryPlan
from protfold.model.primitives import Linear

_MASK_LOGIT = -1e9  # fp32 logits only; a fully masked row becomes uniform, never NaN


def _fp32(x: Tensor) -> Tensor:
    """Up-cast half-precision tensors to fp32; fp32 and fp64 (gradcheck) stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class InvariantPointAttention(nn.Module):
    """AF2 supplement, Algorithm 22: attention over scalar features, frame-local 3D points and the pair bias.

    Point weights gamma_h = softplus(w_h) (initialised to 1), w_L = sqrt(1/3), w_C = sqrt(2 / (9 N_qk_points)).
    """

    def __init__(
        self, *, c_s: int, c_z: int, heads: int, head_dim: int, qk_points: int, v_points: int, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.qk_points, self.v_points, self.eps = heads, head_dim, qk_points, v_points, eps
        self.q = Linear(c_s, heads * head_dim)
        self.kv = Linear(c_s, 2 * heads * head_dim)
        self.q_pts = Linear(c_s, heads * qk_points * 3)
        self.kv_pts = Linear(c_s, heads * (qk_points + v_points) * 3)
        self.pair_bias = Linear(c_z, heads)
        self.head_weights = nn.Parameter(torch.full((heads,), math.log(math.e - 1.0)))  # softplus^-1(1)
        self.out = Linear(heads * (head_dim + c_z + 4 * v_points), c_s, init="final")

    def forward(self, s: Tensor, z: Tensor, frames: Rigid, mask: Tensor, *, rows: int | None = None,
                norm_z: nn.Module | None = None) -> Tensor:
        """s: [B, N, c_s], z: [B, N, N, c_z], frames: Rigid [B, N] (fp32), mask: [B, N] -> [B, N, c_s]

        `rows` (no grad): queries i in chunks of `rows`, so the logits [B, H, rows, N], the pair bias and the point
        differences exist for one chunk at a time; `norm_z` is then applied to each chunk's rows of z here (the
        caller passes z without its LayerNorm), so no normalised or fp32 copy of the whole pair is ever made.
        Exact: every query row is independent of the others.
        """
        h = self.heads
        q = rearrange(self.q(s), "b i (h c) -> b h i c", h=h)
        k, v = rearrange(self.kv(s), "b j (two h c) -> two b h j c", two=2, h=h).unbind(0)
        with fp32_island(s):
            q_pts, k_pts, v_pts = self._points(_fp32(s), frames)
        keys = (k, v, k_pts, v_pts, mask)
        if rows is None:
            return self._attend(q, z if norm_z is None else norm_z(z), q_pts, frames, mask, keys)
        out = None
        for start in range(0, s.shape[-2], rows):
            n = min(rows, s.shape[-2] - start)
            z_rows = z.narrow(1, start, n)
            part = self._attend(q.narrow(2, start, n), z_rows if norm_z is None else norm_z(z_rows),
                                q_pts.narrow(1, start, n), frames.map(lambda t, a=start, b=n: t.narrow(1, a, b)),
                                mask.narrow(1, start, n), keys)
            if out is None:
                out = part.new_empty(*part.shape[:1], s.shape[-2], part.shape[-1])
            out.narrow(1, start, n).copy_(part)
        return out

    def _attend(self, q: Tensor, z: Tensor, q_pts: Tensor, frames: Rigid, mask_i: Tensor,
                keys: tuple[Tensor, Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        """Queries i (q [B, H, n, c], z rows [B, n, N, c_z] normalised, q_pts [B, n, H, P, 3], their frames and
        mask [B, n]) against every key: Alg. 22 lines 7-11 -> [B, n, c_s]."""
        k, v, k_pts, v_pts, mask = keys
        bias = rearrange(self.pair_bias(z), "b i j h -> b h i j")
        with fp32_island(q):
            logits = self._logits(_fp32(q), _fp32(k), _fp32(bias), q_pts, k_pts, _fp32(mask_i), _fp32(mask))
            del bias
            attn = torch.softmax(logits, dim=-1)  # [B, H, n, N]
            del logits
            o_pts = torch.einsum("bhij,bjhpx->bihpx", attn, v_pts)
            o_pts = frames.unsqueeze(-1).unsqueeze(-1).invert_apply(o_pts)  # back to each frame i
            o_norm = torch.sqrt(torch.sum(o_pts**2, dim=-1) + self.eps)
        attn = attn.to(v.dtype)
        o = rearrange(torch.einsum("bhij,bhjc->bihc", attn, v), "b i h c -> b i (h c)")
        o_pair = rearrange(torch.einsum("bhij,bijc->bihc", attn, z.to(v.dtype)), "b i h c -> b i (h c)")
        feats = [o, rearrange(o_pts, "b i h p x -> b i (h p x)"), rearrange(o_norm, "b i h p -> b i (h p)"), o_pair]
        return self.out(torch.cat([f.to(o.dtype) for f in feats], dim=-1))

    def _points(self, s: Tensor, frames: Rigid) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value points in global coordinates: [B, N, H, P, 3] each (fp32)."""
        h, p_qk = self.heads, self.qk_points
        q_pts = rearrange(self.q_pts(s), "b i (h p x) -> b i h p x", h=h, x=3)
        kv_pts = rearrange(self.kv_pts(s), "b i (h p x) -> b i h p x", h=h, x=3)
        local = frames.map(_fp32).unsqueeze(-1).unsqueeze(-1)
        q_pts, kv_pts = local.apply(q_pts), local.apply(kv_pts)
        return q_pts, kv_pts[..., :p_qk, :], kv_pts[..., p_qk:, :]

    def _logits(self, q: Tensor, k: Tensor, bias: Tensor, q_pts: Tensor, k_pts: Tensor, mask_i: Tensor,
                mask_j: Tensor) -> Tensor:
        """Alg. 22 line 7: [B, H, n, N] fp32 attention logits of queries i against keys j, residue mask applied."""
        w_l = math.sqrt(1.0 / 3.0)
        w_c = math.sqrt(2.0 / (9.0 * self.qk_points))
        gamma = nn.functional.softplus(_fp32(self.head_weights)).view(1, -1, 1, 1)
        scalar = torch.einsum("bhic,bhjc->bhij", q, k) / math.sqrt(self.head_dim)
        diff = q_pts[:, :, None] - k_pts[:, None, :]  # [B, n, N, H, P, 3]
        dist2 = rearrange(torch.sum(diff**2, dim=(-1, -2)), "b i j h -> b h i j")
        del diff
        logits = w_l * (scalar + bias - 0.5 * gamma * w_c * dist2)
        pair_mask = mask_i[:, None, :, None] * mask_j[:, None, None, :]
        return logits.masked_fill(pair_mask == 0, _MASK_LOGIT)


class BackboneUpdate(nn.Module):
    """AF2 supplement, Algorithm 23: s_i -> frame update (quaternion (1, b, c, d), translation), in fp32."""

    def __init__(self, *, c_s: int) -> None:
        super().__init__()
        self.linear = Linear(c_s, 6, init="final")

    def forward(self, s: Tensor) -> Rigid:
        """s: [B, N, c_s] -> Rigid [B, N] (fp32)"""
        with fp32_island(s):
            return rigid_from_quaternion_update(self.linear(_fp32(s)))


class StructureTransition(nn.Module):
    """AF2 supplement, Algorithm 20 lines 8-9: three-layer residual MLP, dropout, LayerNorm."""

    def __init__(self, *, c_s: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            Linear(c_s, c_s, init="relu"), nn.ReLU(), Linear(c_s, c_s, init="relu"), nn.ReLU(),
            Linear(c_s, c_s, init="final"),
        )
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(c_s)

    def forward(self, s: Tensor) -> Tensor:
        """s: [B, N, c_s] -> [B, N, c_s]"""
        return self.norm(self.dropout(s + self.layers(s)))


class AngleResnet(nn.Module):
    """AF2 supplement, Algorithm 20 lines 11-14: torsion angles (omega, phi, psi, chi1-4) as 2D vectors.

    Inputs are passed through ReLU before the first linear layers, as in AF2's released code.
    """

    def __init__(self, *, c_s: int, c_resnet: int, n_blocks: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps
        self.linear_s = Linear(c_s, c_resnet)
        self.linear_initial = Linear(c_s, c_resnet)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), Linear(c_resnet, c_resnet, init="relu"), nn.ReLU(),
                          Linear(c_resnet, c_resnet, init="final"))
            for _ in range(n_blocks)
        )
        self.out = Linear(c_resnet, 14)

    def forward(self, s: Tensor, s_initial: Tensor) -> tuple[Tensor, Tensor]:
        """s, s_initial: [B, N, c_s] -> (unnormalised, normalised) angles, each [B, N, 7, 2] (sin, cos)."""
        a = self.linear_s(torch.relu(s)) + self.linear_initial(torch.relu(s_initial))
        for block in self.blocks:
            a = a + block(a)
        alpha = _fp32(rearrange(self.out(torch.relu(a)), "b n (k two) -> b n k two", two=2))
        norm = torch.sqrt(torch.clamp(torch.sum(alpha**2, dim=-1, keepdim=True), min=self.eps))
        return alpha, alpha / norm


class StructureModule(nn.Module):
    """AF2 supplement, Algorithm 20 (with Alg. 22-24): shared weights over `n_structure_layers` iterations.

    The rotation gradient is stopped between layers; reported frames and atoms are in Angstrom.
    `plan.recompute_structure` recomputes each layer in backward instead of keeping its intermediates.
    """

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm_s = nn.LayerNorm(cfg.c_s)
        self.norm_z = nn.LayerNorm(cfg.c_z)
        self.embed_s = Linear(cfg.c_s, cfg.c_s)
        self.ipa = InvariantPointAttention(
            c_s=cfg.c_s, c_z=cfg.c_z, heads=cfg.ipa_heads, head_dim=cfg.ipa_head_dim,
            qk_points=cfg.ipa_qk_points, v_points=cfg.ipa_v_points,
        )
        self.ipa_dropout = nn.Dropout(cfg.structure_dropout)
        self.ipa_norm = nn.LayerNorm(cfg.c_s)
        self.transition = StructureTransition(c_s=cfg.c_s, dropout=cfg.structure_dropout)
        self.backbone_update = BackboneUpdate(c_s=cfg.c_s)
        self.angle_resnet = AngleResnet(c_s=cfg.c_s, c_resnet=cfg.c_resnet, n_blocks=cfg.n_resnet_blocks)

    def forward(self, s: Tensor, z: Tensor, aatype: Tensor, mask: Tensor, frames: Rigid | None = None, *,
                plan: MemoryPlan) -> dict:
        """s: [B, N, c_s], z: [B, N, N, c_z], aatype: long [B, N], mask: [B, N] -> dict of outputs.

        `frames` (Rigid [B, N], structure-module units) replaces the identity start (Alg. 20 line 4); used
        by tests. Outputs: frames [L, B, N, 4, 4] (Angstrom), sidechain_frames [B, N, 8, 4, 4],
        unnormalized_angles / angles [L, B, N, 7, 2], positions [L, B, N, 14, 3], final_atom14 [B, N, 14, 3],
        final_atom37 [B, N, 37, 3], single [B, N, c_s].
        """
        s_initial = self.norm_s(s)
        # no grad with plan.structure_chunk: IPA normalises z's rows chunk by chunk
        rows = plan.structure_chunk
        z = self.norm_z(z) if rows is None else z
        s = self.embed_s(s_initial)
        if frames is None:
            frames = Rigid.identity(tuple(s.shape[:2]), dtype=_fp32(s).dtype, device=s.device)
        per_layer: list[dict[str, Tensor]] = []
        for layer in range(self.cfg.n_structure_layers):
            # With plan.recompute_structure the layer is recomputed in backward (same dropout masks): only
            # its inputs are kept, so at most one layer's intermediates live at a time.
            s, frames, out = recompute(partial(self.layer, rows=rows), s, s_initial, z, frames, aatype, mask,
                                       enabled=plan.recompute_structure)
            per_layer.append(out)
            if layer < self.cfg.n_structure_layers - 1:
                frames = frames.detach_rot()
        result = {key: torch.stack([o[key] for o in per_layer]) for key in per_layer[0] if key != "sidechain_frames"}
        result["sidechain_frames"] = per_layer[-1]["sidechain_frames"]
        result["final_atom14"] = result["positions"][-1]
        result["final_atom37"] = atom14_to_atom37(result["final_atom14"], aatype)
        result["single"] = s
        return result

    def layer(
        self, s: Tensor, s_initial: Tensor, z: Tensor, frames: Rigid, aatype: Tensor, mask: Tensor, *,
        rows: int | None = None,
    ) -> tuple[Tensor, Rigid, dict[str, Tensor]]:
        """One iteration of Alg. 20 (lines 6-10 and 11-14, plus Alg. 24): returns new s, frames, outputs.
        `rows` (no grad): IPA in query-row chunks of that many residues, z normalised chunk by chunk."""
        s = s + self.ipa(s, z, frames, mask, rows=rows, norm_z=None if rows is None else self.norm_z)
        s = self.ipa_norm(self.ipa_dropout(s))
        s = self.transition(s)
        update = self.backbone_update(s)
        unnormalized, angles = self.angle_resnet(s, s_initial)
        with fp32_island(s):
            frames = frames.compose(update)
            backbone = frames.scale_translation(self.cfg.position_scale)
            groups = torsion_angles_to_frames(backbone, angles, aatype)
            positions = frames_to_atom14(groups, aatype)
        out = {
            "frames": backbone.to_tensor_4x4(),
            "sidechain_frames": groups.to_tensor_4x4(),
            "unnormalized_angles": unnormalized,
            "angles": angles,
            "positions": positions,
        }
        return s, frames, out


__all__ = ["AngleResnet", "BackboneUpdate", "InvariantPointAttention", "StructureModule", "StructureTransition"]
