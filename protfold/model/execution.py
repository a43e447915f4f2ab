"""Executors of the Evoformer block (AF2 supplement, Algorithm 6): how its table of residual updates runs.

`EvoformerBlock.updates` lists the nine residual updates of Algorithm 6 (and of the extra MSA block, Algorithm
18) once, in order: which stream each one updates, which module computes it, which shared dropout applies.
`run_block` runs that table one of two ways, as the `MemoryPlan` says:

- graph path (with grad, and without grad when no chunking is asked for): stream = stream + dropout(module(...)),
  each update recomputed in backward on its own with `plan.recompute_inside_block`;
- in-place path (`plan.inplace`, no grad only): the MSA updates as above, then every pair update added into z in
  place, row chunk by row chunk (`add_into`), so nothing pair-sized besides z lives beyond one chunk (except the
  low-memory triangle multiplication's combined edge). Each chunk computes exactly what the whole update
  computes for its rows, so both paths give the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from protfold.model import triangle_exec
from protfold.model.memory import check_grad, chunk_rows, infer_rows, recompute
from protfold.model.plan import MemoryPlan
from protfold.model.primitives import pair_bias_rows, row_attention
from protfold.model.triangle import Transition, TriangleAttention, TriangleMultiplication
from protfold.model.triangle_exec import Emit

__all__ = ["AddInto", "Update", "add_into", "run_block"]


@dataclass(frozen=True)
class Update:
    """One residual update: `stream` += `dropout`(`module`(*`inputs`, plan=plan)); names are block attributes,
    inputs are among "m", "z", "msa_mask", "pair_mask"."""

    stream: Literal["m", "z"]
    module: str
    inputs: tuple[str, ...]
    dropout: str | None = None


def _add(x: Tensor, update: Tensor, *, fresh: bool) -> Tensor:
    """x + update in x's dtype; in place when grad is off and x was made inside this block (never the caller's).

    The residual stream keeps its dtype: an fp32 stream stays fp32 under autocast, and a bf16 stream (pure bf16
    inference) is not widened to fp32 by an fp32 update, which would double every later pair-sized buffer.
    """
    update = update.to(x.dtype)
    if fresh and not torch.is_grad_enabled():
        return x.add_(update)
    return x + update


def _operands(u: Update) -> tuple[str, ...]:
    """The tensors the update's step reads: the stream first when the module does not read it itself."""
    return u.inputs if u.stream in u.inputs else (u.stream, *u.inputs)


def _step(block: nn.Module, u: Update, plan: MemoryPlan, fresh: bool, *args: Tensor) -> Tensor:
    """One update on the graph path: the new stream from the operands `args` (named by `_operands(u)`)."""
    names = _operands(u)
    update = getattr(block, u.module)(*args[names.index(u.inputs[0]):], plan=plan)
    if u.dropout is not None:
        update = getattr(block, u.dropout)(update)
    return _add(args[names.index(u.stream)], update, fresh=fresh)


def run_block(block: nn.Module, m: Tensor, z: Tensor, msa_mask: Tensor, pair_mask: Tensor, *, plan: MemoryPlan,
              inplace: bool = False) -> tuple[Tensor, Tensor]:
    """`block.updates` applied to (m, z) in order. `inplace` (no grad only): the caller's m and z may be
    overwritten (the stacks pass it for every block whose inputs they made); otherwise they stay untouched."""
    check_grad(plan)
    streams = {"m": m, "z": z, "msa_mask": msa_mask, "pair_mask": pair_mask}
    written: set[str] = set(("m", "z") if inplace and plan.inplace else ())  # streams it may write into
    for u in block.updates:
        # one profiler range per update (GPU profiles by update); not traced into a compiled block's graph
        with contextlib.nullcontext() if torch.compiler.is_compiling() else record_function(f"update:{u.module}"):
            _run_update(block, u, plan, streams, written)
        written.add(u.stream)
    return streams["m"], streams["z"]


