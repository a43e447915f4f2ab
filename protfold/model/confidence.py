"""Confidence measures from the predicted-aligned-error logits (AF2 supplement 1.9.7): PAE and pTM.

Pure functions of the logits, shared by the model's outputs and `protfold predict`. They follow AlphaFold2's
`alphafold/common/confidence.py` (and OpenFold's `compute_predicted_aligned_error` / `compute_tm`):
breaks linspace(0, max_bin, bins - 1), bin centres breaks + step / 2 plus one more centre a step beyond the
last (0.25, 0.75, ..., 31.25, 31.75 A for 64 bins and max_bin 31). Computed in at least fp32 whatever the
autocast dtype (float64 inputs stay float64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from protfold.model.memory import fp32_island, upcast

__all__ = ["aligned_error_bin_centres", "pae_and_ptm_in_rows", "predicted_aligned_error", "predicted_tm_score"]


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
        pae = _expected_error(torch.softmax(logits, dim=-1), centres)
    return pae, centres[-1]


def _expected_error(probs: Tensor, centres: Tensor) -> Tensor:
    """The expected aligned error [*, n, N] of bin probabilities [*, n, N, bins] with bin centres [bins]."""
    return torch.sum(probs * centres, dim=-1)


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
        tm_per_bin, normed = _tm_terms(weights, logits.shape[-1], max_bin, eps)
        per_alignment = _per_alignment(torch.softmax(logits, dim=-1), tm_per_bin, normed)  # [*, N]
        return _best_alignment(per_alignment, weights)


def _tm_terms(weights: Tensor, n_bins: int, max_bin: float, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """pTM's per-bin TM term [*, bins] (d0 from the weighted residue count) and the normalised weights [*, N]."""
    centres = aligned_error_bin_centres(n_bins, max_bin, dtype=weights.dtype, device=weights.device)
    total = weights.sum(-1)  # [*]
    d0 = 1.24 * (torch.clamp(total, min=19.0) - 15.0) ** (1.0 / 3.0) - 1.8
    tm_per_bin = 1.0 / (1.0 + centres.square() / d0[..., None].square())  # [*, bins]
    return tm_per_bin, weights / (eps + total[..., None])


def _per_alignment(probs: Tensor, tm_per_bin: Tensor, normed: Tensor) -> Tensor:
    """Rows i of bin probabilities [*, n, N, bins] -> the expected TM-score aligned on each i, [*, n]."""
    expected = torch.sum(probs * tm_per_bin[..., None, None, :], dim=-1)  # [*, n, N]
    return torch.sum(expected * normed[..., None, :], dim=-1)


def _best_alignment(per_alignment: Tensor, weights: Tensor) -> Tensor:
    best = torch.argmax(per_alignment * weights, dim=-1, keepdim=True)
    return torch.gather(per_alignment, -1, best)[..., 0]


@torch.no_grad()
def pae_and_ptm_in_rows(logits_rows: Callable[[int, int], Tensor], n_res: int, rows: int, *, n_bins: int,
                        max_bin: float = 31.0, residue_weights: Tensor | None = None,
                        like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`predicted_aligned_error` and `predicted_tm_score` without the whole logits [*, N, N, bins]:
    `logits_rows(start, n)` gives rows start..start+n, [*, n, N, bins]; they are made and reduced `rows` at a
    time (no grad). `like` [*, ...] gives the batch shape, dtype and device (e.g. the single representation
    [*, N, c]). Returns PAE [*, N, N] (fp32, A), its largest possible value [] and pTM [*], the same numbers
    as the whole-matrix functions (each row's softmax and sums are its own; only pTM's argmax is over all rows).
    """
    dtype = torch.promote_types(like.dtype, torch.float32)
    batch = like.shape[:-2]
    weights = (like.new_ones(*batch, n_res) if residue_weights is None else residue_weights).to(dtype)
    centres = aligned_error_bin_centres(n_bins, max_bin, dtype=dtype, device=like.device)
    pae = torch.empty(*batch, n_res, n_res, dtype=dtype, device=like.device)
    per_alignment = torch.empty(*batch, n_res, dtype=dtype, device=like.device)
    with fp32_island(like):
        tm_per_bin, normed = _tm_terms(weights, n_bins, max_bin)
        for start in range(0, n_res, rows):
            n = min(rows, n_res - start)
            probs = torch.softmax(upcast(logits_rows(start, n)).to(dtype), dim=-1)  # once for PAE and pTM
            pae.narrow(-2, start, n).copy_(_expected_error(probs, centres))
            per_alignment.narrow(-1, start, n).copy_(_per_alignment(probs, tm_per_bin, normed))
            del probs
        return pae, centres[-1], _best_alignment(per_alignment, weights)
