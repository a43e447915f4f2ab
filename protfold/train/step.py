"""One training step, shared by `protfold fit` (`ProtfoldModule.training_step`) and `protfold bench`.

`training_loss` is the part both commands must compute alike: the forward pass with recycling and the AF2
loss. Backward stays with the caller: `fit` goes through Lightning's `manual_backward` (so precision plugins
and strategies apply), the bench calls `backward` inside its meters. The optimiser side is shared too:
`freeze_unused_heads` decides what is trained, `adam` builds the optimiser, and `clip_and_step` is the update
both apply when no gradient scaler is involved (fp32 and bf16; with fp16's scaler `fit` lets Lightning unscale
and clip).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from protfold.config import LossConfig, MemoryConfig, OptimConfig
from protfold.losses import alphafold_loss
from protfold.train.optimizers import build_adam, step_params, wait_for_grads

__all__ = ["adam", "clip_and_step", "freeze_unused_heads", "training_loss"]


def training_loss(model: nn.Module, batch: dict[str, Tensor], *, n_recycles: int, loss_cfg: LossConfig,
                  clamped_fape: bool, memory: MemoryConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward with `n_recycles` no-grad recycling passes before the grad pass (memory settings `memory`), then
    the AF2 loss.

    Returns (scalar loss, per-term batch means, unweighted). Dropout draws from the global generator: callers
    seed it to get the same masks (fit per step and micro-batch, the bench once per mode).
    """
    outputs = model(batch, n_recycles=n_recycles, memory=memory)
    return alphafold_loss(outputs, batch, loss_cfg, use_clamped_fape=clamped_fape)


def freeze_unused_heads(model: nn.Module, loss_cfg: LossConfig) -> None:
    """Take the experimentally resolved and PAE heads out of training when their loss weight is 0.

    No loss term reaches them then (AF2 trains both only in fine-tuning); an optimiser would still keep state
    for them, and DDP stops at the second step on parameters that get no gradient.
    """
    heads = model.heads
    for head, weight in ((heads.experimentally_resolved, loss_cfg.experimentally_resolved),
                         (heads.predicted_aligned_error, loss_cfg.pae)):
        if head is not None and weight == 0:
            head.requires_grad_(False)


def adam(params: Iterable[Tensor], optim: OptimConfig, *, device: torch.device | None = None) -> torch.optim.Optimizer:
    """AF2's optimiser (supplement 1.11.3): Adam with the recipe's learning rate, betas and eps, its state kept
    as `optim.state` says (`protfold.train.optimizers`)."""
    return build_adam(params, optim, device=device)


def clip_and_step(opt: torch.optim.Optimizer, params: list[Tensor], max_norm: float) -> None:
    """Clip the gradients' global norm to `max_norm`, then take the optimiser step.

    `params` are the trainable parameters; an optimizer that steps on host copies of them (cpu_offload)
    clips those copies instead, the gradients its step reads."""
    offloads = hasattr(getattr(opt, "optimizer", opt), "wait_for_grads")
    wait_for_grads(opt)  # cpu_offload: the host copies of the gradients have landed before they are clipped
    torch.nn.utils.clip_grad_norm_(step_params(opt) if offloads else params, max_norm)
    opt.step()
