"""`memory.triangle_kernel: cueq` where the kernels cannot run (here: the CPU) runs protfold's own path, with one
log line; a value other than torch / cueq is a config error. The kernels themselves: tests/gpu/test_cueq_gpu.py."""

from __future__ import annotations

import logging

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model.plan import resolve
from protfold.model.triangle import TriangleAttention, TriangleMultiplication


def test_cueq_on_cpu_falls_back_to_the_plain_path_logged_once(caplog) -> None:
    z = torch.randn(2, 7, 7, 8)
    mask = (torch.rand(2, 7, 7) > 0.2).float()
    caplog.set_level(logging.WARNING, logger="protfold.model.kernels.cueq")
    plain, fused = (resolve(MemoryConfig(triangle_kernel=k), grad=True, device="cpu") for k in ("torch", "cueq"))
    for module in (TriangleMultiplication(c_z=8, c_hidden=8, outgoing=True),
                   TriangleAttention(c_z=8, c_hidden=4, n_heads=2, starting=False)):
        for _ in range(2):
            torch.testing.assert_close(module(z, mask, plan=fused), module(z, mask, plan=plain), rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if "triangle_kernel=cueq" in r.getMessage()]
    assert len(lines) == 1 and "need CUDA" in lines[0], lines


def test_triangle_kernel_is_validated() -> None:
    with pytest.raises(ValueError, match="MemoryConfig.triangle_kernel must be 'torch' or 'cueq', got 'triton'"):
        MemoryConfig(triangle_kernel="triton")
