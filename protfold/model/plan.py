"""The memory plan: a `MemoryConfig` resolved once for the grad mode and device at hand, passed to `forward`.

`MemoryConfig` is what a user asks for; `MemoryPlan` is what runs. `resolve` decides each switch once: the
recompute and compile switches act only with grad, the host copy of the triangle edge and the in-place row-chunked
update only without grad, FlexAttention only on CUDA. Modules store no memory setting: every `forward` that
consults one takes the plan as the required keyword argument `plan`, and callers pass it down. A checkpointed
function receives the plan as an argument, so its recompute in backward runs with the plan of its forward.
"""

from __future__ import annotations

import logging
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
    attention: Literal["naive", "sdpa", "flex"] = "naive"
    low_memory_triangle: bool = False
    triangle_slice_mb: float = DEFAULT_TRIANGLE_SLICE_MB
    offload_triangle_edge: bool = False
    inplace: bool = False
    structure_chunk: int | None = None
    head_chunk: int | None = None
    pair_storage: Literal["fp32", "bf16"] = "fp32"
    triangle_kernel: Literal["torch", "cueq"] = "torch"


_flex_warned: set[str] = set()


def resolve(memory: MemoryConfig, *, grad: bool, device: torch.device | str) -> MemoryPlan:
    """The plan for `memory` when the model runs with grad on or off, on `device`."""
    device_type = torch.device(device).type
    attention = memory.attention
    if attention == "flex" and device_type != "cuda":
        if device_type not in _flex_warned:
            _flex_warned.add(device_type)
            log.warning("MemoryConfig.attention='flex' needs CUDA; running the naive kernel for %s", device_type)
        attention = "naive"
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
