"""Confidence measures from the predicted-aligned-error logits (AF2 supplement 1.9.7): PAE and pTM.

Pure functions of the logits, shared by the model's outputs and `protfold predict`. They follow AlphaFold2's
`alphafold/common/confidence.py` (and OpenFold's `compute_predicted_aligned_error` / `compute_tm`):
breaks linspace(0, max_bin, bins - 1), bin centres breaks + step / 2 plus one more centre a step beyond the
last (0.25, 0.75, ..., 31.25, 31.75 A for 64 bins and max_bin 31). Computed in at least fp32 whatever the
autocast dtype (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from protfold.model.memory import fp32_island, upcast

__all__ = ["aligned_error_bin_centres", "predicted_aligned_error", "predicted_tm_score"]


def aligned_error_bin_centres(n_bins: int, max_bin: float, *, dtype: torch.dtype = torch.float32,
                              device: torch.device | str | None = None) -> Tensor:
    """Centres of the `n_bins` aligned-error bins (A): [n_bins]. The last bin is open; its centre is a step
    beyond the last break's centre, as in AF2's `_calculate_bin_centers`."""
    breaks = torch.linspace(0.0, max_bin, n_bins - 1, dtype=dtype, device=device)
    step = breaks[1] - breaks[0]
    centres = breaks + step / 2
    return torch.cat([centres, centres[-1:] + step])


def predicted_aligned_error(logits: Tensor, *, max_bin: float = 31.0) -> tuple[Tensor, Tensor]:
    """Expected aligned error of residue j in the frame of residue i (AF2 supplement 1.9.7).

    logits: [*, N, N, bins] -> (PAE [*, N, N] in A, the largest value it can take: the last bin centre, [])."""
    with fp32_island(logits):
        logits = upcast(logits)
        centres = aligned_error_bin_centres(logits.shape[-1], max_bin, dtype=logits.dtype, device=logits.device)
        pae = torch.sum(torch.softmax(logits, dim=-1) * centres, dim=-1)
    return pae, centres[-1]


def predicted_tm_score(logits: Tensor, residue_weights: Tensor | None = None, *, max_bin: float = 31.0,
                       eps: float = 1e-8) -> Tensor:
    """pTM (AF2 supplement 1.9.7, eq. 40): the TM-score expected under the predicted aligned-error
    distribution, for the best-scoring alignment frame i.

    logits: [*, N, N, bins]; residue_weights: [*, N] (seq_mask for the pTM over real residues; None: every
    one of the N residues counts, padding included, as AF2's forward pass does) -> [*] in [0, 1].
    With N_w = sum of the weights, d0 = 1.24 * (max(N_w, 19) - 15)^(1/3) - 1.8;
    per_alignment_i = sum_j w_j / (eps + N_w) * sum_b p_ijb / (1 + (centre_b / d0)^2), and the result is
    per_alignment_i at the i maximising per_alignment_i * w_i (the first such i).
    """
    with fp32_island(logits):
        logits = upcast(logits)
        if residue_weights is None:
            residue_weights = logits.new_ones(logits.shape[:-2])
        weights = residue_weights.to(logits.dtype)
        centres = aligned_error_bin_centres(logits.shape[-1], max_bin, dtype=logits.dtype, device=logits.device)
        total = weights.sum(-1)  # [*]
        d0 = 1.24 * (torch.clamp(total, min=19.0) - 15.0) ** (1.0 / 3.0) - 1.8
        tm_per_bin = 1.0 / (1.0 + centres.square() / d0[..., None].square())  # [*, bins]
        expected = torch.sum(torch.softmax(logits, dim=-1) * tm_per_bin[..., None, None, :], dim=-1)  # [*, N, N]
        normed = weights / (eps + total[..., None])
        per_alignment = torch.sum(expected * normed[..., None, :], dim=-1)  # [*, N]
        best = torch.argmax(per_alignment * weights, dim=-1, keepdim=True)
        return torch.gather(per_alignment, -1, best)[..., 0]
