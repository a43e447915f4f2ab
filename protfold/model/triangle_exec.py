"""Low-memory executors of the triangle multiplicative update (AF2 supplement, Algorithms 11 and 12).

They run the arithmetic of `TriangleMultiplication` (`_project`, `_combine`, `_finish`, `_channels`) in pieces,
so that no [*, N, N, c_hidden] intermediate is kept for backward and, without grad, as few pair-sized tensors as
possible live at once. Every piece computes exactly what the plain forward computes for its rows or channels.

With grad (`low_memory_update`): the whole update is recomputed in backward (only z is kept); inside it, for
large N, the projections and gates are made one channel slice at a time (slices of at most
`plan.triangle_slice_mb` per fp32 edge) and recomputed per slice, the output gate per row chunk.

Without grad (`combined_edge`, then `finish_rows`): b is built channels-first in at least fp32, one channel slice
at a time from row chunks of z (at most `_INFER_EDGE_FRACTION` of z's bytes counted in fp32, as the planner counts
the slice whatever dtype z is stored in; more with large row chunks), a only
for each output row chunk, so the k-sum is a batched matmul with no permuted copies; the combined edge
x [*, N, N, c_hidden] is complete before any output row is made. `add_into` adds the output into z row chunk by
row chunk (x reads all of z, and each output row chunk needs only its own rows of z and x); `low_memory_update`
writes it over x instead. With `plan.offload_triangle_edge` x lives in host memory, one [*, N, N, width]
tensor per channel slice: pinned where the host can lock it, else (once a pinned allocation has failed for lack of
memory, for the rest of the process) pageable, with the same results and slower copies (`_host_buffer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from protfold.model.memory import chunk_rows, fp32_island, infer_rows, norm_for_linear, recompute, upcast
from protfold.model.plan import MemoryPlan

__all__ = ["Emit", "add_into", "low_memory_update", "slices", "train_slices"]

log = logging.getLogger(__name__)

# Emit(dim, start, n, update): add `update` (the module's output for positions start:start+n along `dim` of z,
# dim -3 rows or -2 columns) into the residual stream in place. Used by the no-grad in-place executors.
Emit = Callable[[int, int, int, Tensor], None]

_ROW_CHUNKS_TRAIN = 4  # with grad: rows of z in this many slices for the output gate when pair_chunk is unset
# no grad: one fp32 [slice, N, N] edge is at most this fraction of z's bytes
_INFER_EDGE_FRACTION = 1 / 16
# With row chunks of at least N / _INFER_EDGE_MIN_PARTS rows (the planner picks them when memory is plentiful) the
# slice may be larger: the fraction of z's bytes counted in fp32 (as the planner counts the slice), plus this many
# fp32 row chunks of z ([rows, N, c_z] each), room the planner counts as one pair-row chunk's transients (the pair
# transition's hidden rows, 2 x transition_factor of them, and the OPM's outer products), not alive while the
# triangle update runs. Each slice remakes LN(z) and the projections for every row of z, so wider slices cut that
# work (2 slices instead of 32 for a bf16 z with 1024-row chunks at N = 4096). Memory-tight plans (small chunks)
# keep the fraction of z's own bytes: the room would widen their slices little and raise their peak.
_INFER_EDGE_ROW_CHUNKS = 2
_INFER_EDGE_MIN_PARTS = 8
# Set when a pinned allocation has failed for lack of memory: the host edge is pageable from then on.
_pin_failed = False


def slices(c_hidden: int, parts: int) -> list[slice]:
    """c_hidden channels in `parts` slices of equal width (the last one narrower)."""
    step = max(1, -(-c_hidden // parts))
    return [slice(s, min(s + step, c_hidden)) for s in range(0, c_hidden, step)]


def train_slices(mod: Any, z: Tensor, plan: MemoryPlan) -> list[slice]:
    """As few channel slices as keep each fp32 [N, N, slice] edge within `plan.triangle_slice_mb`.

    Slicing is exact but costs kernel launches, which dominate at small N on a GPU, so small pair tensors are
    not sliced.
    """
    per_channel = z.shape[-3] * z.shape[-2] * 4
    limit = max(1, int(plan.triangle_slice_mb * 2**20))  # below one byte: one channel per slice
    return slices(mod.c_hidden, max(1, -(-per_channel * mod.c_hidden // limit)))


def low_memory_update(mod: Any, z: Tensor, pair_mask: Tensor, plan: MemoryPlan) -> Tensor:
    """The update of `mod` (a TriangleMultiplication): recomputed in backward with grad, in pieces without."""
    if plan.grad:
        return recompute(_train, mod, z, pair_mask, plan)
    x, x_host = combined_edge(mod, z, pair_mask, plan)
    out = x if x is not None and x.shape[-1] == z.shape[-1] else None  # the output overwrites x row by row

    def write(dim: int, start: int, n: int, rows: Tensor) -> None:
        nonlocal out
        if out is None:
            out = rows.new_empty(z.shape)
        out.narrow(dim, start, n).copy_(rows)

    finish_rows(mod, z, x, x_host, plan, write)
    return out  # type: ignore[return-value]


def _train(mod: Any, z: Tensor, pair_mask: Tensor, plan: MemoryPlan) -> Tensor:
    z_ln = mod.norm_in(z)
    parts = train_slices(mod, z, plan)
    if len(parts) == 1:
        x = mod._channels(z_ln, pair_mask, 0, mod.c_hidden)
    else:
        x = torch.cat([recompute(mod._channels, z_ln, pair_mask, sl.start, sl.stop) for sl in parts], dim=-1)
    rows = plan.pair_chunk or max(1, -(-z.shape[-3] // _ROW_CHUNKS_TRAIN))
    return chunk_rows(mod._finish, [z_ln, x], [-3, -3], rows, out_dim=-3)


def add_into(mod: Any, z: Tensor, pair_mask: Tensor, plan: MemoryPlan, emit: Emit) -> None:
    """No grad: z += update, the update emitted row chunk by row chunk (`emit(-3, start, n, rows)`).

    Alive at once besides z: x [*, N, N, c_hidden] (compute dtype; on the host with offload), one fp32 b slice (a
    sixteenth of z in fp32 and two fp32 row chunks of z at most) and row-chunk transients, about 2.2x the pair
    tensor when c_hidden = c_z. Without low_memory_triangle: the plain update, added whole.
    """
    if not plan.low_memory_triangle:
        emit(-3, 0, z.shape[-3], mod(z, pair_mask, plan=plan))
        return
    x, x_host = combined_edge(mod, z, pair_mask, plan)
    finish_rows(mod, z, x, x_host, plan, emit)


def _rows_of(mod: Any, z: Tensor, pair_mask: Tensor, edge: str, sl: slice, start: int, n: int, dim: int) -> Tensor:
    """The projected edge for rows (dim -3) or columns (dim -2) start:start+n of z, hidden channels sl."""
    z_part = z.narrow(dim, start, n)
    return mod._project(norm_for_linear(mod.norm_in, z_part), pair_mask.narrow(dim + 1, start, n), edge, sl)


def combined_edge(mod: Any, z: Tensor, pair_mask: Tensor, plan: MemoryPlan) -> tuple[Tensor | None, list[Tensor]]:
    """No grad: x = the k-sum of Alg. 11/12 line 4, [*, N, N, c_hidden], on the device, or (with
    `plan.offload_triangle_edge`) as host tensors, one per channel slice. Returns (x or None, host slices)."""
    n_res = z.shape[-3]
    rows = infer_rows(plan, n_res)
    wide = max(z.element_size(), 4)  # z's bytes counted in fp32 (z in bf16 would halve the slice: twice the passes)
    edge_bytes = z.numel() * wide * _INFER_EDGE_FRACTION
    if rows * _INFER_EDGE_MIN_PARTS >= n_res:  # plentiful memory: wider slices (see _INFER_EDGE_ROW_CHUNKS)
        edge_bytes = z.numel() * wide * _INFER_EDGE_FRACTION + _INFER_EDGE_ROW_CHUNKS * wide * z.numel() // n_res * rows
    per_channel = z[..., 0].numel() * 4
    host = plan.offload_triangle_edge
    x: Tensor | None = None
    x_host: list[Tensor] = []
    for sl in slices(mod.c_hidden, max(1, -(-per_channel * mod.c_hidden // int(edge_bytes)))):
        # b for this slice, channels first and in at least fp32 (the exact up-cast of the compute-dtype
        # projection; a float64 model keeps float64, like `upcast` on a)
        b32: Tensor | None = None
        for start in range(0, n_res, rows):
            n = min(rows, n_res - start)
            part = _rows_of(mod, z, pair_mask, "b", sl, start, n, -3)
            if b32 is None:
                b32 = torch.empty(*z.shape[:-3], part.shape[-1], n_res, n_res, device=z.device,
                                  dtype=torch.promote_types(part.dtype, torch.float32))
                if host:  # this slice's part of x, in the compute dtype, in host memory
                    x_host.append(_host_buffer((*z.shape[:-1], sl.stop - sl.start), part.dtype, pin=z.is_cuda))
                elif x is None:  # x in the compute dtype (bf16 under autocast), like the plain path
                    x = z.new_empty(*z.shape[:-1], mod.c_hidden, dtype=part.dtype)
            b32.narrow(-2, start, n).copy_(part.movedim(-1, -3))
            del part
        assert b32 is not None
        # a only for the output rows i of this chunk: rows i of z (outgoing) or columns i (incoming)
        for start in range(0, n_res, rows):
            n = min(rows, n_res - start)
            a = _rows_of(mod, z, pair_mask, "a", sl, start, n, -3 if mod.outgoing else -2)
            a32 = upcast(a).movedim(-1, -3)  # [*, c, i, k] (outgoing) or [*, c, k, i] (incoming)
            del a
            if not mod.outgoing:
                a32 = a32.transpose(-1, -2)  # [*, c, i, k] from a_ki
            with fp32_island(a32):
                part = a32 @ b32.transpose(-1, -2) if mod.outgoing else a32 @ b32  # [*, c, i, j]
            del a32
            if host:  # rows i of this slice, made contiguous on the device: one contiguous async copy
                # (into pageable memory cudaMemcpyAsync returns only once the copy is done: `dst` holds the rows
                # when copy_ returns, and the device temporary is freed stream-ordered either way)
                dst = x_host[-1].narrow(-3, start, n)
                dst.copy_(part.movedim(-3, -1).to(dst.dtype).contiguous(), non_blocking=z.is_cuda)
            else:
                x.narrow(-3, start, n)[..., sl] = part.movedim(-3, -1)  # type: ignore[union-attr]
            del part
        del b32
    return x, x_host


def finish_rows(mod: Any, z: Tensor, x: Tensor | None, x_host: list[Tensor], plan: MemoryPlan, emit: Emit) -> None:
    """No grad: the output rows sigmoid(Linear_g(LN(z))) * Linear_o(LN(x)) (Alg. 11/12 lines 5-6), row chunk by
    row chunk, each handed to `emit(-3, start, n, rows)` as soon as it is made."""
    n_res = z.shape[-3]
    rows = infer_rows(plan, n_res)
    for start in range(0, n_res, rows):
        n = min(rows, n_res - start)
        # stream-ordered after the device-to-host copies: no host synchronisation needed. From pageable memory
        # cudaMemcpyAsync first waits for the stream, then stages the rows and returns once they are staged, so
        # the copy is as correct (and slower); x_host is not written again meanwhile either way.
        if x is None:
            x_rows = torch.cat([xs.narrow(-3, start, n).to(z.device, non_blocking=z.is_cuda) for xs in x_host], dim=-1)
        else:
            x_rows = x.narrow(-3, start, n)
        emit(-3, start, n, mod._finish(mod.norm_in(z.narrow(-3, start, n)), x_rows))
        del x_rows
    if x_host:
        x_host.clear()  # the edge's host buffers go back now
        if _pin_failed:  # and pinned blocks of an edge that pinning did not finish leave torch's cache
            _release_pinned_cache()


def _host_buffer(shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool) -> Tensor:
    """One channel slice of the no-grad combined edge in host memory: [*, N, N, width]. `pin` (z is on a GPU): in
    pinned memory, so every row chunk copied in or out is one contiguous asynchronous transfer, unless a pinned
    allocation has failed for lack of memory in this process (torch's host allocator rounds pinned blocks up to
    powers of two, and containers limit locked memory, so that happens while pageable memory is plentiful): then
    in pageable memory, logged once. Any other error propagates."""
    global _pin_failed
    if pin and not _pin_failed:
        try:
            return _pinned_empty(shape, dtype)
        # a failed pinned allocation raises a RuntimeError (torch.AcceleratorError from cudaHostAlloc in newer
        # torch, torch.OutOfMemoryError, or RuntimeError itself): told apart from other errors by the message
        except RuntimeError as err:
            if "out of memory" not in str(err).lower():
                raise
            _pin_failed = True
            size = torch.Size(shape).numel() * dtype.itemsize
            log.warning("protfold: could not allocate %.2f GiB of pinned host memory for the triangle edge (%s); "
                        "using pageable host memory for it from now on in this process: its copies are slower",
                        size / 2**30, str(err).splitlines()[0])
            _release_pinned_cache()
    return torch.empty(shape, dtype=dtype, device="cpu")


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor in pinned host memory (its own function, so tests can make it fail)."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)


def _release_pinned_cache() -> None:
    """Give torch's cached, unused pinned blocks back to the host: this path no longer reuses them. Only with a GPU
    (the call raises without one); `torch.accelerator.empty_host_cache` where it exists, else the older private
    CUDA binding."""
    if not torch.cuda.is_available():
        return
    release = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if release is not None:
        release()
