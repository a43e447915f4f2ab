"""Pair-stack updates: triangle multiplication (Alg. 11, 12), triangle attention (Alg. 13, 14), pair transition (15).

Shapes: z [*, N_res, N_res, c_z], pair_mask [*, N_res, N_res] (float 0/1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protfold.config import DEFAULT_TRIANGLE_SLICE_MB, MemoryConfig
from protfold.model.kernels import cueq
from protfold.model.memory import chunk_rows, fp32_island, infer_rows, recompute, upcast
from protfold.model.primitives import Attention, Linear, pair_bias_rows, row_attention

# Emit(dim, start, n, update): add `update` (the module's output for positions start:start+n along `dim` of z,
# dim -3 rows or -2 columns) into the residual stream in place. Used by the no-grad `add_into` paths.
Emit = Callable[[int, int, int, Tensor], None]

__all__ = ["PairTransition", "TriangleAttention", "TriangleMultiplication", "Transition"]

_CHANNEL_CHUNKS = 8  # low-memory triangle multiplication (no grad): hidden channels in this many slices
# ... and rows of z in this many slices when MemoryConfig.pair_chunk is unset (training / no-grad inference)
_ROW_CHUNKS_TRAIN, _ROW_CHUNKS_INFER = 4, 16
# no-grad in-place triangle multiplication: one fp32 [slice, N, N] edge is at most this fraction of z's bytes
_INFER_EDGE_FRACTION = 1 / 16


class Transition(nn.Module):
    """LayerNorm -> Linear(c, f*c, relu init) -> ReLU -> Linear(f*c, c, final init), times the mask.

    Rows are independent, so chunking over dim -3 is exact. x: [*, R, L, c], mask: [*, R, L] -> [*, R, L, c].
    `chunk_field` names the MemoryConfig field giving the rows per chunk ("msa_chunk" or "pair_chunk").
    """

    def __init__(self, *, c: int, factor: int, chunk_field: str, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.chunk_field = chunk_field
        self.norm = nn.LayerNorm(c)
        self.up = Linear(c, factor * c, init="relu")
        self.down = Linear(factor * c, c, init="final")

    def _rows(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.down(torch.relu(self.up(self.norm(x)))) * mask[..., None]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        chunk = getattr(self.mem, self.chunk_field)
        return chunk_rows(self._rows, [x, mask], [-3, -2], chunk, out_dim=-3)

    def add_into(self, x: Tensor, mask: Tensor, emit: Emit) -> None:
        """No grad: the update for each row chunk of x goes to `emit`, so only one chunk's LN / hidden lives."""
        rows = getattr(self.mem, self.chunk_field) or infer_rows(self.mem, x.shape[-3])
        chunk_rows(self._rows, [x, mask], [-3, -2], rows, out_dim=-3, emit=lambda s, n, u: emit(-3, s, n, u))


class PairTransition(Transition):
    """AF2 supplement, Algorithm 15. z: [*, N_res, N_res, c_z], pair_mask: [*, N_res, N_res] -> like z."""

    def __init__(self, *, c_z: int, factor: int = 4, mem: MemoryConfig) -> None:
        super().__init__(c=c_z, factor=factor, chunk_field="pair_chunk", mem=mem)