def _run_update(block: nn.Module, u: Update, plan: MemoryPlan, streams: dict[str, Tensor], written: set[str]) -> None:
    """One update of `run_block`: `streams[u.stream]` replaced (graph path) or written into (in-place path)."""
    if plan.inplace and u.stream == "z":
        if "z" not in written:
            streams["z"] = streams["z"].clone()  # one copy per user-facing call; later updates go into it
        dropout = getattr(block, u.dropout) if u.dropout is not None else None
        add_into(getattr(block, u.module), *(streams[k] for k in u.inputs), plan=plan,
                 emit=AddInto(streams["z"], dropout))
    else:
        fresh = u.stream in written
        args = [streams[k] for k in _operands(u)]
        streams[u.stream] = recompute(lambda *a, u=u, fresh=fresh: _step(block, u, plan, fresh, *a), *args,
                                      enabled=plan.recompute_inside_block)


class AddInto:
    """No grad: `emit(dim, start, n, update)` adds a chunk of a pair update (dropout applied) into z in place.

    Equal to `z + dropout(update)` of the whole update: the dropout mask is drawn once, at the first chunk, with
    the shape and dtype the whole update would have (same random draw), and applied to each chunk's slice.
    """

    def __init__(self, z: Tensor, dropout: nn.Module | None) -> None:
        self.z, self.keep = z, None
        self.dropout = dropout if getattr(dropout, "active", False) else None

    def __call__(self, dim: int, start: int, n: int, update: Tensor) -> None:
        if self.dropout is not None:
            if self.keep is None:
                self.keep = self.dropout.keep_mask(update, self.z.shape)
            keep = self.keep if self.keep.shape[dim] == 1 else self.keep.narrow(dim, start, n)
            update = update * keep / (1.0 - self.dropout.p)
        self.z.narrow(dim, start, n).add_(update.to(self.z.dtype))


def add_into(module: nn.Module, *inputs: Tensor, plan: MemoryPlan, emit: Emit) -> None:
    """No grad: the update `module(*inputs, plan=plan)` of the pair stream, handed to `emit` row chunk by row chunk
    (in z's coordinates) instead of returned whole."""
    if isinstance(module, TriangleMultiplication):
        triangle_exec.add_into(module, *inputs, plan, emit)
    elif isinstance(module, TriangleAttention):
        _triangle_attention_into(module, *inputs, plan, emit)
    elif isinstance(module, Transition):
        x, mask = inputs
        rows = getattr(plan, module.chunk_field) or infer_rows(plan, x.shape[-3])
        _rows_into(module._rows, [x, mask], [-3, -2], rows, emit)
    else:
        _outer_product_mean_into(module, *inputs, plan, emit)


def _rows_into(fn: Callable[..., Tensor], args: list[Any], dims: list[int | None], rows: int, emit: Emit) -> None:
    chunk_rows(fn, args, dims, rows, out_dim=-3, emit=lambda s, n, u: emit(-3, s, n, u))


def _triangle_attention_into(mod: TriangleAttention, z: Tensor, pair_mask: Tensor, plan: MemoryPlan,
                             emit: Emit) -> None:
    """LN(z) only inside row chunks (bias [*, H, N, N] built chunk by chunk); each row chunk's output goes to
    `emit` in z's coordinates: rows of z, or columns for the ending-node form."""
    dim = -3 if mod.starting else -2
    if not mod.starting:
        z, pair_mask = z.transpose(-2, -3), pair_mask.transpose(-1, -2)
    rows = infer_rows(plan, z.shape[-3])
    bias = pair_bias_rows(mod.norm, mod.linear_b, z, rows, fp32=plan.attention == "naive")

    def out(start: int, n: int, update: Tensor) -> None:
        emit(dim, start, n, update if mod.starting else update.transpose(-2, -3))

    row_attention(mod.norm, mod.attention, z, pair_mask, bias, rows, plan=plan, emit=out)


def _outer_product_mean_into(mod: nn.Module, m: Tensor, msa_mask: Tensor, plan: MemoryPlan, emit: Emit) -> None:
    """A row of the outer product has c_hidden² channels (8x c_z in af2), so the rows per chunk are cut by
    c_z / c_hidden² to keep one chunk's outer product no larger than a pair-row chunk."""
    a, b, count = mod._inputs(m, msa_mask)
    c_hidden, c_z = mod.linear_a.out_features, mod.linear_o.out_features
    rows = max(1, infer_rows(plan, a.shape[-2]) * c_z // (c_hidden * c_hidden))
    _rows_into(mod._rows, [a, b, count], [-2, None, -3], rows, emit)
