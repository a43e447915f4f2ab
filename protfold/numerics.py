"""Two tensor helpers used by the model and the losses alike, so they sit below both: the fp32 upcast of the
numerically sensitive parts and recompute-in-backward (activation checkpointing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def upcast(x: Tensor) -> Tensor:
    """x in at least fp32 (half types become fp32; fp32 and fp64 are kept, so float64 gradchecks stay exact)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def recompute(fn: Callable[..., Any], *args: Any, enabled: bool = True) -> Any:
    """`fn(*args)`, recomputed in backward instead of keeping its intermediates when `enabled` and grad is on.

    Non-reentrant checkpoint with the RNG state preserved, so dropout inside `fn` draws the same mask again.
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


__all__ = ["recompute", "upcast"]
