"""Input, relative-position, recycling and extra MSA embedders (AF2 supplement Alg. 3, 4, 32 and 1.7.1).

Inputs from the data pipeline (batch dim B first): target_feat [B, N, 22], residue_index [B, N] (long),
msa_feat [B, S, N, 49], extra_msa_feat [B, E, N, 25].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protfold.config import ModelConfig
from protfold.model.memory import upcast
from protfold.model.primitives import Linear

__all__ = ["ExtraMSAEmbedder", "InputEmbedder", "RecyclingEmbedder", "embed_pair_in_place"]


class InputEmbedder(nn.Module):
    """AF2 supplement, Algorithm 3, with relative positions (Algorithm 4).

    forward(target_feat [*, N, 22], residue_index [*, N], msa_feat [*, S, N, 49])
      -> m [*, S, N, c_m], z [*, N, N, c_z].
    """

    def __init__(self, *, c_m: int, c_z: int, target_feat_dim: int = 22, msa_feat_dim: int = 49,
                 max_relative_position: int = 32) -> None:
        super().__init__()
        self.max_rel = max_relative_position
        self.linear_tf_z_i = Linear(target_feat_dim, c_z)
        self.linear_tf_z_j = Linear(target_feat_dim, c_z)
        self.linear_tf_m = Linear(target_feat_dim, c_m)
        self.linear_msa_m = Linear(msa_feat_dim, c_m)
        self.linear_relpos = Linear(2 * max_relative_position + 1, c_z)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> InputEmbedder:
        return cls(c_m=cfg.c_m, c_z=cfg.c_z, target_feat_dim=cfg.target_feat_dim, msa_feat_dim=cfg.msa_feat_dim,
                   max_relative_position=cfg.max_relative_position)

    def relpos(self, residue_index: Tensor, rows: Tensor | None = None) -> Tensor:
        """Algorithm 4: one-hot of clip(r_i - r_j, -32, 32) (65 bins) -> Linear. [*, N] -> [*, N, N, c_z];
        `rows` [*, n] (residue_index of some rows i) gives those rows only: [*, n, N, c_z]."""
        rows = residue_index if rows is None else rows
        d = rows[..., :, None] - residue_index[..., None, :]
        bins = torch.clamp(d, -self.max_rel, self.max_rel) + self.max_rel
        # one_hot(bins) @ Wᵀ + b, read as a row lookup of Wᵀ: the [N, N, 65] one-hot is never built.
        return F.embedding(bins.long(), self.linear_relpos.weight.t()) + self.linear_relpos.bias

    def forward(self, target_feat: Tensor, residue_index: Tensor, msa_feat: Tensor) -> tuple[Tensor, Tensor]:
        return self.msa(target_feat, msa_feat), self.pair_rows(target_feat, residue_index)

    def msa(self, target_feat: Tensor, msa_feat: Tensor) -> Tensor:
        """m [*, S, N, c_m] alone (the pair is made by `pair_rows` or `embed_pair_in_place`)."""
        return self.linear_msa_m(msa_feat) + self.linear_tf_m(target_feat)[..., None, :, :]

    def pair_rows(self, target_feat: Tensor, residue_index: Tensor, start: int = 0, n: int | None = None) -> Tensor:
        """Rows start..start+n of z (all rows by default): [*, n, N, c_z]. Each row is independent of the others."""
        n = target_feat.shape[-2] - start if n is None else n
        a = self.linear_tf_z_i(target_feat.narrow(-2, start, n))
        b = self.linear_tf_z_j(target_feat)
        return a[..., :, None, :] + b[..., None, :, :] + self.relpos(residue_index, residue_index.narrow(-1, start, n))


class RecyclingEmbedder(nn.Module):
    """AF2 supplement, Algorithm 32.

    forward(m0_prev [*, N, c_m] (row 0 of the previous m), z_prev [*, N, N, c_z], x_prev [*, N, 3]
    (previous pseudo-beta positions, Angstrom)) -> (m0 update [*, N, c_m], z update [*, N, N, c_z]); the
    caller adds them to m[..., 0, :, :] and z. Distances are binned at 15 lower edges evenly spaced from
    3.25 to 20.75 A (the last bin open), so distances below 3.25 A fall in no bin.
    """

    def __init__(self, *, c_m: int, c_z: int, bins: int = 15, min_bin: float = 3.25, max_bin: float = 20.75) -> None:
        super().__init__()
        self.norm_m = nn.LayerNorm(c_m)
        self.norm_z = nn.LayerNorm(c_z)
        self.linear_d = Linear(bins, c_z)
        self.register_buffer("lower", torch.linspace(min_bin, max_bin, bins), persistent=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RecyclingEmbedder:
        return cls(c_m=cfg.c_m, c_z=cfg.c_z, bins=cfg.recycle_bins, min_bin=cfg.recycle_min_bin,
                   max_bin=cfg.recycle_max_bin)

    def distogram(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """x: [*, N, 3] -> one-hot [*, N, N, bins] with lower_k < d < lower_{k+1}, compared squared in at least fp32
        (float64 stays float64, as in OpenFold); the one-hot takes the dtype of `linear_d`'s weight, which reads
        it (fp32 under autocast, float64 in a `.double()` model). `rows` [*, n, 3] (some rows of x): [*, n, N, bins]."""
        x = upcast(x)
        rows = x if rows is None else upcast(rows)
        d2 = (rows[..., :, None, :] - x[..., None, :, :]).square().sum(-1, keepdim=True)
        lower = self.lower.to(x.dtype).square()
        upper = torch.cat([lower[1:], lower.new_full((1,), 1e8)])
        return ((d2 > lower) & (d2 < upper)).to(self.linear_d.weight.dtype)

    def forward(self, m0_prev: Tensor, z_prev: Tensor, x_prev: Tensor) -> tuple[Tensor, Tensor]:
        return self.norm_m(m0_prev), self.pair_update_rows(z_prev, x_prev)

    def pair_update_rows(self, z_prev_rows: Tensor, x_prev: Tensor, start: int = 0) -> Tensor:
        """The z update for rows start..start+n of z, from those rows of z_prev [*, n, N, c_z]: [*, n, N, c_z]."""
        rows = x_prev.narrow(-2, start, z_prev_rows.shape[-3])
        return self.linear_d(self.distogram(x_prev, rows)) + self.norm_z(z_prev_rows)


class ExtraMSAEmbedder(nn.Module):
    """AF2 supplement, Algorithm 2 line 14: Linear(25 -> c_e). extra_msa_feat [*, E, N, 25] -> [*, E, N, c_e]."""

    def __init__(self, *, c_e: int, extra_msa_feat_dim: int = 25) -> None:
        super().__init__()
        self.linear = Linear(extra_msa_feat_dim, c_e)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ExtraMSAEmbedder:
        return cls(c_e=cfg.c_e, extra_msa_feat_dim=cfg.extra_msa_feat_dim)

    def forward(self, extra_msa_feat: Tensor) -> Tensor:
        return self.linear(extra_msa_feat)


@torch.no_grad()
def embed_pair_in_place(input_embedder: InputEmbedder, recycling_embedder: RecyclingEmbedder, target_feat: Tensor,
                        residue_index: Tensor, z_prev: Tensor, x_prev: Tensor, rows: int) -> Tensor:
    """No grad: z = input pair + recycling update (Algorithm 2 lines 5-6 and Algorithm 32), written into z_prev's
    storage row chunk by row chunk and returned (z_prev [*, N, N, c_z] is overwritten: the caller hands it over).

    Each row of z reads only the same row of z_prev, so overwriting row chunks in order is exact; alive at once
    besides z: one chunk's embedding, LayerNorm and distance bins ([*, rows, N, c_z] and [*, rows, N, 15]). The
    sum is made in the plain path's order (input pair + (distance term + LayerNorm)) and stored in z_prev's dtype.
    """
    n_res = z_prev.shape[-3]
    for start in range(0, n_res, rows):
        n = min(rows, n_res - start)
        part = z_prev.narrow(-3, start, n)
        update = recycling_embedder.pair_update_rows(part, x_prev, start)
        part.copy_(input_embedder.pair_rows(target_feat, residue_index, start, n) + update)
        del update
    return z_prev
