"""Sharded data parallel training: FSDP2 (`fully_shard`) through Lightning's ModelParallelStrategy.

`ShardedStrategy` is ModelParallelStrategy set up for plain sharded data parallelism: every rank is a data
parallel rank (no tensor parallelism), and a checkpoint is one file with the full weights and optimizer state,
assembled on rank 0, so it resumes at any number of processes and `protfold predict` / `convert` read it as
they read a one-device checkpoint. `ProtfoldModule.configure_model` calls `shard_model` under it.

What is sharded: the parameters, their gradients (reduce-scattered in backward) and Adam's moments (the
optimiser is built over the sharded parameters), and the EMA copy (`shard_ema`, saved full by `full_ema_state`).
Each Evoformer and extra-MSA block is one unit, gathered just before it runs and freed after; the model's own
block recompute stays inside (a recomputed block is gathered again in backward, as FSDP2 does for activation
checkpointing). With `compile_blocks` the compiled blocks are called without their module hooks, so the stacks
are the units instead (a stack is gathered whole).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ShardedStrategy", "full_ema_state", "is_sharded", "shard_ema", "shard_model"]


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks (one data-parallel mesh dimension), checkpoints saved full in one file.

    Args:
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory and step the
            optimizer there (FSDP2's CPUOffloadPolicy); for one GPU, `model.optim.state: cpu_offload` offloads
            only the optimizer state and is the lighter choice.
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3); False keeps
            them until backward (ZeRO-2-like: more memory, one all-gather fewer per unit).
        process_group_backend: `nccl` on GPUs, `gloo` on CPU by default.
    """

    def __init__(self, *, cpu_offload: bool = False, reshard_after_forward: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every process is a data-parallel rank: the mesh is (world_size, 1), the sampler splits data world ways
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


# `--trainer.strategy protfold_fsdp` (a class path as a string is not accepted there; YAML may also give the class
# with init_args, as configs/trainer/fsdp.yaml does)
for _name, _kwargs in (("protfold_fsdp", {}), ("protfold_fsdp_offload", {"cpu_offload": True})):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, ShardedStrategy, description=f"protfold's FSDP2 strategy {_kwargs}", **_kwargs)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_model(model: nn.Module, mesh: Any, *, compiled_blocks: bool, cpu_offload: bool = False,
                reshard_after_forward: bool = True) -> None:
    """Apply `fully_shard` to the AlphaFold network in place: units as the module docstring says, then the root
    (embedders, structure module, heads)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    stacks = [model.extra_msa_stack, model.evoformer]
    units = stacks if compiled_blocks else [block for stack in stacks for block in stack.blocks]
    units.append(model.structure_module)
    for unit in units:
        if any(True for _ in unit.parameters()):
            fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    log.info("sharded the model over %d ranks in %d units%s", mesh.size(), len(units) + 1,
             " (parameters, gradients and optimizer state in host memory)" if cpu_offload else "")


def shard_ema(ema: Any, model: nn.Module) -> None:
    """Give every EMA tensor of a sharded parameter that parameter's sharding (each rank keeps its shard). The
    full tensors are identical on every rank, so each rank takes its own shard without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, tensor in model.state_dict(keep_vars=True).items():
        shadow = ema.shadow.get(name)
        if isinstance(tensor, DTensor) and shadow is not None and not isinstance(shadow, DTensor):
            ema.shadow[name] = distribute_tensor(shadow.to(tensor.device), tensor.device_mesh, tensor.placements,
                                                 src_data_rank=None)


def full_ema_state(state: dict[str, Any]) -> dict[str, Any]:
    """An EMA state_dict whose sharded tensors are gathered to full CPU tensors (a collective: every rank calls
    it, as every rank runs `on_save_checkpoint`)."""
    from torch.distributed.tensor import DTensor

    shadow = {name: t.full_tensor().cpu() if isinstance(t, DTensor) else t for name, t in state["shadow"].items()}
    return {**state, "shadow": shadow}


def local_grad(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (its shard under FSDP2, the tensor itself otherwise)."""
    return grad.to_local() if hasattr(grad, "to_local") else grad