class TriangleMultiplication(nn.Module):
    """AF2 supplement, Algorithm 11 (outgoing=True) and Algorithm 12 (outgoing=False).

    z: [*, N_res, N_res, c_z], pair_mask: [*, N_res, N_res] -> [*, N_res, N_res, c_z]. The sum over the
    third edge k runs in fp32 (`fp32_island`) whatever the autocast dtype.

    With `mem.low_memory_triangle`: in training the whole update is recomputed in backward (only z is kept);
    inside it, for large N, the [N, N, c_hidden] projections and gates are made one channel slice at a time
    (slices of at most `mem.triangle_slice_mb`, 512 MiB by default) and recomputed per slice, the output gate per row chunk. Without grad: a, b are built channels-first one
    slice of c_hidden/8 channels at a time from row chunks of z (so the k-sum is a batched matmul with no
    permuted copies), and the output overwrites the combined-edge tensor x row chunk by row chunk: the peak
    is z + x + about three channel slices, about 2.4x the pair tensor when c_hidden = c_z (tested on CPU).
    """

    def __init__(self, *, c_z: int, c_hidden: int, outgoing: bool, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.outgoing, self.c_hidden = outgoing, c_hidden
        self.norm_in = nn.LayerNorm(c_z)
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.norm_out = nn.LayerNorm(c_hidden)
        self.linear_o = Linear(c_hidden, c_z, init="final")

    def forward(self, z: Tensor, pair_mask: Tensor) -> Tensor:
        if self.mem.triangle_kernel == "cueq" and (out := cueq.triangle_multiplication(self, z, pair_mask)) is not None:
            return out
        if not self.mem.low_memory_triangle:
            z_ln = self.norm_in(z)
            x = self._combine(self._project(z_ln, pair_mask, "a"), self._project(z_ln, pair_mask, "b"))
            return self._finish(z_ln, x)
        if torch.is_grad_enabled():
            return recompute(self._low_memory_train, z, pair_mask)
        return self._low_memory_infer(z, pair_mask)

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

    def _slices(self, parts: int = _CHANNEL_CHUNKS) -> list[slice]:
        step = max(1, -(-self.c_hidden // parts))
        return [slice(s, min(s + step, self.c_hidden)) for s in range(0, self.c_hidden, step)]

    def _train_slices(self, z: Tensor) -> list[slice]:
        """As few channel slices as keep each fp32 [N, N, slice] edge within `mem.triangle_slice_mb`.

        Slicing is exact but costs kernel launches, which dominate at small N on a GPU (measured: 8 fixed
        slices made an af2 training step 2.9x slower at N=256), so small pair tensors are not sliced.
        """
        per_channel = z.shape[-3] * z.shape[-2] * 4
        limit = max(1, int((self.mem.triangle_slice_mb or DEFAULT_TRIANGLE_SLICE_MB) * 2**20))  # below one byte: one channel per slice
        return self._slices(max(1, -(-per_channel * self.c_hidden // limit)))

    def _row_chunk(self, n: int, parts: int) -> int:
        return self.mem.pair_chunk or max(1, -(-n // parts))

    def _channels(self, z_ln: Tensor, pair_mask: Tensor, start: int, stop: int) -> Tensor:
        sl = slice(start, stop)
        return self._combine(self._project(z_ln, pair_mask, "a", sl), self._project(z_ln, pair_mask, "b", sl))

    def _low_memory_train(self, z: Tensor, pair_mask: Tensor) -> Tensor:
        z_ln = self.norm_in(z)
        slices = self._train_slices(z)
        if len(slices) == 1:
            x = self._channels(z_ln, pair_mask, 0, self.c_hidden)
        else:
            parts = [recompute(self._channels, z_ln, pair_mask, sl.start, sl.stop) for sl in slices]
            x = torch.cat(parts, dim=-1)
        rows = self._row_chunk(z.shape[-3], _ROW_CHUNKS_TRAIN)
        return chunk_rows(self._finish, [z_ln, x], [-3, -3], rows, out_dim=-3)

    def _edge_channels_first(self, z: Tensor, pair_mask: Tensor, edge: str, sl: slice, rows: int) -> Tensor:
        """Edge `edge` for hidden channels `sl`, built row chunk by row chunk: [*, n_channels, N, N]."""
        out: Tensor | None = None
        for start in range(0, z.shape[-3], rows):
            n = min(rows, z.shape[-3] - start)
            part = self._project(self.norm_in(z.narrow(-3, start, n)), pair_mask.narrow(-2, start, n), edge, sl)
            if out is None:
                out = part.new_empty(*z.shape[:-3], part.shape[-1], z.shape[-3], z.shape[-2])
            out.narrow(-2, start, n).copy_(part.movedim(-1, -3))
        return out  # type: ignore[return-value]

    def add_into(self, z: Tensor, pair_mask: Tensor, emit: Emit) -> None:
        """No grad: z += update, the update emitted row chunk by row chunk (`emit(-3, start, n, rows)`).

        With `mem.low_memory_triangle`, alive at once besides z: the combined edge x [*, N, N, c_hidden] (compute
        dtype), one fp32 b edge for a slice of hidden channels (at most `_INFER_EDGE_FRACTION` of z's bytes), and
        row-chunk transients. x is finished before the first row of z changes (it reads all of z); then each
        output row chunk needs only its own rows of z and x, so it is added into z in place. About 2.2x the pair
        tensor in all when c_hidden = c_z. With `mem.offload_triangle_edge` x lives in (pinned) host memory,
        one [*, N, N, width] tensor per channel slice, and each row chunk of it is copied back when its output
        is added: z plus the slice and chunk transients stay on the device. Without low_memory_triangle: the
        regular update, added whole.
        """
        if not self.mem.low_memory_triangle:
            emit(-3, 0, z.shape[-3], self(z, pair_mask))
            return
        n_res = z.shape[-3]
        rows = infer_rows(self.mem, n_res)
        edge_bytes = z.numel() * z.element_size() * _INFER_EDGE_FRACTION
        per_channel = z[..., 0].numel() * 4
        x: Tensor | None = None
        host = self.mem.offload_triangle_edge  # x as one pinned host tensor [*, N, N, width] per channel slice
        slices = self._slices(max(1, -(-per_channel * self.c_hidden // int(edge_bytes))))
        x_host: list[Tensor] = []
        for k, sl in enumerate(slices):
            # b for this slice, channels first and in at least fp32 (the exact up-cast of the compute-dtype
            # projection; a float64 model keeps float64, like `upcast` on a)
            b32: Tensor | None = None
            for start in range(0, n_res, rows):
                n = min(rows, n_res - start)
                part = self._project(self.norm_in(z.narrow(-3, start, n)), pair_mask.narrow(-2, start, n), "b", sl)
                if b32 is None:
                    b32 = torch.empty(*z.shape[:-3], part.shape[-1], n_res, n_res, device=z.device,
                                      dtype=torch.promote_types(part.dtype, torch.float32))
                    if host:  # this slice's part of x, in the compute dtype, in host memory
                        x_host.append(_host_buffer(z, sl.stop - sl.start, part.dtype))
                    elif x is None:  # x in the compute dtype (bf16 under autocast), like the regular path
                        x = z.new_empty(*z.shape[:-1], self.c_hidden, dtype=part.dtype)
                b32.narrow(-2, start, n).copy_(part.movedim(-1, -3))
                del part
            assert b32 is not None and (x is not None or host)
            # a only for the output rows i of this chunk: rows i of z (outgoing) or columns i (incoming)
            for start in range(0, n_res, rows):
                n = min(rows, n_res - start)
                if self.outgoing:
                    a = self._project(self.norm_in(z.narrow(-3, start, n)), pair_mask.narrow(-2, start, n), "a", sl)
                    a32 = upcast(a).movedim(-1, -3)  # [*, c, i, k]
                else:
                    a = self._project(self.norm_in(z.narrow(-2, start, n)), pair_mask.narrow(-1, start, n), "a", sl)
                    a32 = upcast(a).movedim(-1, -3).transpose(-1, -2)  # [*, c, i, k] from a_ki
                del a
                with fp32_island(a32):
                    part = a32 @ b32.transpose(-1, -2) if self.outgoing else a32 @ b32  # [*, c, i, j]
                del a32
                if host:  # rows i of this slice, made contiguous on the device: one contiguous async copy
                    dst = x_host[k].narrow(-3, start, n)
                    dst.copy_(part.movedim(-3, -1).to(dst.dtype).contiguous(), non_blocking=z.is_cuda)
                else:
                    x.narrow(-3, start, n)[..., sl] = part.movedim(-3, -1)
                del part
            del b32
        assert x is not None or host
        for start in range(0, n_res, rows):
            n = min(rows, n_res - start)
            if host:  # stream-ordered after the device-to-host copies above: no host synchronisation needed
                x_rows = torch.cat([xs.narrow(-3, start, n).to(z.device, non_blocking=z.is_cuda) for xs in x_host],
                                   dim=-1)
            else:
                x_rows = x.narrow(-3, start, n)
            emit(-3, start, n, self._finish(self.norm_in(z.narrow(-3, start, n)), x_rows))
            del x_rows

    def _low_memory_infer(self, z: Tensor, pair_mask: Tensor) -> Tensor:
        rows = self._row_chunk(z.shape[-3], _ROW_CHUNKS_INFER)
        x: Tensor | None = None
        for sl in self._slices():
            a = self._edge_channels_first(z, pair_mask, "a", sl, rows)  # [*, c, N, N], no permuted copies
            b = self._edge_channels_first(z, pair_mask, "b", sl, rows)
            with fp32_island(a):
                a32, b32 = upcast(a), upcast(b)
                part = a32 @ b32.transpose(-1, -2) if self.outgoing else a32.transpose(-1, -2) @ b32
            if x is None:  # x in the compute dtype (bf16 under autocast), like the regular path
                x = z.new_empty(*z.shape[:-1], self.c_hidden, dtype=a.dtype)
            del a, b, a32, b32
            x[..., sl] = part.movedim(-3, -1)
            del part
        assert x is not None
        out = x if x.shape[-1] == z.shape[-1] else None  # the output overwrites x row chunk by row chunk
        for start in range(0, z.shape[-3], rows):
            n = min(rows, z.shape[-3] - start)
            res = self._finish(self.norm_in(z.narrow(-3, start, n)), x.narrow(-3, start, n))
            if out is None:
                out = res.new_empty(z.shape)
            out.narrow(-3, start, n).copy_(res)
        return out  # type: ignore[return-value]


def _host_buffer(z: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """One channel slice of the no-grad triangle update's combined edge in host memory: [*, N, N, width],
    pinned when z is on a GPU, so every row chunk copied in or out is one contiguous asynchronous transfer."""
    return torch.empty(*z.shape[:-1], width, dtype=dtype, device="cpu", pin_memory=z.is_cuda)


class TriangleAttention(nn.Module):
    """AF2 supplement, Algorithm 13 (starting=True) and Algorithm 14 (starting=False, around the ending node).

    z: [*, N_res, N_res, c_z], pair_mask: [*, N_res, N_res] -> [*, N_res, N_res, c_z]. The ending-node
    form is the starting-node form on zᵀ. Chunked over rows i with `mem.pair_chunk`; the bias b_jk from
    z is shared by all rows, and its gradient is accumulated across chunks.
    """

    def __init__(self, *, c_z: int, c_hidden: int, n_heads: int, starting: bool, mem: MemoryConfig) -> None:
        super().__init__()
        self.mem = mem
        self.starting = starting
        self.norm = nn.LayerNorm(c_z)
        self.linear_b = Linear(c_z, n_heads, bias=False)
        self.attention = Attention(c_q=c_z, c_kv=c_z, c_hidden=c_hidden, n_heads=n_heads, mem=mem)

    def forward(self, z: Tensor, pair_mask: Tensor) -> Tensor:
        if self.mem.triangle_kernel == "cueq" and (out := cueq.triangle_attention(self, z, pair_mask)) is not None:
            return out
        if not self.starting:
            z, pair_mask = z.transpose(-2, -3), pair_mask.transpose(-1, -2)
        chunk = self.mem.pair_chunk
        if chunk is None and self.mem.attention_chunk_mb is None:
            z_ln = self.norm(z)
            out = row_attention(None, self.attention, z_ln, pair_mask, self._bias(z_ln), None)
        else:
            # Chunked: LN runs inside each chunk and the bias is recomputed, so only z is kept for backward.
            bias = recompute(lambda z_: self._bias(self.norm(z_)), z)
            out = row_attention(self.norm, self.attention, z, pair_mask, bias, chunk)
        return out if self.starting else out.transpose(-2, -3)

    def _bias(self, z_ln: Tensor) -> Tensor:
        return self.linear_b(z_ln).movedim(-1, -3)  # [*, H, N, N]

    def add_into(self, z: Tensor, pair_mask: Tensor, emit: Emit) -> None:
        """No grad: LN(z) only inside row chunks (bias [*, H, N, N] built chunk by chunk), and each row chunk's
        output goes to `emit` (in z's coordinates: rows of z, or columns for the ending-node form)."""
        dim = -3 if self.starting else -2
        if not self.starting:
            z, pair_mask = z.transpose(-2, -3), pair_mask.transpose(-1, -2)
        rows = infer_rows(self.mem, z.shape[-3])
        bias = pair_bias_rows(self.norm, self.linear_b, z, rows)

        def out(start: int, n: int, update: Tensor) -> None:
            emit(dim, start, n, update if self.starting else update.transpose(-2, -3))

        row_attention(self.norm, self.attention, z, pair_mask, bias, rows, emit=out)
