"""The no-grad triangle update with its combined edge in pinned host memory, on the GPU (skipped without CUDA).

The switch moves one tensor, the combined edge x [N, N, c_hidden], off the device, so the triangle update's own
peak must drop by about x's bytes, with the same output. A whole block's peak drops less where another op (the
outer product mean, triangle attention) sets it; for an af2 block at 4096 the H200 measured 6.32 against
9.20 GiB (benchmarks/RESULTS.md). The peak is read before any fp32 copy of the output, which on the GPU
(302 MB at N = 768) would set both peaks itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protfold.config import load_memory_preset, model_preset
from protfold.model.evoformer import EvoformerBlock
from protfold.model.execution import add_into
from protfold.model.plan import MemoryPlan, resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

N, ROWS = 768, 32


def _setup() -> tuple[EvoformerBlock, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dev, cfg = torch.device("cuda"), model_preset("af2")
    torch.manual_seed(0)
    block = EvoformerBlock.from_config(cfg).to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(1)
    m0 = torch.randn(1, ROWS, N, cfg.c_m, device=dev, generator=gen, dtype=torch.bfloat16)
    z0 = torch.randn(1, N, N, cfg.c_z, device=dev, generator=gen, dtype=torch.bfloat16)
    msa_mask = (torch.rand(1, ROWS, N, device=dev, generator=gen) > 0.1).to(torch.bfloat16)
    pair_mask = (torch.rand(1, N, N, device=dev, generator=gen) > 0.1).to(torch.bfloat16)
    return block, m0, z0, msa_mask, pair_mask


def _plan(host: bool) -> MemoryPlan:
    """The no-grad plan of the `low` preset, with or without the combined edge in host memory."""
    return resolve(dataclasses.replace(load_memory_preset("low"), offload_triangle_edge=host), grad=False,
                   device="cuda")


def _peak_above_start(fn) -> tuple[torch.Tensor, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start  # before the fp32 copy below, which would set the peak
    return out.float().cpu(), peak


def test_offloaded_edge_lowers_the_triangle_update_peak_by_the_edge() -> None:
    block, _, z0, _, pair_mask = _setup()
    edge_bytes = N * N * block.tri_mul_out.c_hidden * 2  # x in bf16
    results = {}
    for host in (False, True):
        z, plan = z0.clone(), _plan(host)

        def update(z: torch.Tensor = z, plan: MemoryPlan = plan) -> torch.Tensor:
            add_into(block.tri_mul_out, z, pair_mask, plan=plan,
                     emit=lambda dim, start, n, upd: z.narrow(dim, start, n).add_(upd))
            return z

        results[host] = _peak_above_start(update)
        del z
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    saved = results[False][1] - results[True][1]
    assert saved > 0.8 * edge_bytes, (results[False][1], results[True][1], edge_bytes)


def test_offloaded_edge_block_same_output_no_higher_peak() -> None:
    block, m0, z0, msa_mask, pair_mask = _setup()
    results = {}
    for host in (False, True):
        m, z, plan = m0.clone(), z0.clone(), _plan(host)
        results[host] = _peak_above_start(
            lambda m=m, z=z, plan=plan: block(m, z, msa_mask, pair_mask, plan=plan, inplace=True)[1])
        del m, z
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert results[True][1] <= results[False][1], (results[True][1], results[False][1])


def test_pageable_host_edge_equals_the_pinned_one(monkeypatch) -> None:
    """When pinning fails for lack of memory the edge is pageable (`triangle_exec._host_buffer`): its copies are
    synchronous (device to host) or staged (host to device), and the update is bit for bit the pinned one's."""
    import protfold.model.triangle_exec as triangle

    block, _, z0, _, pair_mask = _setup()
    plan = _plan(True)
    results, pinned = {}, {}
    plain = triangle._host_buffer

    def spy(shape, dtype, *, pin):
        buf = plain(shape, dtype, pin=pin)
        pinned.setdefault(pageable, []).append(buf.is_pinned())
        return buf

    monkeypatch.setattr(triangle, "_host_buffer", spy)
    for pageable in (False, True):
        monkeypatch.setattr(triangle, "_pin_failed", pageable)  # as after a failed pinned allocation
        z = z0.clone()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            add_into(block.tri_mul_out, z, pair_mask, plan=plan,
                     emit=lambda dim, start, n, upd, z=z: z.narrow(dim, start, n).add_(upd))
        torch.cuda.synchronize()
        results[pageable] = z.float().cpu()
    assert all(pinned[False]) and not any(pinned[True]), pinned
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)
