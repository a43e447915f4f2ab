"""AlphaFold2 training losses (AF2 supplement 1.9) as pure functions, and `alphafold_loss` combining them.

Every term returns a per-example loss [B]; `alphafold_loss` weights them (`LossConfig`), scales each example
by sqrt(min(N_res, crop)) like OpenFold and averages over the batch. Structural violations live in
`protfold.violations`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protfold import constants as rc
from protfold.config import LossConfig
from protfold.geometry import Rigid
from protfold.metrics import lddt
from protfold.numerics import recompute, upcast
from protfold.violations import violation_loss

# Side-chain FAPE (every frame x every atom) and Alg. 26's atom-pair distances are computed in chunks that keep
# one [B, chunk, ..., 3] fp32 tensor under this many bytes: at crop 256 the whole [B, 8N, 14N, 3] tensor is
# 88 MB and the loss held several of them (plus [B, N, 14, N, 14] distance tensors) at once. Exact: only the
# summation order of the final masked sums changes.
_FAPE_CHUNK_BYTES = 16 * 2**20


def _rigid(frames: Tensor | Rigid) -> Rigid:
    return frames if isinstance(frames, Rigid) else Rigid.from_tensor_4x4(frames)


def _masked_mean(value: Tensor, mask: Tensor, dims: tuple[int, ...], eps: float = 1e-8) -> Tensor:
    return torch.sum(value * mask, dim=dims) / (eps + torch.sum(mask, dim=dims))


def fape(
    pred_frames: Rigid, true_frames: Rigid, frames_mask: Tensor, pred_pos: Tensor, true_pos: Tensor,
    pos_mask: Tensor, *, length_scale: float, clamp: float | None, use_clamped: bool | Tensor = True,
    eps: float = 1e-4, frame_chunk: int | None = None,
) -> Tensor:
    """Frame aligned point error, AF2 supplement Algorithm 28.

    frames: Rigid [*, F]; frames_mask: [*, F]; positions: [*, A, 3]; pos_mask: [*, A] -> [*].
    Each point j is expressed in each frame i of both structures; the error sqrt(|.|^2 + eps) is clamped at
    `clamp` where `use_clamped` (bool or bool tensor broadcasting to [*]), divided by `length_scale` and
    averaged over all (frame, point) pairs with both masks set.

    `frame_chunk`: the same value computed `frame_chunk` frames at a time (the masked error sums of the chunks
    are added), each chunk recomputed in backward, so no [*, F, A, 3] tensor is built or kept (only chunks).
    """
    n_frames = frames_mask.shape[-1]
    if frame_chunk is not None and frame_chunk < n_frames:
        num: Tensor | None = None
        den: Tensor | None = None
        for start in range(0, n_frames, frame_chunk):
            n = min(frame_chunk, n_frames - start)
            part_num, part_den = recompute(
                _fape_sums, pred_frames.rot.narrow(-3, start, n), pred_frames.trans.narrow(-2, start, n),
                true_frames.rot.narrow(-3, start, n), true_frames.trans.narrow(-2, start, n),
                frames_mask.narrow(-1, start, n), pred_pos, true_pos, pos_mask, length_scale, clamp, use_clamped, eps)
            num = part_num if num is None else num + part_num
            den = part_den if den is None else den + part_den
        return num / (eps + den)  # type: ignore[operator]
    local_pred = pred_frames.unsqueeze(-1).invert_apply(pred_pos[..., None, :, :])  # [*, F, A, 3]
    local_true = true_frames.unsqueeze(-1).invert_apply(true_pos[..., None, :, :])
    dist = torch.sqrt(torch.sum((local_pred - local_true) ** 2, dim=-1) + eps)  # [*, F, A]
    if clamp is not None:
        clamped = torch.clamp(dist, max=clamp)
        flag = torch.as_tensor(use_clamped, device=dist.device, dtype=torch.bool)
        dist = torch.where(flag[..., None, None], clamped, dist)
    pair_mask = frames_mask[..., :, None] * pos_mask[..., None, :]
    return _masked_mean(dist / length_scale, pair_mask, (-2, -1), eps=eps)


def _fape_sums(
    pred_rot: Tensor, pred_trans: Tensor, true_rot: Tensor, true_trans: Tensor, frames_mask: Tensor,
    pred_pos: Tensor, true_pos: Tensor, pos_mask: Tensor, length_scale: float, clamp: float | None,
    use_clamped: bool | Tensor, eps: float,
) -> tuple[Tensor, Tensor]:
    """Masked sum of the FAPE errors and of the pair mask over frames (a chunk of them) and points: ([*], [*])."""
    local_pred = Rigid(pred_rot, pred_trans).unsqueeze(-1).invert_apply(pred_pos[..., None, :, :])
    local_true = Rigid(true_rot, true_trans).unsqueeze(-1).invert_apply(true_pos[..., None, :, :])
    dist = torch.sqrt(torch.sum((local_pred - local_true) ** 2, dim=-1) + eps)
    if clamp is not None:
        clamped = torch.clamp(dist, max=clamp)
        flag = torch.as_tensor(use_clamped, device=dist.device, dtype=torch.bool)
        dist = torch.where(flag[..., None, None], clamped, dist)
    pair_mask = frames_mask[..., :, None] * pos_mask[..., None, :]
    return torch.sum(dist / length_scale * pair_mask, dim=(-2, -1)), torch.sum(pair_mask, dim=(-2, -1))


def fape_frame_chunk(n_points: int, batch: int = 1, budget_bytes: int | None = None) -> int:
    """Frames per FAPE chunk so that one [batch, chunk, n_points, 3] fp32 tensor stays under `budget_bytes`
    (default `_FAPE_CHUNK_BYTES`)."""
    budget = _FAPE_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // max(1, batch * n_points * 3 * 4))


def backbone_fape_loss(
    pred_frames: Tensor, true_frames: Tensor, frames_mask: Tensor, *, use_clamped: bool | Tensor,
    clamp: float = 10.0, length_scale: float = 10.0, eps: float = 1e-4,
) -> Tensor:
    """Backbone FAPE on frame origins (Ca), averaged over structure-module layers (AF2 supplement 1.9.2).

    pred_frames: [L, B, N, 4, 4] (Angstrom); true_frames: [B, N, 4, 4]; frames_mask: [B, N];
    use_clamped: bool or bool [B] -> [B].
    """
    pred, true = _rigid(pred_frames), _rigid(true_frames)
    per_layer = fape(pred, true, frames_mask, pred.trans, true.trans, frames_mask, length_scale=length_scale,
                     clamp=clamp, use_clamped=use_clamped, eps=eps)  # [L, B] by broadcasting
    return per_layer.mean(dim=0)


def renamed_ground_truth(
    pred_atom14: Tensor, gt: Tensor, alt_gt: Tensor, gt_exists: Tensor, alt_gt_exists: Tensor,
    is_ambiguous: Tensor, eps: float = 1e-10, residue_chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """AF2 supplement, Algorithm 26: pick per residue the naming of symmetric atoms closest to the prediction.

    The choice compares distances from the ambiguous atoms of residue i to all non-ambiguous atoms.
    pred_atom14, gt, alt_gt: [B, N, 14, 3]; masks [B, N, 14]. Returns (alt_is_better [B, N] float,
    renamed positions [B, N, 14, 3], renamed exists [B, N, 14]). `residue_chunk`: the same result computed
    for that many residues i at a time (each residue's sums are unchanged), so no [B, N, 14, N, 14] tensor
    exists, only [B, chunk, 14, N, 14] ones.
    """
    b, n = gt.shape[:2]

    def pair_dist(x: Tensor, start: int, rows: int) -> Tensor:  # [B, rows, 14, N, 14]
        flat = x.reshape(b, n * 14, 3)
        d = torch.cdist(flat[:, start * 14 : (start + rows) * 14], flat, compute_mode="donot_use_mm_for_euclid_dist")
        return torch.sqrt(eps + d**2).reshape(b, rows, 14, n, 14)

    def residue_sums(start: int, rows: int) -> tuple[Tensor, Tensor]:
        d_pred = pair_dist(pred_atom14, start, rows)
        err = torch.sqrt(eps + (d_pred - pair_dist(gt, start, rows)) ** 2)
        alt_err = torch.sqrt(eps + (d_pred - pair_dist(alt_gt, start, rows)) ** 2)
        amb = (gt_exists * is_ambiguous)[:, start : start + rows]
        mask = amb[:, :, :, None, None] * (gt_exists * (1.0 - is_ambiguous))[:, None, None]
        return torch.sum(mask * err, dim=(2, 3, 4)), torch.sum(mask * alt_err, dim=(2, 3, 4))

    step = n if residue_chunk is None else max(1, residue_chunk)
    sums = [residue_sums(start, min(step, n - start)) for start in range(0, n, step)]
    per_res = torch.cat([p for p, _ in sums], dim=1)
    alt_per_res = torch.cat([a for _, a in sums], dim=1)
    alt_better = (alt_per_res < per_res).to(gt.dtype)  # [B, N]
    w = alt_better[..., None]
    return alt_better, (1.0 - w[..., None]) * gt + w[..., None] * alt_gt, (1.0 - w) * gt_exists + w * alt_gt_exists


def sidechain_fape_loss(
    pred_frames: Tensor, pred_atom14: Tensor, gt_frames: Tensor, alt_gt_frames: Tensor, frames_exist: Tensor,
    alt_better: Tensor, renamed_atom14: Tensor, renamed_exists: Tensor, *, clamp: float = 10.0,
    length_scale: float = 10.0, eps: float = 1e-4, frame_chunk: int | None = None,
) -> Tensor:
    """All-atom FAPE over all 8 rigid groups and all atom14 atoms, with Alg. 26 renaming (supplement 1.9.3).

    pred_frames, gt_frames, alt_gt_frames: [B, N, 8, 4, 4]; frames_exist [B, N, 8]; pred_atom14 /
    renamed_atom14 [B, N, 14, 3]; renamed_exists [B, N, 14]; alt_better [B, N] -> [B]. Always clamped.
    `frame_chunk`: see `fape` (the same value, computed over that many of the 8N frames at a time).
    """
    w = alt_better[..., None, None, None]
    true_frames = (1.0 - w) * gt_frames + w * alt_gt_frames
    b = pred_atom14.shape[0]
    pred_r = _rigid(pred_frames.reshape(b, -1, 4, 4))
    true_r = _rigid(true_frames.reshape(b, -1, 4, 4))
    return fape(pred_r, true_r, frames_exist.reshape(b, -1), pred_atom14.reshape(b, -1, 3),
                renamed_atom14.reshape(b, -1, 3), renamed_exists.reshape(b, -1), length_scale=length_scale,
                clamp=clamp, use_clamped=True, eps=eps, frame_chunk=frame_chunk)


def torsion_angle_loss(
    angles: Tensor, unnormalized_angles: Tensor, aatype: Tensor, chi_sin_cos: Tensor, chi_mask: Tensor,
    seq_mask: Tensor, *, chi_weight: float = 0.5, angle_norm_weight: float = 0.01, eps: float = 1e-6,
) -> Tensor:
    """AF2 supplement, Algorithm 27: chi-angle loss with pi-periodic alternatives, plus the angle-norm term.

    angles / unnormalized_angles: [L, B, N, 7, 2] (omega, phi, psi, chi1-4 as sin, cos); chi_sin_cos:
    [B, N, 4, 2]; chi_mask: [B, N, 4]; seq_mask: [B, N] -> [B], averaged over layers.
    """
    periodic = torch.as_tensor(rc.chi_pi_periodic, device=aatype.device, dtype=angles.dtype)[aatype]  # [B, N, 4]
    shifted = chi_sin_cos * (1.0 - 2.0 * periodic)[..., None]  # chi + pi for pi-periodic chis
    pred_chi = angles[..., 3:, :]
    sq = torch.sum((pred_chi - chi_sin_cos) ** 2, dim=-1)
    sq_alt = torch.sum((pred_chi - shifted) ** 2, dim=-1)
    chi_loss = _masked_mean(torch.minimum(sq, sq_alt), chi_mask.expand_as(sq), (0, -2, -1))
    norm = torch.sqrt(torch.sum(unnormalized_angles**2, dim=-1) + eps)  # [L, B, N, 7]
    norm_mask = seq_mask[..., None].expand_as(norm)
    norm_loss = _masked_mean(torch.abs(norm - 1.0), norm_mask, (0, -2, -1))
    return chi_weight * chi_loss + angle_norm_weight * norm_loss


def distogram_loss(
    logits: Tensor, pseudo_beta: Tensor, pseudo_beta_mask: Tensor, *, min_bin: float = 2.3125,
    max_bin: float = 21.6875,
) -> Tensor:
    """AF2 supplement 1.9.8: cross-entropy of pair distances binned at linspace(min_bin, max_bin, bins - 1).

    logits: [B, N, N, bins]; pseudo_beta: [B, N, 3]; pseudo_beta_mask: [B, N] -> [B].
    """
    edges = torch.linspace(min_bin, max_bin, logits.shape[-1] - 1, device=logits.device, dtype=torch.float32)
    dist2 = torch.sum((pseudo_beta[..., :, None, :] - pseudo_beta[..., None, :, :]) ** 2, dim=-1, keepdim=True)
    true_bins = torch.sum(dist2.float() > edges**2, dim=-1)
    ce = F.cross_entropy(logits.float().movedim(-1, 1), true_bins, reduction="none")  # [B, N, N]
    pair_mask = pseudo_beta_mask[..., :, None] * pseudo_beta_mask[..., None, :]
    return _masked_mean(ce, pair_mask, (-2, -1), eps=1e-6)


def masked_msa_loss(logits: Tensor, true_msa: Tensor, bert_mask: Tensor) -> Tensor:
    """AF2 supplement 1.9.9: cross-entropy at BERT-masked MSA positions. logits [B, S, N, 23] -> [B]."""
    ce = F.cross_entropy(logits.float().movedim(-1, 1), true_msa, reduction="none")  # [B, S, N]
    return _masked_mean(ce, bert_mask, (-2, -1))


def _resolution_filter(resolution: Tensor, lo: float, hi: float) -> Tensor:
    return ((resolution >= lo) & (resolution <= hi)).to(torch.float32)


def plddt_loss(
    logits: Tensor, pred_atom37: Tensor, true_atom37: Tensor, atom37_mask: Tensor, resolution: Tensor, *,
    min_resolution: float = 0.1, max_resolution: float = 3.0, cutoff: float = 15.0,
) -> Tensor:
    """AF2 supplement, Algorithm 29: cross-entropy against binned per-residue lDDT-Ca of the final structure.

    logits: [B, N, bins]; atom37 positions [B, N, 37, 3]; atom37_mask [B, N, 37]; resolution [B] -> [B].
    Zero for examples whose resolution is outside [min_resolution, max_resolution].
    """
    ca_mask = atom37_mask[..., 1]
    with torch.no_grad():
        score = lddt(pred_atom37[..., 1, :].detach().float(), true_atom37[..., 1, :].float(), ca_mask, cutoff=cutoff)
        bins = logits.shape[-1]
        target = torch.clamp(torch.floor(score * bins).long(), max=bins - 1)
    ce = F.cross_entropy(logits.float().movedim(-1, 1), target, reduction="none")  # [B, N]
    return _masked_mean(ce, ca_mask, (-1,), eps=1e-10) * _resolution_filter(resolution, min_resolution, max_resolution)


def experimentally_resolved_loss(
    logits: Tensor, atom37_exists: Tensor, all_atom_mask: Tensor, resolution: Tensor, *,
    min_resolution: float = 0.1, max_resolution: float = 3.0,
) -> Tensor:
    """AF2 supplement 1.9.10: per-atom sigmoid cross-entropy over atoms that exist for the residue type.

    logits, atom37_exists, all_atom_mask: [B, N, 37]; resolution [B] -> [B].
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), all_atom_mask.float(), reduction="none")
    return _masked_mean(bce, atom37_exists, (-2, -1)) * _resolution_filter(resolution, min_resolution, max_resolution)


