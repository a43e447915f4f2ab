"""GPU tests compare kernels in fp32: keep fp32 matrix products in full precision (no TF32) whatever an earlier
test set, and restore the settings afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def full_fp32_precision():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def nonzero_final_layers(mod: torch.nn.Module) -> torch.nn.Module:
    """`mod` on CUDA with every parameter nudged (seeded): AF2's final layers and gates start at zero, which would
    leave most gradients zero and a comparison of them vacuous."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mod.cuda()
