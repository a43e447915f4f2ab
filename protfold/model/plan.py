"""The memory plan: a `MemoryConfig` resolved once for the grad mode and device at hand, passed to `forward`.

`MemoryConfig` is what a user asks for; `MemoryPlan` is what runs. `resolve` decides each switch once: the
recompute and compile switches act only with grad, the host copy of the triangle edge and the in-place row-chunked
update only without grad, FlexAttention and the Triton attention kernel only on CUDA. Modules store no memory
setting: every `forward` that consults one takes the plan as the required keyword argument `plan`, and callers
pass it down. A checkpointed function receives the plan as an argument, so its recompute in backward runs with
the plan of its forward.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch

from protfold.config import DEFAULT_TRIANGLE_SLICE_MB, MemoryConfig

log = logging.getLogger(__name__)

__all__ = ["MemoryPlan", "resolve"]


@dataclass(frozen=True)
class MemoryPlan:
    """What runs, for one grad mode on one device (fields as in `MemoryConfig`, already resolved).

    inplace: no grad, and a switch asks for chunking (pair_chunk, attention_chunk_mb or low_memory_triangle):
    Evoformer blocks add every pair update into z in place, row chunk by row chunk. Otherwise the plain
    update order runs, which costs fewer kernel launches at small crops.
    structure_chunk, head_chunk: no grad only (None with grad): IPA's query rows and the PAE head's pair rows
    per chunk (`MemoryConfig`). pair_storage: no grad only ("fp32" with grad): the dtype z is kept in.
    """

    grad: bool
    blocks_per_checkpoint: int | None = None
    recompute_inside_block: bool = False
    checkpoint_storage: Literal["fp32", "bf16", "cpu"] = "fp32"
    compile_blocks: bool = False
    recompute_structure: bool = False
    msa_chunk: int | None = None
    pair_chunk: int | None = None
    attention_chunk_mb: float | None = None
    attention: Literal["naive", "sdpa", "flex", "triton"] = "naive"
    low_memory_triangle: bool = False
    triangle_slice_mb: float = DEFAULT_TRIANGLE_SLICE_MB
    offload_triangle_edge: bool = False
    inplace: bool = False
    structure_chunk: int | None = None
    head_chunk: int | None = None
    pair_storage: Literal["fp32", "bf16"] = "fp32"
    triangle_kernel: Literal["torch", "cueq"] = "torch"


_fallback_warned: set[tuple[str, str]] = set()


def _attention_kernel(attention: str, device_type: str) -> str:
    """`attention` where it can run on `device_type`, else "naive", with a warning once per (kernel, device)."""
    reason = None
    if attention == "flex" and device_type != "cuda":
        reason = "needs CUDA"
    elif attention == "triton":
        # Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on the CPU: how the CPU tests check it.
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
        elif importlib.util.find_spec("triton") is None:
            reason = "needs the triton package (it comes with CUDA builds of torch)"
    if reason is None:
        return attention
    if (attention, device_type) not in _fallback_warned:
        _fallback_warned.add((attention, device_type))
        log.warning("MemoryConfig.attention=%r %s; running the naive kernel for %s", attention, reason, device_type)
    return "naive"


def resolve(memory: MemoryConfig, *, grad: bool, device: torch.device | str) -> MemoryPlan:
    """The plan for `memory` when the model runs with grad on or off, on `device`."""
    device_type = torch.device(device).type
    attention = _attention_kernel(memory.attention, device_type)
    chunked = memory.pair_chunk is not None or memory.attention_chunk_mb is not None or memory.low_memory_triangle
    return MemoryPlan(
        grad=grad,
        blocks_per_checkpoint=memory.blocks_per_checkpoint if grad else None,
        recompute_inside_block=memory.recompute_inside_block and grad,
        checkpoint_storage=memory.checkpoint_storage if grad else "fp32",
        compile_blocks=memory.compile_blocks and grad,
        recompute_structure=memory.recompute_structure and grad,
        msa_chunk=memory.msa_chunk,
        pair_chunk=memory.pair_chunk,
        attention_chunk_mb=memory.attention_chunk_mb,
        attention=attention,
        low_memory_triangle=memory.low_memory_triangle,
        triangle_slice_mb=memory.triangle_slice_mb or DEFAULT_TRIANGLE_SLICE_MB,
        offload_triangle_edge=memory.offload_triangle_edge and not grad,
        inplace=chunked and not grad,
        structure_chunk=None if grad else memory.structure_chunk,
        head_chunk=None if grad else memory.head_chunk,
        pair_storage="fp32" if grad else memory.pair_storage,
        triangle_kernel=memory.triangle_kernel,
    )