def predicted_aligned_error_loss(
    logits: Tensor, pred_frames: Tensor, true_frames: Tensor, frames_mask: Tensor, resolution: Tensor | None, *,
    max_bin: float = 31.0, min_resolution: float = 0.1, max_resolution: float = 3.0,
) -> Tensor:
    """AF2 supplement 1.9.7 (AF2's `PredictedAlignedErrorHead.loss`, OpenFold's `tm_loss`): cross-entropy of the
    PAE logits against the binned aligned error of the predicted backbone frames.

    The error e_ij = |T_i^-1 x_j - T_i^true^-1 x_j^true| (x_j the frame origins, Ca; no gradient through it) is
    binned by its square against breaks linspace(0, max_bin, bins - 1) squared, the last bin open; averaged
    over pairs whose two frames exist. logits: [B, N, N, bins]; pred_frames: [B, N, 4, 4] (the final layer's,
    A); true_frames: [B, N, 4, 4]; frames_mask: [B, N]; resolution: [B] or None -> [B]. Zero for examples whose
    resolution is outside [min_resolution, max_resolution]; with `resolution` None no example is filtered.
    """
    with torch.no_grad():
        pred, true = _rigid(upcast(pred_frames.detach())), _rigid(upcast(true_frames))
        local_pred = pred.unsqueeze(-1).invert_apply(pred.trans[..., None, :, :])  # [B, N (frames), N (points), 3]
        local_true = true.unsqueeze(-1).invert_apply(true.trans[..., None, :, :])
        error2 = torch.sum((local_pred - local_true) ** 2, dim=-1)  # [B, N, N]
        breaks = torch.linspace(0.0, max_bin, logits.shape[-1] - 1, device=logits.device, dtype=error2.dtype)
        true_bins = torch.sum(error2[..., None] > breaks.square(), dim=-1)
    ce = F.cross_entropy(upcast(logits).movedim(-1, 1), true_bins, reduction="none")  # [B, N, N]
    pair_mask = frames_mask[..., :, None] * frames_mask[..., None, :]
    loss = _masked_mean(ce, pair_mask, (-2, -1))
    if resolution is None:
        return loss
    return loss * _resolution_filter(resolution, min_resolution, max_resolution).to(loss.dtype)


