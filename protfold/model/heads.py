"""Output heads (AF2 supplement 1.9): distogram, pLDDT, masked MSA, experimentally resolved.

Every final layer is zero-initialised ("final" init), as in AF2, so untrained heads predict uniform bins.
"""

from __future__ import annotations

from torch import Tensor, nn

from protfold.config import ModelConfig
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
    """AF2 supplement 1.9.10: per-atom (atom37) logits that the atom is resolved in the experiment."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear = Linear(cfg.c_s, 37, init="final")

    def forward(self, s: Tensor) -> Tensor:
        """s: [B, N, c_s] -> logits [B, N, 37]"""
        return self.linear(s)


class AuxiliaryHeads(nn.Module):
    """All heads together; the experimentally resolved head only when `cfg.experimentally_resolved`."""

    def __init__(self, *, cfg: ModelConfig) -> None:
        super().__init__()
        self.distogram = DistogramHead(cfg=cfg)
        self.plddt = PLDDTHead(cfg=cfg)
        self.masked_msa = MaskedMSAHead(cfg=cfg)
        self.experimentally_resolved = ExperimentallyResolvedHead(cfg=cfg) if cfg.experimentally_resolved else None

    def forward(self, m: Tensor, z: Tensor, s: Tensor) -> dict[str, Tensor]:
        """m: [B, S, N, c_m] (first MSA rows), z: [B, N, N, c_z], s: [B, N, c_s] (structure module single).

        Returns distogram_logits, plddt_logits, masked_msa_logits and (if enabled)
        experimentally_resolved_logits.
        """
        out = {
            "distogram_logits": self.distogram(z),
            "plddt_logits": self.plddt(s),
            "masked_msa_logits": self.masked_msa(m),
        }
        if self.experimentally_resolved is not None:
            out["experimentally_resolved_logits"] = self.experimentally_resolved(s)
        return out


__all__ = ["AuxiliaryHeads", "DistogramHead", "ExperimentallyResolvedHead", "MaskedMSAHead", "PLDDTHead"]
