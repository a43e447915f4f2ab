"""Structure metrics: lDDT-Ca, Ca RMSD, GDT-TS, TM-score, pLDDT from logits.

All functions take a mask of observed residues ([*, N], 1 = observed) and ignore the rest. They run without
gradients except `lddt`, which the pLDDT loss calls on detached coordinates anyway.

Superposition strategy (GDT-TS and TM-score). Both are defined as a maximum over all rigid superpositions;
we search a small, deterministic candidate set instead (a lower bound of the exact optimum, like LGA and
TM-score's own heuristics):
  1. seeds: the Kabsch fit on all observed residues and on contiguous windows of L/2 and L/4 residues
     (at least 4, stride half a window);
  2. from every seed, 4 refinement rounds: keep the residues within the metric's selection cutoff under the
     current fit (GDT: the cutoff itself; TM: d0 clamped to [4.5, 8] A like the TM-score program) and
     Kabsch-refit on them (a selection of fewer than 3 residues keeps the previous fit);
  3. the best score seen over all seeds and rounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

CA = 1  # atom37 index of C-alpha
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
GDT_CUTOFFS = (1.0, 2.0, 4.0, 8.0)


def lddt(pred: Tensor, true: Tensor, mask: Tensor, *, cutoff: float = 15.0, per_residue: bool = True,
         eps: float = 1e-10) -> Tensor:
    """lDDT on one atom per residue (AF2 supplement 1.9.6, Mariani et al. 2013), no superposition.

    pred, true: [*, N, 3]; mask: [*, N]. Pairs (i != j) are scored when both are observed and their true
    distance is below `cutoff`; each pair scores the share of thresholds 0.5/1/2/4 A that |d_true - d_pred|
    stays under. per_residue: [*, N] (residues without scored pairs get 0 when unobserved, 1 otherwise, as
    AF2's eps-normalisation gives); else the pair-weighted global score [*].
    """
    d_true = torch.cdist(true, true, compute_mode="donot_use_mm_for_euclid_dist")
    d_pred = torch.cdist(pred, pred, compute_mode="donot_use_mm_for_euclid_dist")
    n = mask.shape[-1]
    eye = torch.eye(n, dtype=mask.dtype, device=mask.device)
    scored = (d_true < cutoff).to(mask.dtype) * mask[..., :, None] * mask[..., None, :] * (1.0 - eye)
    l1 = torch.abs(d_true - d_pred)
    score = sum((l1 < t).to(pred.dtype) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    if per_residue:
        value = (eps + torch.sum(scored * score, dim=-1)) / (eps + torch.sum(scored, dim=-1))
        return value * mask
    return (eps + torch.sum(scored * score, dim=(-2, -1))) / (eps + torch.sum(scored, dim=(-2, -1)))


def lddt_ca(pred_atom37: Tensor, true_atom37: Tensor, atom37_mask: Tensor, *, cutoff: float = 15.0,
            per_residue: bool = True) -> Tensor:
    """lDDT-Ca from atom37 coordinates: [*, N, 37, 3], mask [*, N, 37] -> [*, N] or [*] (see `lddt`)."""
    return lddt(pred_atom37[..., CA, :], true_atom37[..., CA, :], atom37_mask[..., CA], cutoff=cutoff,
                per_residue=per_residue)


def kabsch(mobile: Tensor, target: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted least-squares rotation and translation with target ~ mobile @ R^T + t (proper, det R = +1).

    mobile, target: [*, N, 3]; weights: [*, N] (0 for unobserved). Returns R [*, 3, 3], t [*, 3]. A
    reflection in the SVD solution is removed by flipping the sign of the smallest singular direction.
    Computed in float64, returned in the input dtype.
    """
    dtype = mobile.dtype
    m, x, w = mobile.double(), target.double(), weights.double()[..., None]
    total = torch.clamp(w.sum(dim=-2, keepdim=True), min=1e-12)
    cm, cx = (w * m).sum(-2, keepdim=True) / total, (w * x).sum(-2, keepdim=True) / total
    h = torch.einsum("...ni,...nj->...ij", w * (m - cm), x - cx)
    u, _, vh = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vh.transpose(-1, -2) @ u.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(*d.shape, 3, dtype=d.dtype, device=d.device)
    diag[..., 2] = d
    rot = vh.transpose(-1, -2) @ (diag[..., :, None] * u.transpose(-1, -2))
    trans = cx.squeeze(-2) - torch.einsum("...ij,...j->...i", rot, cm.squeeze(-2))
    return rot.to(dtype), trans.to(dtype)


def _apply(rot: Tensor, trans: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("...ij,...nj->...ni", rot, x) + trans[..., None, :]


@torch.no_grad()
def rmsd(pred: Tensor, true: Tensor, mask: Tensor) -> Tensor:
    """RMSD after optimal superposition of pred onto true (Kabsch). pred, true: [*, N, 3]; mask [*, N] -> [*]."""
    rot, trans = kabsch(pred, true, mask)
    sq = torch.sum((_apply(rot, trans, pred) - true) ** 2, dim=-1)
    return torch.sqrt(torch.sum(sq * mask, dim=-1) / torch.clamp(mask.sum(-1), min=1.0))


def _seed_masks(mask: Tensor) -> Tensor:
    """[N] -> [K, N]: all observed residues and contiguous windows of L/2 and L/4 residues (stride half)."""
    n = mask.shape[-1]
    seeds = [mask]
    for size in (n // 2, n // 4):
        if size < 4:
            continue
        for start in range(0, n - size + 1, max(1, size // 2)):
            window = torch.zeros_like(mask)
            window[start : start + size] = 1.0
            seeds.append(window * mask)
    return torch.stack(seeds)


def _search(pred: Tensor, true: Tensor, mask: Tensor, select: float, score_fn) -> Tensor:
    """Best `score_fn(distances [K, N]) -> [K]` over the documented superposition candidates, one example."""
    current = _seed_masks(mask)
    best = torch.zeros((), dtype=pred.dtype, device=pred.device)
    for _ in range(5):
        rot, trans = kabsch(pred.expand(len(current), -1, -1), true.expand(len(current), -1, -1), current)
        dist = torch.linalg.vector_norm(_apply(rot, trans, pred) - true, dim=-1)  # [K, N]
        best = torch.maximum(best, score_fn(dist).max())
        selected = (dist <= select).to(mask.dtype) * mask
        enough = selected.sum(-1, keepdim=True) >= 3
        current = torch.where(enough, selected, current)
    return best


@torch.no_grad()
def gdt_ts(pred: Tensor, true: Tensor, mask: Tensor, cutoffs: tuple[float, ...] = GDT_CUTOFFS) -> Tensor:
    """GDT-TS in [0, 1]: mean over cutoffs 1, 2, 4, 8 A of the largest share of observed residues within the
    cutoff after superposition (search described in the module docstring). [*, N, 3], [*, N] -> [*]."""
    flat_p, flat_t, flat_m = pred.reshape(-1, *pred.shape[-2:]), true.reshape(-1, *true.shape[-2:]), mask.reshape(
        -1, mask.shape[-1])
    out = []
    for p, t, m in zip(flat_p, flat_t, flat_m):
        n_obs = torch.clamp(m.sum(), min=1.0)
        fractions = [
            _search(p, t, m, c, lambda d, c=c, m=m: ((d <= c).to(m.dtype) * m).sum(-1) / n_obs) for c in cutoffs
        ]
        out.append(torch.stack(fractions).mean())
    return torch.stack(out).reshape(mask.shape[:-1])


def tm_d0(length: Tensor | float) -> Tensor:
    """TM-score distance scale d0 = 1.24 (L - 15)^(1/3) - 1.8, at least 0.5 A (as for L <= 21)."""
    length = torch.as_tensor(length, dtype=torch.float64)
    return torch.clamp(1.24 * torch.clamp(length - 15.0, min=0.0) ** (1.0 / 3.0) - 1.8, min=0.5)


@torch.no_grad()
def tm_score(pred: Tensor, true: Tensor, mask: Tensor) -> Tensor:
    """TM-score in [0, 1] normalised by the number of observed true residues (search in the module docstring).

    pred, true: [*, N, 3]; mask: [*, N] -> [*].
    """
    flat_p, flat_t, flat_m = pred.reshape(-1, *pred.shape[-2:]), true.reshape(-1, *true.shape[-2:]), mask.reshape(
        -1, mask.shape[-1])
    out = []
    for p, t, m in zip(flat_p, flat_t, flat_m):
        n_obs = torch.clamp(m.sum(), min=1.0)
        d0 = float(tm_d0(n_obs))
        select = min(max(d0, 4.5), 8.0)
        out.append(_search(p, t, m, select, lambda d, d0=d0, m=m: (m / (1.0 + (d / d0) ** 2)).sum(-1) / n_obs))
    return torch.stack(out).reshape(mask.shape[:-1])


def plddt_from_logits(logits: Tensor) -> Tensor:
    """Expected lDDT-Ca x 100 from pLDDT logits: [*, N, bins] -> [*, N] in [0, 100] (bin centres)."""
    bins = logits.shape[-1]
    centres = (torch.arange(bins, dtype=torch.float32, device=logits.device) + 0.5) / bins
    return 100.0 * torch.sum(torch.softmax(logits.float(), dim=-1) * centres, dim=-1)


__all__ = [
    "GDT_CUTOFFS",
    "LDDT_THRESHOLDS",
    "kabsch",
    "lddt",
    "lddt_ca",
    "plddt_from_logits",
    "rmsd",
    "gdt_ts",
    "tm_d0",
    "tm_score",
]
