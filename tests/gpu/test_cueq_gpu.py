"""cuEquivariance kernels (`memory.triangle_kernel: cueq`) against protfold's own triangle updates on the GPU: the
output and every gradient (z's, the pair mask's module weights, the pair bias projection's, biases included), in
fp32 and under bf16 autocast, at the af2 widths, with random masks. Skipped without CUDA or without the packages
(`pip install protfold[cueq]`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model.kernels import cueq
from protfold.model.plan import resolve
from protfold.model.triangle import TriangleAttention, TriangleMultiplication

from .conftest import nonzero_final_layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("cuequivariance_torch") is None, reason="cuequivariance-torch missing"),
]

TORCH, CUEQ = MemoryConfig(), MemoryConfig(triangle_kernel="cueq")


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind.startswith("mul"):
        return nonzero_final_layers(TriangleMultiplication(c_z=128, c_hidden=128, outgoing=kind == "mul_out"))
    return nonzero_final_layers(TriangleAttention(c_z=128, c_hidden=32, n_heads=4, starting=kind == "att_start"))


def _run(kind: str, mem: MemoryConfig, z: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, autocast: bool,
         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    mod = _module(kind).to(dtype)
    z = z.detach().to(dtype).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = mod(z, mask.to(dtype), plan=resolve(mem, grad=True, device="cuda"))
    (out.to(dtype) * weights.to(dtype)).sum().backward()
    return {"out": out.detach().double(), "z": z.grad.double(),
            **{name: p.grad.double() for name, p in mod.named_parameters()}}


def _inputs(batch: int = 2, n: int = 64):
    gen = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn(batch, n, n, 128, device="cuda", generator=gen)
    mask = (torch.rand(batch, n, n, device="cuda", generator=gen) > 0.2).float()
    weights = torch.randn(batch, n, n, 128, device="cuda", generator=gen)
    return z, mask, weights


@pytest.mark.parametrize("kind", ["mul_out", "mul_in", "att_start", "att_end"])
def test_cueq_matches_torch_fp32(kind: str) -> None:
    assert cueq.available(torch.device("cuda"))
    z, mask, weights = _inputs()
    want, got = _run(kind, TORCH, z, mask, weights, False), _run(kind, CUEQ, z, mask, weights, False)
    assert got.keys() == want.keys() and len(want) >= 8
    for name in want:
        scale = float(want[name].abs().max())
        assert scale > 0, name  # every gradient is exercised
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=2e-4 * scale, msg=name)


@pytest.mark.parametrize("kind", ["mul_out", "mul_in", "att_start", "att_end"])
def test_cueq_under_bf16_autocast_is_as_close_to_fp32_as_torch(kind: str) -> None:
    """bf16 against bf16 through other kernels: cueq's error against the float64 result is within twice the plain
    path's own bf16 error (plus a floor of bf16 rounding), for the output and every gradient."""
    z, mask, weights = _inputs()
    exact = _run(kind, TORCH, z, mask, weights, False, dtype=torch.float64)
    plain, fused = _run(kind, TORCH, z, mask, weights, True), _run(kind, CUEQ, z, mask, weights, True)
    for name in exact:
        scale = float(exact[name].abs().max())
        err_plain = float((plain[name] - exact[name]).abs().max())
        err_fused = float((fused[name] - exact[name]).abs().max())
        assert err_fused <= 2 * err_plain + 8e-3 * scale, (name, err_fused, err_plain, scale)
