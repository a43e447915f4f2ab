"""The Evoformer trunk: MSA attention, transitions, outer product mean, block and stacks (AF2 Alg. 6-10, 18, 19).

Shapes: m [*, N_seq, N_res, c_m] (or c_e in the extra MSA stack), z [*, N_res, N_res, c_z],
msa_mask [*, N_seq, N_res], pair_mask [*, N_res, N_res], masks float 0/1.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from protfold.config import MemoryConfig, ModelConfig
from protfold.model.memory import chunk_rows, fp32_island, infer_rows, recompute, run_blocks, upcast
from protfold.model.primitives import Attention, GlobalAttention, Linear, pair_bias_rows, row_attention
from protfold.model.triangle import Emit, PairTransition, Transition, TriangleAttention, TriangleMultiplication

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

    Chunked over MSA rows with `mem.msa_chunk`; the pair bias [*, H, N, N] is shared by all rows.
    """

    def __init__(self, *, c_m: int, c_z: int, n_heads: int, c_hidden: int, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.norm_m = nn.LayerNorm(c_m)
        self.norm_z = nn.LayerNorm(c_z)
        self.linear_z = Linear(c_z, n_heads, bias=False)
        self.attention = Attention(c_q=c_m, c_kv=c_m, c_hidden=c_hidden, n_heads=n_heads, mem=mem)

    def _pair_bias(self, z: Tensor) -> Tensor:
        return self.linear_z(self.norm_z(z)).movedim(-1, -3)  # [*, H, N, N]

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            # When chunking, the small bias is recomputed in backward too, so LN(z) [*, N, N, c_z] is not kept.
            bias = recompute(self._pair_bias, z, enabled=self.mem.msa_chunk is not None)
        else:  # LN(z) only in row chunks: never a pair-sized (fp32 under CUDA autocast) copy of z
            bias = pair_bias_rows(self.norm_z, self.linear_z, z, infer_rows(self.mem, z.shape[-3]))
        return row_attention(self.norm_m, self.attention, m, msa_mask, bias, self.mem.msa_chunk)


class MSAColumnAttention(nn.Module):
    """AF2 supplement, Algorithm 8. m: [*, S, N, c_m], msa_mask: [*, S, N] -> like m. Chunked over columns."""

    def __init__(self, *, c_m: int, n_heads: int, c_hidden: int, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.norm = nn.LayerNorm(c_m)
        self.attention = Attention(c_q=c_m, c_kv=c_m, c_hidden=c_hidden, n_heads=n_heads, mem=mem)

    def forward(self, m: Tensor, msa_mask: Tensor) -> Tensor:
        m_t, mask_t = m.transpose(-2, -3), msa_mask.transpose(-1, -2)  # [*, N, S, c], [*, N, S]
        return row_attention(self.norm, self.attention, m_t, mask_t, None, self.mem.msa_chunk).transpose(-2, -3)


class MSAColumnGlobalAttention(nn.Module):
    """AF2 supplement, Algorithm 19 applied to columns of the extra MSA. e: [*, E, N, c_e] -> like e."""

    def __init__(self, *, c_m: int, n_heads: int, c_hidden: int, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.norm = nn.LayerNorm(c_m)
        self.attention = GlobalAttention(c_in=c_m, c_hidden=c_hidden, n_heads=n_heads, mem=mem)

    def _columns(self, m_t: Tensor, mask_t: Tensor) -> Tensor:
        return self.attention(self.norm(m_t), mask_t)

    def forward(self, m: Tensor, msa_mask: Tensor) -> Tensor:
        m_t, mask_t = m.transpose(-2, -3), msa_mask.transpose(-1, -2)
        return chunk_rows(self._columns, [m_t, mask_t], [-3, -2], self.mem.msa_chunk, out_dim=-3).transpose(-2, -3)


class MSATransition(Transition):
    """AF2 supplement, Algorithm 9. m: [*, S, N, c_m], msa_mask: [*, S, N] -> like m. Chunked over rows."""

    def __init__(self, *, c_m: int, factor: int = 4, mem: MemoryConfig) -> None:
        # AF2-DIFF: the output is multiplied by the MSA mask (padding rows stay zero), as in the pair transition.
        super().__init__(c=c_m, factor=factor, chunk_field="msa_chunk", mem=mem)


class OuterProductMean(nn.Module):
    """AF2 supplement, Algorithm 10. m: [*, S, N, c_m], msa_mask: [*, S, N] -> [*, N, N, c_z].

    The mean over S is taken over unmasked row pairs: sum_s a_si ⊗ b_sj, projected, then divided by
    (1e-3 + sum_s mask_si mask_sj). Chunked over output rows i with `mem.pair_chunk`.
    """

    def __init__(self, *, c_m: int, c_z: int, c_hidden: int, mem: MemoryConfig, eps: float = 1e-3) -> None:
        super().__init__()
        self.mem = mem
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

    def forward(self, m: Tensor, msa_mask: Tensor) -> Tensor:
        a, b, count = self._inputs(m, msa_mask)
        return chunk_rows(self._rows, [a, b, count], [-2, None, -3], self.mem.pair_chunk, out_dim=-3)

    def add_into(self, m: Tensor, msa_mask: Tensor, emit: Emit) -> None:
        """No grad: the update goes to `emit` row chunk by row chunk. A row of the outer product has
        c_hidden² channels (8x c_z in af2), so the rows per chunk are cut by c_z / c_hidden² to keep one chunk's
        outer product no larger than a pair-row chunk."""
        a, b, count = self._inputs(m, msa_mask)
        c_hidden, c_z = self.linear_a.out_features, self.linear_o.out_features
        rows = max(1, infer_rows(self.mem, a.shape[-2]) * c_z // (c_hidden * c_hidden))
        chunk_rows(self._rows, [a, b, count], [-2, None, -3], rows, out_dim=-3,
                   emit=lambda s, n, u: emit(-3, s, n, u))


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


class _AddInto:
    """No grad: `emit(dim, start, n, update)` adds a chunk of a pair update (dropout applied) into z in place.

    Equal to `z + dropout(update)` of the whole update: the dropout mask is drawn once, at the first chunk, with
    the shape and dtype the whole update would have (same random draw), and applied to each chunk's slice.
    """

    def __init__(self, z: Tensor, dropout: nn.Module) -> None:
        self.z, self.keep = z, None
        self.dropout = dropout if isinstance(dropout, SharedDropout) and dropout.active else None

    def __call__(self, dim: int, start: int, n: int, update: Tensor) -> None:
        if self.dropout is not None:
            if self.keep is None:
                self.keep = self.dropout.keep_mask(update, self.z.shape)
            keep = self.keep if self.keep.shape[dim] == 1 else self.keep.narrow(dim, start, n)
            update = update * keep / (1.0 - self.dropout.p)
        self.z.narrow(dim, start, n).add_(update.to(self.z.dtype))


def _add(x: Tensor, update: Tensor, *, fresh: bool) -> Tensor:
    """x + update in x's dtype; in place when grad is off and x was made inside this block (never the caller's).

    The residual stream keeps its dtype: an fp32 stream stays fp32 under autocast, and a bf16 stream (pure bf16
    inference) is not widened to fp32 by an fp32 update, which would double every later pair-sized buffer.
    """
    update = update.to(x.dtype)
    if fresh and not torch.is_grad_enabled():
        return x.add_(update)
    return x + update


class EvoformerBlock(nn.Module):
    """AF2 supplement, Algorithm 6; with global_column=True the extra MSA block of Algorithm 18.

    forward(m [*, S, N, c_m], z [*, N, N, c_z], msa_mask [*, S, N], pair_mask [*, N, N]) -> (m, z).
    With `mem.recompute_inside_block` each of the nine residual updates is recomputed in backward on its own.
    """

    def __init__(self, *, c_m: int, c_z: int, msa_heads: int, msa_head_dim: int, pair_heads: int,
                 pair_head_dim: int, opm_hidden: int, tri_mul_hidden: int, transition_factor: int,
                 msa_dropout: float, pair_dropout: float, global_column: bool = False, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.msa_row = MSARowAttentionWithPairBias(c_m=c_m, c_z=c_z, n_heads=msa_heads, c_hidden=msa_head_dim, mem=mem)
        column = MSAColumnGlobalAttention if global_column else MSAColumnAttention
        self.msa_col = column(c_m=c_m, n_heads=msa_heads, c_hidden=msa_head_dim, mem=mem)
        self.msa_trans = MSATransition(c_m=c_m, factor=transition_factor, mem=mem)
        self.opm = OuterProductMean(c_m=c_m, c_z=c_z, c_hidden=opm_hidden, mem=mem)
        self.tri_mul_out = TriangleMultiplication(c_z=c_z, c_hidden=tri_mul_hidden, outgoing=True, mem=mem)
        self.tri_mul_in = TriangleMultiplication(c_z=c_z, c_hidden=tri_mul_hidden, outgoing=False, mem=mem)
        self.tri_att_start = TriangleAttention(c_z=c_z, c_hidden=pair_head_dim, n_heads=pair_heads, starting=True,
                                               mem=mem)
        self.tri_att_end = TriangleAttention(c_z=c_z, c_hidden=pair_head_dim, n_heads=pair_heads, starting=False,
                                             mem=mem)
        self.pair_trans = PairTransition(c_z=c_z, factor=transition_factor, mem=mem)
        self.msa_dropout = SharedDropout(msa_dropout, shared_dim=-3)
        self.pair_dropout_row = SharedDropout(pair_dropout, shared_dim=-3)
        self.pair_dropout_col = SharedDropout(pair_dropout, shared_dim=-2)

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, extra: bool = False, mem: MemoryConfig) -> EvoformerBlock:
        """An Evoformer block (extra=False) or an extra MSA block (extra=True, or called on ExtraMSABlock)."""
        extra = extra or issubclass(cls, ExtraMSABlock)
        return (ExtraMSABlock if extra else cls)(
            c_m=cfg.c_e if extra else cfg.c_m, c_z=cfg.c_z,
            msa_heads=cfg.extra_msa_heads if extra else cfg.msa_heads,
            msa_head_dim=cfg.extra_msa_head_dim if extra else cfg.msa_head_dim,
            pair_heads=cfg.pair_heads, pair_head_dim=cfg.pair_head_dim, opm_hidden=cfg.opm_hidden,
            tri_mul_hidden=cfg.tri_mul_hidden, transition_factor=cfg.transition_factor,
            msa_dropout=cfg.msa_dropout, pair_dropout=cfg.pair_dropout, global_column=extra, mem=mem,
        )

    def _msa_row_step(self, m: Tensor, z: Tensor, msa_mask: Tensor) -> Tensor:
        return _add(m, self.msa_dropout(self.msa_row(m, z, msa_mask)), fresh=False)

    def _msa_step(self, module: nn.Module, m: Tensor, msa_mask: Tensor) -> Tensor:
        return _add(m, module(m, msa_mask), fresh=True)

    def _opm_step(self, m: Tensor, z: Tensor, msa_mask: Tensor) -> Tensor:
        return _add(z, self.opm(m, msa_mask), fresh=False)

    def _pair_step(self, module: nn.Module, dropout: nn.Module, z: Tensor, pair_mask: Tensor) -> Tensor:
        return _add(z, dropout(module(z, pair_mask)), fresh=True)

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
        """`inplace` (no grad only): the block may overwrite the caller's m and z (the stacks pass it for every
        block after the first, whose inputs they made). Without it the caller's tensors stay untouched."""
        if not torch.is_grad_enabled() and _chunked_inference(self.mem):
            return self._forward_no_grad(m, z, msa_mask, pair_mask, inplace)
        fine = self.mem.recompute_inside_block
        m = recompute(self._msa_row_step, m, z, msa_mask, enabled=fine)
        m = recompute(partial(self._msa_step, self.msa_col), m, msa_mask, enabled=fine)
        m = recompute(partial(self._msa_step, self.msa_trans), m, msa_mask, enabled=fine)
        z = recompute(self._opm_step, m, z, msa_mask, enabled=fine)
        for module, dropout in self._pair_updates():
            z = recompute(partial(self._pair_step, module, dropout), z, pair_mask, enabled=fine)
        return m, z

    def _pair_updates(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        """The pair stack of Algorithm 6 in order, each with its shared dropout: per row for both triangle
        multiplications and the starting-node attention, per column for the ending-node attention (Algorithm 6,
        and the `orientation` of each update in AF2's config). Every execution path (eager, recomputed, compiled,
        no-grad in place) reads this one table."""
        return (
            (self.tri_mul_out, self.pair_dropout_row),
            (self.tri_mul_in, self.pair_dropout_row),
            (self.tri_att_start, self.pair_dropout_row),
            (self.tri_att_end, self.pair_dropout_col),
            (self.pair_trans, nn.Identity()),
        )

    def _forward_no_grad(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                         inplace: bool) -> tuple[Tensor, Tensor]:
        """Inference: every pair update is added into z in place, row chunk by row chunk, so nothing pair-sized
        besides z lives beyond one chunk (except the low-memory triangle multiplication's combined edge).
        Same numbers as the grad path (each chunk computes exactly what the whole op computes for its rows)."""
        m = _add(m, self.msa_dropout(self.msa_row(m, z, msa_mask)), fresh=inplace)
        m = _add(m, self.msa_col(m, msa_mask), fresh=True)
        m = _add(m, self.msa_trans(m, msa_mask), fresh=True)
        if not inplace:
            z = z.clone()  # one copy per user-facing call; every later update goes into it
        self.opm.add_into(m, msa_mask, _AddInto(z, nn.Identity()))
        for module, dropout in self._pair_updates():
            module.add_into(z, pair_mask, _AddInto(z, dropout))
        return m, z


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

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *,
                inplace: bool = False) -> tuple[Tensor, Tensor]:
        return super().forward(m, z, msa_mask, pair_mask, inplace=inplace)


def _chunked_inference(mem: MemoryConfig) -> bool:
    """Whether no-grad blocks take the in-place, row-chunked path: only when a memory switch asks for chunking.

    The chunked path costs kernel launches, which bound a GPU step at small crops (docs/benchmarks.md), so the
    no-grad recycling passes of `none` / `recompute` / `offload` keep the plain, faster path.
    """
    return mem.pair_chunk is not None or mem.attention_chunk_mb is not None or mem.low_memory_triangle


def _run_no_grad(blocks: nn.ModuleList, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor,
                 inplace_inputs: bool) -> tuple[Tensor, Tensor]:
    """Blocks without grad: the first one copies z unless the caller handed it over, later ones update in place."""
    for i, block in enumerate(blocks):
        m, z = block(m, z, msa_mask, pair_mask, inplace=inplace_inputs or i > 0)
    return m, z


class EvoformerStack(nn.Module):
    """AF2 supplement, Algorithm 6 repeated `cfg.n_evoformer_blocks` times, then the single projection.

    forward(m [*, S, N, c_m], z [*, N, N, c_z], msa_mask [*, S, N], pair_mask [*, N, N])
      -> (m [*, S, N, c_m], z [*, N, N, c_z], s [*, N, c_s]) with s = Linear(m[0]).
    Block-level recompute every `mem.blocks_per_checkpoint` blocks (boundaries kept per `checkpoint_storage`).
    """

    def __init__(self, cfg: ModelConfig, *, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.blocks = nn.ModuleList(EvoformerBlock.from_config(cfg, mem=mem) for _ in range(cfg.n_evoformer_blocks))
        self.linear_s = Linear(cfg.c_m, cfg.c_s)

    def forward(self, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *,
                inplace_inputs: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """`inplace_inputs` (no grad only): the caller hands m and z over, and they may be overwritten (saves
        one pair tensor: the first block need not copy z). Otherwise the caller's tensors stay untouched."""
        if torch.is_grad_enabled():
            m, z = run_blocks(list(self.blocks), (m, z), (msa_mask, pair_mask), self.mem)
        else:
            m, z = _run_no_grad(self.blocks, m, z, msa_mask, pair_mask, inplace_inputs)
        return m, z, self.linear_s(m[..., 0, :, :])


class ExtraMSAStack(nn.Module):
    """AF2 supplement, Algorithm 18: `cfg.n_extra_msa_blocks` blocks with global column attention (Alg. 19).

    forward(e [*, E, N, c_e] (from ExtraMSAEmbedder), z [*, N, N, c_z], extra_msa_mask [*, E, N],
    pair_mask [*, N, N]) -> z. With `cfg.extra_msa_enabled=False` it has no blocks and returns z unchanged.
    """

    def __init__(self, cfg: ModelConfig, *, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        n = cfg.n_extra_msa_blocks if cfg.extra_msa_enabled else 0
        self.blocks = nn.ModuleList(EvoformerBlock.from_config(cfg, extra=True, mem=mem) for _ in range(n))

    def forward(self, e: Tensor, z: Tensor, extra_msa_mask: Tensor, pair_mask: Tensor, *,
                inplace_inputs: bool = False) -> Tensor:
        """`inplace_inputs`: as in `EvoformerStack` (no grad only; e and z may be overwritten)."""
        if torch.is_grad_enabled():
            _, z = run_blocks(list(self.blocks), (e, z), (extra_msa_mask, pair_mask), self.mem)
        else:
            _, z = _run_no_grad(self.blocks, e, z, extra_msa_mask, pair_mask, inplace_inputs)
        return z
