"""Exponential moving average of model weights (AF2 supplement 1.11.7, decay 0.999)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    """Shadow copy of a module's floating-point parameters and buffers, kept in fp32.

    `reset()` restarts the average from the module's current weights: fine-tuning calls it after
    loading a checkpoint so the average never drags stale weights along (OpenFold issue #426).
    """

    def __init__(self, module: nn.Module, *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    def _tracked(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if torch.is_floating_point(tensor):
                yield name, tensor

    def reset(self) -> None:
        self.shadow = {name: t.detach().float().clone() for name, t in self._tracked()}

    @torch.no_grad()
    def update(self) -> None:
        for name, tensor in self._tracked():
            shadow = self.shadow[name]
            if shadow.device != tensor.device:
                shadow = self.shadow[name] = shadow.to(tensor.device)
            shadow.lerp_(tensor.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the module (validation, prediction)."""
        backup = {name: t.detach().clone() for name, t in self._tracked()}
        self._copy_into_module(self.shadow)
        try:
            yield
        finally:
            self._copy_into_module(backup)

    @torch.no_grad()
    def _copy_into_module(self, values: dict[str, torch.Tensor]) -> None:
        for name, tensor in self._tracked():
            tensor.copy_(values[name].to(device=tensor.device, dtype=tensor.dtype))

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        device = {name: t.device for name, t in self._tracked()}
        self.shadow = {k: v.float().to(device[k]) for k, v in shadow.items() if k in device}
