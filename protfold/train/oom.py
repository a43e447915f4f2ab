"""Recovery from out-of-memory errors: the ladder of memory presets a training run steps down.

The order is that of the presets' measured training peaks at initial shapes (af2, crop 256, 128 rows, 1024
extra, bf16; benchmarks/RESULTS.md): none (out of memory) and triangle (no block recompute, about as large)
> chunked 48.95 GiB > recompute 10.07 > offload 9.86 > compiled_inblock 8.05 > compiled 6.98 >
compiled_flex 3.65 > long 3.69 > low 2.11. compiled_flex comes before long although 0.04 GiB lower at 256:
at 768 residues it peaks at 14.93 GiB against long's 6.97, so long is the leaner at the crops that run out.
low_host is not on it: its switch acts without grad only (an inference mode).
"""

from __future__ import annotations

import math
import re

import torch

from protfold.config import MemoryConfig, load_memory_preset

MEMORY_LADDER = ("none", "triangle", "chunked", "recompute", "offload", "compiled_inblock", "compiled",
                 "compiled_flex", "long", "low")


def preset_name(mem: MemoryConfig) -> str | None:
    """The ladder preset equal to `mem`, or None for a configuration of other fields."""
    for name in MEMORY_LADDER:
        if load_memory_preset(name) == mem:
            return name
    return None


def next_leaner(mem: MemoryConfig) -> tuple[str, MemoryConfig] | None:
    """The next preset down the ladder from `mem` (from `long` for a configuration that is no preset, whose
    peak is not measured), or None from `low`, the leanest."""
    name = preset_name(mem)
    if name is None:
        nxt = "long"
    elif name == MEMORY_LADDER[-1]:
        return None
    else:
        nxt = MEMORY_LADDER[MEMORY_LADDER.index(name) + 1]
    return nxt, load_memory_preset(nxt)


def requested_bytes(err: BaseException) -> int:
    """The allocation that failed, read from torch's message ('Tried to allocate 2.00 GiB'); 0 if absent."""
    match = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", str(err))
    if not match:
        return 0
    scale = {"B": 0, "KiB": 1, "MiB": 2, "GiB": 3, "TiB": 4}[match.group(2)]
    return int(float(match.group(1)) * 1024 ** scale)


def crop_that_fits(crop: int, *, capacity: int, resident: int, peak: int, requested: int) -> int:
    """An estimate of the largest crop the leanest mode fits: its activation memory grows about as crop² (pair
    representation), so the crop is scaled by sqrt(memory left for activations / activations the failed step
    reached). The failed step needed at least `peak + requested` bytes, so this is an upper bound."""
    needed = max(peak + requested - resident, 1)
    return max(int(crop * math.sqrt(max(capacity - resident, 0) / needed)) // 8 * 8, 0)


def _device_resident(module, device) -> int:
    """Bytes of weights, gradients, optimizer state and EMA on `device` (quantized moments count as fp32)."""
    params = list(module.model.parameters())
    tensors = [*params, *(p.grad for p in params if p.grad is not None),
               *(t for t in module.ema.shadow.values() if t.device == device)]
    inner = getattr(module.optimizers(), "optimizer", None)
    for state in (inner.state.values() if inner is not None else ()):
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor) and t.device == device]
    return sum(t.numel() * t.element_size() for t in tensors)


def leanest_failed_message(module, batch: dict, mode: str, error: str) -> str:
    """The one-line stop of a run whose step does not fit in the leanest mode, with an estimated crop."""
    gib = 1024 ** 3
    device = module.device
    cuda = device.type == "cuda"
    capacity = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    resident = _device_resident(module, device)
    crop = int(batch["aatype"].shape[-1])
    fit = crop_that_fits(crop, capacity=capacity, resident=resident, peak=peak, requested=requested_bytes(error))
    return (f"out of memory at step {module.global_step} in the leanest memory mode {mode!r} with crop {crop}: a crop "
            f"of about {fit} residues or less should fit (estimate: activation memory ~ crop^2; {capacity / gib:.2f}"
            f" GiB on the device, {resident / gib:.2f} GiB of weights, gradients, optimizer state and EMA on it); "
            "lower data.crop_size, or use optim.state 8bit and optim.ema_storage cpu")


__all__ = ["MEMORY_LADDER", "crop_that_fits", "leanest_failed_message", "next_leaner", "preset_name",
           "requested_bytes"]