def _sidechain_term(outputs: dict, batch: dict, cfg: LossConfig) -> Tensor:
    pred14 = outputs["final_atom14"]
    b, n = pred14.shape[:2]
    # Chunks that keep one chunk's [B, chunk, 14N, 3]-sized tensors under _FAPE_CHUNK_BYTES (exact).
    frame_chunk = fape_frame_chunk(n * 14, b)
    alt_better, renamed, renamed_exists = renamed_ground_truth(
        pred14.detach(), batch["atom14_gt_positions"], batch["atom14_alt_gt_positions"], batch["atom14_gt_exists"],
        batch["atom14_alt_gt_exists"], batch["atom14_atom_is_ambiguous"], residue_chunk=max(1, frame_chunk // 14),
    )
    return sidechain_fape_loss(
        outputs["sidechain_frames"], pred14, batch["rigidgroups_gt_frames"], batch["rigidgroups_alt_gt_frames"],
        batch["rigidgroups_gt_exists"], alt_better, renamed, renamed_exists, clamp=cfg.fape_clamp,
        length_scale=cfg.fape_length_scale, eps=cfg.fape_eps, frame_chunk=frame_chunk,
    )


def alphafold_loss(outputs: dict, batch: dict, cfg: LossConfig, *, use_clamped_fape: bool | Tensor
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """AF2 supplement 1.9 (Eq. 7 with OpenFold's weights): the weighted sum of all loss terms.

    outputs: the structure module's dict plus head logits; batch: ground-truth features (see module users).
    use_clamped_fape: bool or bool [B], drawn upstream with probability `cfg.fape_clamp_prob`.
    Returns (scalar loss, per-term batch means, unweighted). Terms with weight 0 are not computed.
    """
    weighted: dict[str, tuple[float, Tensor]] = {
        "fape_backbone": (cfg.fape_backbone, backbone_fape_loss(
            outputs["frames"], batch["backbone_rigid_tensor"], batch["backbone_rigid_mask"],
            use_clamped=use_clamped_fape, clamp=cfg.fape_clamp, length_scale=cfg.fape_length_scale, eps=cfg.fape_eps)),
        "fape_sidechain": (cfg.fape_sidechain, _sidechain_term(outputs, batch, cfg)),
        "torsion": (cfg.torsion, torsion_angle_loss(
            outputs["angles"], outputs["unnormalized_angles"], batch["aatype"], batch["chi_angles_sin_cos"],
            batch["chi_mask"], batch["seq_mask"], chi_weight=cfg.torsion_chi_weight,
            angle_norm_weight=cfg.torsion_norm_weight)),
        "distogram": (cfg.distogram, distogram_loss(
            outputs["distogram_logits"], batch["pseudo_beta"], batch["pseudo_beta_mask"],
            min_bin=cfg.distogram_min, max_bin=cfg.distogram_max)),
        "masked_msa": (cfg.masked_msa, masked_msa_loss(
            outputs["masked_msa_logits"], batch["true_msa"], batch["bert_mask"])),
        "plddt": (cfg.plddt, plddt_loss(
            outputs["plddt_logits"], outputs["final_atom37"], batch["all_atom_positions"], batch["all_atom_mask"],
            batch["resolution"], min_resolution=cfg.plddt_min_resolution, max_resolution=cfg.plddt_max_resolution)),
    }
    if cfg.experimentally_resolved > 0 and "experimentally_resolved_logits" in outputs:
        weighted["experimentally_resolved"] = (cfg.experimentally_resolved, experimentally_resolved_loss(
            outputs["experimentally_resolved_logits"], batch["atom37_atom_exists"], batch["all_atom_mask"],
            batch["resolution"], min_resolution=cfg.plddt_min_resolution, max_resolution=cfg.plddt_max_resolution))
    if cfg.pae > 0:
        weighted["pae"] = (cfg.pae, predicted_aligned_error_loss(
            outputs["pae_logits"], outputs["frames"][-1], batch["backbone_rigid_tensor"],
            batch["backbone_rigid_mask"], batch.get("resolution"), max_bin=cfg.pae_max_bin,
            min_resolution=cfg.plddt_min_resolution, max_resolution=cfg.plddt_max_resolution))
    if cfg.violation > 0:
        weighted["violation"] = (cfg.violation, violation_loss(
            outputs["final_atom14"], batch["atom14_atom_exists"] * batch["seq_mask"][..., None],
            batch["residue_index"], batch["aatype"], tolerance_factor=cfg.violation_tolerance_factor,
            overlap_tolerance=cfg.clash_overlap_tolerance))
    total = sum(weight * term for weight, term in weighted.values())  # [B]
    if cfg.scale_by_sqrt_length:
        # AF2-DIFF: OpenFold scales the batch-mean loss by sqrt(min(mean seq length, crop)); we scale each
        # example by sqrt of its residues in the crop, which is min(its length, crop) for every example.
        total = total * torch.sqrt(batch["seq_mask"].sum(-1).clamp(min=1.0))
    terms = {name: term.mean() for name, (_, term) in weighted.items()}
    return total.mean(), terms


__all__ = [
    "alphafold_loss",
    "backbone_fape_loss",
    "distogram_loss",
    "experimentally_resolved_loss",
    "fape",
    "fape_frame_chunk",
    "masked_msa_loss",
    "plddt_loss",
    "predicted_aligned_error_loss",
    "renamed_ground_truth",
    "sidechain_fape_loss",
    "torsion_angle_loss",
]
