"""Output heads (AF2 supplement 1.9): distogram, pLDDT, masked MSA, experimentally resolved, predicted aligned error.

Every final layer is zero-initialised ("final" init), as in AF2, so untrained heads predict uniform bins.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protfold.config import ModelConfig
from protfold.model.confidence import pae_and_ptm_in_rows, predicted_aligned_error, predicted_tm_score
from protfold.model.plan import MemoryPlan
from protfold.model.primitives import Linear


class DistogramHead(nn.Module):
    """AF2 supplement 1.9.8: pair logits over `distogram_bins` distance bins, symmetrised over (i, j)."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear = Linear(cfg.c_z, cfg.distogram_bins, init="final")

    def forward(self, z: Tensor) -> Tensor:
        """z: [B, N, N, c_z] -> logits [B, N, N, distogram_bins]"""
        logits = self.linear(z)
        return logits + logits.transpose(-2, -3)


class PLDDTHead(nn.Module):
    """AF2 supplement, Algorithm 29: per-residue lDDT-Ca bins from the structure module's single repr."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.c_s),
            Linear(cfg.c_s, cfg.c_plddt, init="relu"), nn.ReLU(),
            Linear(cfg.c_plddt, cfg.c_plddt, init="relu"), nn.ReLU(),
            Linear(cfg.c_plddt, cfg.plddt_bins, init="final"),
        )

    def forward(self, s: Tensor) -> Tensor:
        """s: [B, N, c_s] -> logits [B, N, plddt_bins]"""
        return self.net(s)


class MaskedMSAHead(nn.Module):
    """AF2 supplement 1.9.9: logits over the 23 MSA classes at every MSA position."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear = Linear(cfg.c_m, cfg.msa_classes, init="final")

    def forward(self, m: Tensor) -> Tensor:
        """m: [B, S, N, c_m] -> logits [B, S, N, msa_classes]"""
        return self.linear(m)


class ExperimentallyResolvedHead(nn.Module):
    """AF2 supplement 1.9.10: per-atom (atom37) logits that the atom is resolved in the experiment, from the
    Evoformer's single representation."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear = Linear(cfg.c_s, 37, init="final")

    def forward(self, s: Tensor) -> Tensor:
        """s: [B, N, c_s] -> logits [B, N, 37]"""
        return self.linear(s)


class PredictedAlignedErrorHead(nn.Module):
    """AF2 supplement 1.9.7: logits over `pae_bins` aligned-error bins for every pair (i, j) from the final
    pair representation (AF2's `predicted_aligned_error_head`: one Linear, no LayerNorm, not symmetrised),
    and the confidence measures derived from them (`protfold.model.confidence`)."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_bin = cfg.pae_max_bin
        self.linear = Linear(cfg.c_z, cfg.pae_bins, init="final")

    def forward(self, z: Tensor, seq_mask: Tensor | None = None) -> dict[str, Tensor]:
        """z: [B, N, N, c_z], seq_mask: [B, N] (None: every residue counts) -> pae_logits [B, N, N, bins],
        predicted_aligned_error [B, N, N] (A), max_predicted_aligned_error [] (A), ptm [B] (over the residues
        of seq_mask). The last three are reports, computed without grad (only the logits reach the loss)."""
        logits = self.linear(z)
        with torch.no_grad():
            pae, max_pae = predicted_aligned_error(logits.detach(), max_bin=self.max_bin)
            ptm = predicted_tm_score(logits.detach(), seq_mask, max_bin=self.max_bin)
        return {"pae_logits": logits, "predicted_aligned_error": pae, "max_predicted_aligned_error": max_pae,
                "ptm": ptm}

    @torch.no_grad()
    def reports_in_rows(self, z: Tensor, seq_mask: Tensor | None, rows: int) -> dict[str, Tensor]:
        """No grad: the reports of `forward` (PAE, its maximum, pTM) from logits made `rows` pair rows at a time;
        no pae_logits [B, N, N, bins] are returned or ever made whole."""
        pae, max_pae, ptm = pae_and_ptm_in_rows(
            # in an fp32 island (autocast off): a z stored in bf16 (pair_storage) is read in the weights' dtype
            lambda start, n: self.linear(z.narrow(-3, start, n).to(self.linear.weight.dtype)), z.shape[-3], rows,
            n_bins=self.linear.out_features, max_bin=self.max_bin, residue_weights=seq_mask, like=z[..., 0, :])
        return {"predicted_aligned_error": pae, "max_predicted_aligned_error": max_pae, "ptm": ptm}


class AuxiliaryHeads(nn.Module):
    """All heads together; the experimentally resolved head only when `cfg.experimentally_resolved`, the
    predicted aligned error head only when `cfg.predicted_aligned_error` (checkpoints without it still load).

    Without grad and with `plan.head_chunk`, only what `protfold predict` writes is computed: no distogram_logits
    and no pae_logits (each [B, N, N, 64]: 38 GB in fp32 at 12,288 residues); PAE and pTM come from the PAE logits
    made `head_chunk` pair rows at a time (`PredictedAlignedErrorHead.reports_in_rows`)."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.distogram = DistogramHead(cfg=cfg)
        self.plddt = PLDDTHead(cfg=cfg)
        self.masked_msa = MaskedMSAHead(cfg=cfg)
        self.experimentally_resolved = ExperimentallyResolvedHead(cfg=cfg) if cfg.experimentally_resolved else None
        self.predicted_aligned_error = PredictedAlignedErrorHead(cfg=cfg) if cfg.predicted_aligned_error else None

    def forward(self, m: Tensor, z: Tensor, *, s_evoformer: Tensor, s_structure: Tensor,
                seq_mask: Tensor | None = None, plan: MemoryPlan) -> dict[str, Tensor]:
        """m: [B, S, N, c_m] (the final MSA representation), z: [B, N, N, c_z] (final pair), s_evoformer:
        [B, N, c_s] (the Evoformer's single, Linear(m[0])), s_structure: [B, N, c_s] (the structure module's
        final single), seq_mask: [B, N] (the residues pTM counts; None: all).

        Returns distogram_logits, plddt_logits (from s_structure, Algorithm 29), masked_msa_logits and (if
        enabled) experimentally_resolved_logits (from s_evoformer, supplement 1.9.10, as AF2 and OpenFold do)
        and the outputs of `PredictedAlignedErrorHead`.
        """
        rows = plan.head_chunk  # set only without grad
        out = {"plddt_logits": self.plddt(s_structure), "masked_msa_logits": self.masked_msa(m)}
        if rows is None:
            out["distogram_logits"] = self.distogram(z)
        if self.experimentally_resolved is not None:
            out["experimentally_resolved_logits"] = self.experimentally_resolved(s_evoformer)
        if self.predicted_aligned_error is not None and rows is None:
            out.update(self.predicted_aligned_error(z, seq_mask))
        elif self.predicted_aligned_error is not None:
            out.update(self.predicted_aligned_error.reports_in_rows(z, seq_mask, rows))
        return out


__all__ = [
    "AuxiliaryHeads",
    "DistogramHead",
    "ExperimentallyResolvedHead",
    "MaskedMSAHead",
    "PLDDTHead",
    "PredictedAlignedErrorHead",
]
