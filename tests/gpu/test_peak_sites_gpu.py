"""`--peak-sites` on a recorded CUDA step (skipped without CUDA): the summary's peak matches the allocator's own
peak of requested bytes above the step's start, and a large site is a line of the model, not the bench."""

from __future__ import annotations

import pytest
import torch

from protfold.bench.peak_sites import record_peak_sites
from protfold.config import load_memory_preset, model_preset
from protfold.model.evoformer import EvoformerBlock
from protfold.model.plan import resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_recorded_peak_matches_the_allocator() -> None:
    dev, cfg = torch.device("cuda"), model_preset("small")
    torch.manual_seed(0)
    block = EvoformerBlock.from_config(cfg).to(dev)
    plan = resolve(load_memory_preset("none"), grad=True, device=dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    m = torch.randn(1, 16, 128, cfg.c_m, device=dev, generator=gen, requires_grad=True)
    z = torch.randn(1, 128, 128, cfg.c_z, device=dev, generator=gen, requires_grad=True)
    msa_mask = (torch.rand(1, 16, 128, device=dev, generator=gen) > 0.1).float()
    pair_mask = (torch.rand(1, 128, 128, device=dev, generator=gen) > 0.1).float()

    def step() -> None:
        out_m, out_z = block(m, z, msa_mask, pair_mask, plan=plan)
        (out_m.square().mean() + out_z.square().mean()).backward()
        block.zero_grad(set_to_none=True)
        m.grad = z.grad = None

    step()  # allocator warm; the recorded step then starts from the same state as the measured one
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["requested_bytes.all.current"]
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.memory_stats()["requested_bytes.all.peak"] - before
    got = record_peak_sites(step, dev)
    assert not got["truncated"] and got["events"] > 0
    assert abs(got["peak_bytes"] - measured) <= 0.02 * measured, (got["peak_bytes"], measured)
    assert sum(size for _, size, _ in got["sites"]) == got["peak_bytes"]
    assert any(site.startswith("model/") for site, _, _ in got["sites"][:3]), got["sites"]
