"""Exponential moving average of model weights (AF2 supplement 1.11.7, decay 0.999)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

EMA_STORAGES = ("fp32", "bf16", "cpu")


class EMA:
    """Shadow copy of a module's floating-point parameters and buffers.

    `storage` says where the copy lives: "fp32" beside the weights (4 bytes a value on the device), "bf16"
    beside the weights (2 bytes), "cpu" in fp32 in host memory (no device bytes; each update copies the
    weights to the host). fp32 and cpu compute the same average. bf16 computes each update in fp32 and rounds
    it stochastically: with decay 0.999 an update moves a weight by 1e-3 of its distance to the average, far
    below bf16's resolution (2^-8 relative), so round-to-nearest would freeze the average; stochastic
    rounding keeps it right in expectation, within one bf16 step of the fp32 update each time.

    `reset()` restarts the average from the module's current weights: fine-tuning calls it after
    loading a checkpoint so the average never drags stale weights along (OpenFold issue #426).
    """

    def __init__(self, module: nn.Module, *, decay: float, storage: str = "fp32", seed: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if storage not in EMA_STORAGES:
            raise ValueError(f"optim.ema_storage must be one of {', '.join(EMA_STORAGES)}, got {storage!r}")
        self.module = module
        self.decay = decay
        self.storage = storage
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    def _tracked(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if torch.is_floating_point(tensor):
                yield name, tensor

    def _stored(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`t` as this storage keeps it (a copy)."""
        if self.storage == "cpu":
            return t.detach().to(device="cpu", dtype=torch.float32, copy=True)
        dtype = torch.bfloat16 if self.storage == "bf16" else torch.float32
        return t.detach().to(device=device, dtype=dtype, copy=True)

    def reset(self) -> None:
        self.shadow = {name: self._stored(t, t.device) for name, t in self._tracked()}

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.decay
        for name, tensor in self._tracked():
            shadow = self.shadow[name]
            if self.storage != "cpu" and shadow.device != tensor.device:
                shadow = self.shadow[name] = shadow.to(tensor.device)
            value = tensor.detach().to(device=shadow.device, dtype=torch.float32)
            if self.storage == "bf16":
                shadow.copy_(self._round_bf16(shadow.float().lerp_(value, weight)))
            else:
                shadow.lerp_(value, weight)

    def _round_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 -> bf16 by stochastic rounding: add 16 random low bits, then truncate (exact in bf16)."""
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
        bits = (x.contiguous().view(torch.int32) + noise) & -65536
        rounded = bits.view(torch.float32)
        # a carry out of the largest finite values would give inf: keep those round-to-nearest
        return torch.where(torch.isfinite(rounded), rounded, x).to(torch.bfloat16)

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
        return {"decay": self.decay, "storage": self.storage, "shadow": {k: v.cpu() for k, v in self.shadow.items()},
                "rng": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        device = {name: t.device for name, t in self._tracked()}
        self.shadow = {k: self._stored(v, device[k]) for k, v in shadow.items() if k in device}
        for name, rng in dict(state.get("rng", {})).items():  # type: ignore[arg-type]
            dev = torch.device(name)
            if dev.type == "cuda" and not torch.cuda.is_available():
                continue  # written on a GPU, read without one: a fresh stream of rounding draws
            self._generators[dev] = torch.Generator(device=dev).manual_seed(self.seed)
            self._generators[dev].set_state(rng)
