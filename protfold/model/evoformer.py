"""The Evoformer trunk: MSA attention, transitions, outer product mean, block and stacks (AF2 Alg. 6-10, 18, 19).

Shapes: m [*, N_seq, N_res, c_m] (or c_e in the extra MSA stack), z [*, N_res, N_res, c_z],
msa_mask [*, N_seq, N_res], pair_mask [*, N_res, N_res], masks float 0/1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from protfold.config import ModelConfig
from protfold.model.execution import Update, run_block
from protfold.model.memory import chunk_rows, fp32_island, infer_rows, recompute, run_blocks, upcast
from protfold.model.plan import MemoryPlan
from protfold.model.primitives import Attention, GlobalAttention, Linear, pair_bias_rows, row_attention
from protfold.model.triangle import PairTransition, Transition, TriangleAttention, TriangleMultiplication

__all__ = [
    "EvoformerBlock",
    "EvoformerStack",
    "ExtraMSAStack",
    "MSAColumnAttention",
    "MSAColumnGlobalAttention",
    "MSARowAttentionWithPairBias",
    "MSATransition",
    "OuterProductMean",
    "SharedDropout",
]


class MSARowAttentionWithPairBias(nn.Module):
    """AF2 supplement, Algorithm 7. m: [*, S, N, c_m], z: [*, N, N, c_z], msa_mask: [*, S, N] -> like m.

    Chunked over MSA rows with `plan.msa_chunk`; the pair bias [*, H, N, N] is shared by all rows.
    """

    def __init__(self, *, c_m: int, c_z: int, n_heads: int, c_hidden: int) -> None:
        super().__init__()
        self.norm_m = nn.LayerNorm(c_m)
        self.norm_z = nn.LayerNorm(c_z)
        self.linear_z = Linear(c_z, n_heads, bias=False)
        self.attention = Attention(c_q=c_m, c_kv=c_m, c_hidden=c_hidden, n_heads=n_heads)

    def _pair_bias(self, z: Tensor) -> Tensor:
        return self.linear_z(self.norm_z(z)).movedim(-1, -3)  # [*, H, N, N]

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        if plan.grad:
            # When chunking, the small bias is recomputed in backward too, so LN(z) [*, N, N, c_z] is not kept.
            bias = recompute(self._pair_bias, z, enabled=plan.msa_chunk is not None)
        else:  # LN(z) only in row chunks: never a pair-sized (fp32 under CUDA autocast) copy of z
            bias = pair_bias_rows(self.norm_z, self.linear_z, z, infer_rows(plan, z.shape[-3]))
        return row_attention(self.norm_m, self.attention, m, msa_mask, bias, plan.msa_chunk, plan=plan)


class MSAColumnAttention(nn.Module):
    """AF2 supplement, Algorithm 8. m: [*, S, N, c_m], msa_mask: [*, S, N] -> like m. Chunked over columns."""

    def __init__(self, *, c_m: int, n_heads: int, c_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.attention = Attention(c_q=c_m, c_kv=c_m, c_hidden=c_hidden, n_heads=n_heads)

    def forward(self, m: Tensor, msa_mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        m_t, mask_t = m.transpose(-2, -3), msa_mask.transpose(-1, -2)  # [*, N, S, c], [*, N, S]
        out = row_attention(self.norm, self.attention, m_t, mask_t, None, plan.msa_chunk, plan=plan)
        return out.transpose(-2, -3)


class MSAColumnGlobalAttention(nn.Module):
    """AF2 supplement, Algorithm 19 applied to columns of the extra MSA. e: [*, E, N, c_e] -> like e."""

    def __init__(self, *, c_m: int, n_heads: int, c_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c_m)
        self.attention = GlobalAttention(c_in=c_m, c_hidden=c_hidden, n_heads=n_heads)

    def _columns(self, m_t: Tensor, mask_t: Tensor) -> Tensor:
        return self.attention(self.norm(m_t), mask_t)

    def forward(self, m: Tensor, msa_mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        m_t, mask_t = m.transpose(-2, -3), msa_mask.transpose(-1, -2)
        return chunk_rows(self._columns, [m_t, mask_t], [-3, -2], plan.msa_chunk, out_dim=-3).transpose(-2, -3)


class MSATransition(Transition):
    """AF2 supplement, Algorithm 9. m: [*, S, N, c_m], msa_mask: [*, S, N] -> like m. Chunked over rows."""

    def __init__(self, *, c_m: int, factor: int = 4) -> None:
        # AF2-DIFF: the output is multiplied by the MSA mask (padding rows stay zero), as in the pair transition.
        super().__init__(c=c_m, factor=factor, chunk_field="msa_chunk")


class OuterProductMean(nn.Module):
    """AF2 supplement, Algorithm 10. m: [*, S, N, c_m], msa_mask: [*, S, N] -> [*, N, N, c_z].

    The mean over S is taken over unmasked row pairs: sum_s a_si ⊗ b_sj, projected, then divided by
    (1e-3 + sum_s mask_si mask_sj). Chunked over output rows i with `plan.pair_chunk`.
    """

    def __init__(self, *, c_m: int, c_z: int, c_hidden: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.norm = nn.LayerNorm(c_m)
        self.linear_a = Linear(c_m, c_hidden)
        self.linear_b = Linear(c_m, c_hidden)
        self.linear_o = Linear(c_hidden * c_hidden, c_z, init="final")

    def _rows(self, a: Tensor, b: Tensor, count: Tensor) -> Tensor:
        """a: [*, S, I, c] (a row chunk), b: [*, S, N, c], count: [*, I, N, 1] -> [*, I, N, c_z]"""
        outer = torch.einsum("...sic,...sjd->...ijcd", a, b).flatten(-2)
        # AF2-DIFF (from the supplement's text, as in AF2's released code): project the masked sum, then
        # divide by the pair count, instead of projecting the mean; the output bias is divided too.
        projected = self.linear_o(outer)
        return (projected / (self.eps + count)).to(projected.dtype)  # the fp32 count must not widen the update

    def _inputs(self, m: Tensor, msa_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.norm(m)
        mask = msa_mask[..., None]
        a, b = self.linear_a(m) * mask, self.linear_b(m) * mask
        with fp32_island(msa_mask):  # counts up to N_seq: exact in fp32, not in bf16
            count = torch.einsum("...si,...sj->...ij", upcast(msa_mask), upcast(msa_mask))[..., None]
        return a, b, count

    def forward(self, m: Tensor, msa_mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        a, b, count = self._inputs(m, msa_mask)
        return chunk_rows(self._rows, [a, b, count], [-2, None, -3], plan.pair_chunk, out_dim=-3)


class SharedDropout(nn.Module):
    """Dropout with one mask shared along `shared_dim` (AF2 supplement 1.11.6).

    shared_dim=-3 is AF2's DropoutRowwise (same mask for every row of m or z), -2 its DropoutColumnwise.
    """

    def __init__(self, p: float, *, shared_dim: int) -> None:
        super().__init__()
        self.p, self.shared_dim = p, shared_dim

    @property
    def active(self) -> bool:
        return self.training and self.p != 0.0

    def keep_mask(self, like: Tensor, shape: torch.Size | None = None) -> Tensor:
        """The 0/1 mask for an input of `shape` (default like's), drawn as `forward` draws it."""
        shape_ = list(like.shape if shape is None else shape)
        shape_[self.shared_dim] = 1
        return torch.empty(shape_, dtype=like.dtype, device=like.device).bernoulli_(1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        return x * self.keep_mask(x) / (1.0 - self.p)


class EvoformerBlock(nn.Module):
    """AF2 supplement, Algorithm 6; with global_column=True the extra MSA block of Algorithm 18.

    forward(m [*, S, N, c_m], z [*, N, N, c_z], msa_mask [*, S, N], pair_mask [*, N, N], *, plan) -> (m, z).
    `updates` is Algorithm 6, written once; `protfold.model.execution.run_block` runs it as the plan says.
    """

    # Algorithm 6, lines 2-11 (Algorithm 18 with the global column attention): each residual update in order,
    # with its shared dropout: per row for the MSA row attention, both triangle multiplications and the
    # starting-node attention, per column for the ending-node attention (the `orientation` in AF2's config).
    updates: tuple[Update, ...] = (
        Update("m", "msa_row", ("m", "z", "msa_mask"), "msa_dropout"),
        Update("m", "msa_col", ("m", "msa_mask")),
        Update("m", "msa_trans", ("m", "msa_mask")),
        Update("z", "opm", ("m", "msa_mask")),
        Update("z", "tri_mul_out", ("z", "pair_mask"), "pair_dropout_row"),
        Update("z", "tri_mul_in", ("z", "pair_mask"), "pair_dropout_row"),
        Update("z", "tri_att_start", ("z", "pair_mask"), "pair_dropout_row"),
        Update("z", "tri_att_end", ("z", "pair_mask"), "pair_dropout_col"),
        Update("z", "pair_trans", ("z", "pair_mask")),
    )

    def __init__(self, *, c_m: int, c_z: int, msa_heads: int, msa_head_dim: int, pair_heads: int,
                 pair_head_dim: int, opm_hidden: int, tri_mul_hidden: int, transition_factor: int,
                 msa_dropout: float, pair_dropout: float, global_column: bool = False) -> None:
        super().__init__()
        self.msa_row = MSARowAttentionWithPairBias(c_m=c_m, c_z=c_z, n_heads=msa_heads, c_hidden=msa_head_dim)
        column = MSAColumnGlobalAttention if global_column else MSAColumnAttention
        self.msa_col = column(c_m=c_m, n_heads=msa_heads, c_hidden=msa_head_dim)
        self.msa_trans = MSATransition(c_m=c_m, factor=transition_factor)
        self.opm = OuterProductMean(c_m=c_m, c_z=c_z, c_hidden=opm_hidden)
        self.tri_mul_out = TriangleMultiplication(c_z=c_z, c_hidden=tri_mul_hidden, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_z=c_z, c_hidden=tri_mul_hidden, outgoing=False)
        self.tri_att_start = TriangleAttention(c_z=c_z, c_hidden=pair_head_dim, n_heads=pair_heads, starting=True)
        self.tri_att_end = TriangleAttention(c_z=c_z, c_hidden=pair_head_dim, n_heads=pair_heads, starting=False)
        self.pair_trans = PairTransition(c_z=c_z, factor=transition_factor)
        self.msa_dropout = SharedDropout(msa_dropout, shared_dim=-3)
        self.pair_dropout_row = SharedDropout(pair_dropout, shared_dim=-3)
        self.pair_dropout_col = SharedDropout(pair_dropout, shared_dim=-2)

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, extra: bool = False) -> EvoformerBlock:
        """An Evoformer block (extra=False) or an extra MSA block (extra=True, or called on ExtraMSABlock)."""
        extra = extra or issubclass(cls, ExtraMSABlock)
        return (ExtraMSABlock if extra else cls)(
            c_m=cfg.c_e if extra else cfg.c_m, c_z=cfg.c_z,
            msa_heads=cfg.extra_msa_heads if extra else cfg.msa_heads,
            msa_head_dim=cfg.extra_msa_head_dim if extra else cfg.msa_head_dim,
            pair_heads=cfg.pair_heads, pair_head_dim=cfg.pair_head_dim, opm_hidden=cfg.opm_hidden,
            tri_mul_hidden=cfg.tri_mul_hidden, transition_factor=cfg.transition_factor,
            msa_dropout=cfg.msa_dropout, pair_dropout=cfg.pair_dropout, global_column=extra,
        )

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *, plan: MemoryPlan,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
        """`inplace` (no grad only): the block may overwrite the caller's m and z (the stacks pass it for every
        block after the first, whose inputs they made). Without it the caller's tensors stay untouched."""
        return run_block(self, m, z, msa_mask, pair_mask, plan=plan, inplace=inplace)


class ExtraMSABlock(EvoformerBlock):
    """The extra MSA stack's block: an Evoformer block with global column attention (AF2 supplement, Algorithm 18).

    A class of its own, with a `forward` of its own, for compiled blocks (`memory.compiled`): dynamo keeps one cache
    per code object, and the two stacks differ in widths, row counts and, under autocast, the stream's dtype (the
    extra MSA embedding is bf16, the MSA stream fp32). Sharing `EvoformerBlock.forward`, the stacks would recompile
    each other's graphs up to dynamo's recompile limit and then fall back to eager for some calls, so that a
    block's recompute in backward would run other code than its forward (CheckpointError).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "global_column": True})

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *, plan: MemoryPlan,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
        return super().forward(m, z, msa_mask, pair_mask, plan=plan, inplace=inplace)


class EvoformerStack(nn.Module):
    """AF2 supplement, Algorithm 6 repeated `cfg.n_evoformer_blocks` times, then the single projection.

    forward(m [*, S, N, c_m], z [*, N, N, c_z], msa_mask [*, S, N], pair_mask [*, N, N], *, plan)
      -> (m [*, S, N, c_m], z [*, N, N, c_z], s [*, N, c_s]) with s = Linear(m[0]).
    The blocks run through `memory.run_blocks` (block-level recompute, compile, no-grad in-place hand-over).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EvoformerBlock.from_config(cfg) for _ in range(cfg.n_evoformer_blocks))
        self.linear_s = Linear(cfg.c_m, cfg.c_s)

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *, plan: MemoryPlan,
                inplace_inputs: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """`inplace_inputs` (no grad only): the caller hands m and z over, and they may be overwritten (saves
        one pair tensor: the first block need not copy z). Otherwise the caller's tensors stay untouched."""
        m, z = run_blocks(list(self.blocks), (m, z), (msa_mask, pair_mask), plan=plan, inplace_inputs=inplace_inputs)
        return m, z, self.linear_s(m[..., 0, :, :])


class ExtraMSAStack(nn.Module):
    """AF2 supplement, Algorithm 18: `cfg.n_extra_msa_blocks` blocks with global column attention (Alg. 19).

    forward(e [*, E, N, c_e] (from ExtraMSAEmbedder), z [*, N, N, c_z], extra_msa_mask [*, E, N],
    pair_mask [*, N, N], *, plan) -> z. With `cfg.extra_msa_enabled=False` it has no blocks and returns z unchanged.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.n_extra_msa_blocks if cfg.extra_msa_enabled else 0
        self.blocks = nn.ModuleList(EvoformerBlock.from_config(cfg, extra=True) for _ in range(n))

    def forward(self, e: Tensor, z: Tensor, extra_msa_mask: Tensor, pair_mask: Tensor, *, plan: MemoryPlan,
                inplace_inputs: bool = False) -> Tensor:
        """`inplace_inputs`: as in `EvoformerStack` (no grad only; e and z may be overwritten)."""
        _, z = run_blocks(list(self.blocks), (e, z), (extra_msa_mask, pair_mask), plan=plan,
                          inplace_inputs=inplace_inputs)
        return z
