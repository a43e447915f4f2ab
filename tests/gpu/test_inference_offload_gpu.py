"""The no-grad triangle update with its combined edge in pinned host memory, on the GPU (skipped without CUDA):
same output as on the device, and a device peak lower by about the edge's bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protfold.config import load_memory_preset, model_preset
from protfold.model.evoformer import EvoformerBlock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_offloaded_triangle_edge_same_output_lower_peak() -> None:
    dev, n, rows = torch.device("cuda"), 768, 32
    cfg = model_preset("af2")
    torch.manual_seed(0)
    block = EvoformerBlock.from_config(cfg, mem=load_memory_preset("low")).to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(1)
    m0 = torch.randn(1, rows, n, cfg.c_m, device=dev, generator=gen, dtype=torch.bfloat16)
    z0 = torch.randn(1, n, n, cfg.c_z, device=dev, generator=gen, dtype=torch.bfloat16)
    masks = torch.ones(1, rows, n, device=dev, dtype=torch.bfloat16), torch.ones(1, n, n, device=dev, dtype=torch.bfloat16)
    results = {}
    for host in (False, True):
        mem = dataclasses.replace(load_memory_preset("low"), offload_triangle_edge=host)
        for sub in block.modules():
            if hasattr(sub, "mem"):
                sub.mem = mem
        m, z = m0.clone(), z0.clone()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            _, z_out = block(m, z, *masks, inplace=True)
        torch.cuda.synchronize()
        results[host] = (z_out.float().cpu(), torch.cuda.max_memory_allocated() - start)
        del m, z, z_out
    edge_bytes = n * n * cfg.tri_mul_hidden * 2  # the combined edge in bf16
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert results[True][1] < results[False][1] - 0.5 * edge_bytes, (results[True][1], results[False][1], edge_bytes)
