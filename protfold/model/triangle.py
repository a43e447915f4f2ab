"""Pair-stack updates: triangle multiplication (Alg. 11, 12), triangle attention (Alg. 13, 14), pair transition (15).

Shapes: z [*, N_res, N_res, c_z], pair_mask [*, N_res, N_res] (float 0/1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protfold.model.kernels import cueq
from protfold.model.memory import chunk_rows, fp32_island, recompute, upcast
from protfold.model.plan import MemoryPlan
from protfold.model.primitives import Attention, Linear, row_attention
from protfold.model.triangle_exec import low_memory_update

__all__ = ["PairTransition", "TriangleAttention", "TriangleMultiplication", "Transition"]


class Transition(nn.Module):
    """LayerNorm -> Linear(c, f*c, relu init) -> ReLU -> Linear(f*c, c, final init), times the mask.

    Rows are independent, so chunking over dim -3 is exact. x: [*, R, L, c], mask: [*, R, L] -> [*, R, L, c].
    `chunk_field` names the MemoryPlan field giving the rows per chunk ("msa_chunk" or "pair_chunk").
    """

    def __init__(self, *, c: int, factor: int, chunk_field: str) -> None:
        super().__init__()
        self.chunk_field = chunk_field
        self.norm = nn.LayerNorm(c)
        self.up = Linear(c, factor * c, init="relu")
        self.down = Linear(factor * c, c, init="final")

    def _rows(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.down(torch.relu(self.up(self.norm(x)))) * mask[..., None]

    def forward(self, x: Tensor, mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        return chunk_rows(self._rows, [x, mask], [-3, -2], getattr(plan, self.chunk_field), out_dim=-3)


class PairTransition(Transition):
    """AF2 supplement, Algorithm 15. z: [*, N_res, N_res, c_z], pair_mask: [*, N_res, N_res] -> like z."""

    def __init__(self, *, c_z: int, factor: int = 4) -> None:
        super().__init__(c=c_z, factor=factor, chunk_field="pair_chunk")


class TriangleMultiplication(nn.Module):
    """AF2 supplement, Algorithm 11 (outgoing=True) and Algorithm 12 (outgoing=False).

    z: [*, N_res, N_res, c_z], pair_mask: [*, N_res, N_res] -> [*, N_res, N_res, c_z]. The sum over the
    third edge k runs in fp32 (`fp32_island`) whatever the autocast dtype.

    This module is the arithmetic: `_project` (lines 2-3, over a channel slice), `_combine` (line 4, the k-sum)
    and `_finish` (lines 5-6, per position). With `plan.low_memory_triangle` the same pieces run through the
    executors of `protfold.model.triangle_exec` (channel slices, row chunks, recompute, host offload).
    """

    def __init__(self, *, c_z: int, c_hidden: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing, self.c_hidden = outgoing, c_hidden
        self.norm_in = nn.LayerNorm(c_z)
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.norm_out = nn.LayerNorm(c_hidden)
        self.linear_o = Linear(c_hidden, c_z, init="final")

    def forward(self, z: Tensor, pair_mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        if plan.triangle_kernel == "cueq" and (out := cueq.triangle_multiplication(self, z, pair_mask)) is not None:
            return out
        if plan.low_memory_triangle:
            return low_memory_update(self, z, pair_mask, plan)
        z_ln = self.norm_in(z)
        x = self._combine(self._project(z_ln, pair_mask, "a"), self._project(z_ln, pair_mask, "b"))
        return self._finish(z_ln, x)

    def _project(self, z_ln: Tensor, pair_mask: Tensor, edge: str, sl: slice = slice(None)) -> Tensor:
        """sigmoid(Linear_g(z)) * Linear_p(z) * mask for hidden channels `sl` of edge "a" or "b"."""
        p, g = (self.linear_a_p, self.linear_a_g) if edge == "a" else (self.linear_b_p, self.linear_b_g)
        gate = torch.sigmoid(F.linear(z_ln, g.weight[sl], g.bias[sl]))
        return gate * F.linear(z_ln, p.weight[sl], p.bias[sl]) * pair_mask[..., None]

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        """Outgoing: x_ij = sum_k a_ik b_jk; incoming: x_ij = sum_k a_ki b_kj. [*, N, N, c] each, fp32 sum."""
        eq = "...ikc,...jkc->...ijc" if self.outgoing else "...kic,...kjc->...ijc"
        with fp32_island(a):
            x = torch.einsum(eq, upcast(a), upcast(b))
        return x.to(a.dtype)

    def _finish(self, z_ln: Tensor, x: Tensor) -> Tensor:
        """sigmoid(Linear_g(LN(z))) * Linear_o(LN(x)), per position (rows independent)."""
        return torch.sigmoid(self.linear_g(z_ln)) * self.linear_o(self.norm_out(x))

    def _channels(self, z_ln: Tensor, pair_mask: Tensor, start: int, stop: int) -> Tensor:
        """x for hidden channels start:stop (the k-sum of Alg. 11/12 line 4 over a channel slice)."""
        sl = slice(start, stop)
        return self._combine(self._project(z_ln, pair_mask, "a", sl), self._project(z_ln, pair_mask, "b", sl))


class TriangleAttention(nn.Module):
    """AF2 supplement, Algorithm 13 (starting=True) and Algorithm 14 (starting=False, around the ending node).

    z: [*, N_res, N_res, c_z], pair_mask: [*, N_res, N_res] -> [*, N_res, N_res, c_z]. The ending-node
    form is the starting-node form on zᵀ. Chunked over rows i with `plan.pair_chunk`; the bias b_jk from
    z is shared by all rows, and its gradient is accumulated across chunks.
    """

    def __init__(self, *, c_z: int, c_hidden: int, n_heads: int, starting: bool) -> None:
        super().__init__()
        self.starting = starting
        self.norm = nn.LayerNorm(c_z)
        self.linear_b = Linear(c_z, n_heads, bias=False)
        self.attention = Attention(c_q=c_z, c_kv=c_z, c_hidden=c_hidden, n_heads=n_heads)

    def forward(self, z: Tensor, pair_mask: Tensor, *, plan: MemoryPlan) -> Tensor:
        if plan.triangle_kernel == "cueq" and (out := cueq.triangle_attention(self, z, pair_mask)) is not None:
            return out
        if not self.starting:
            z, pair_mask = z.transpose(-2, -3), pair_mask.transpose(-1, -2)
        chunk = plan.pair_chunk
        if chunk is None and plan.attention_chunk_mb is None:
            z_ln = self.norm(z)
            out = row_attention(None, self.attention, z_ln, pair_mask, self._bias(z_ln), None, plan=plan)
        else:
            # Chunked: LN runs inside each chunk and the bias is recomputed, so only z is kept for backward.
            bias = recompute(lambda z_: self._bias(self.norm(z_)), z)
            out = row_attention(self.norm, self.attention, z, pair_mask, bias, chunk, plan=plan)
        return out if self.starting else out.transpose(-2, -3)

    def _bias(self, z_ln: Tensor) -> Tensor:
        return self.linear_b(z_ln).movedim(-1, -3)  # [*, H, N, N]
