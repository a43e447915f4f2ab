"""The whole network: what each head reads, and float64 end to end."""

from __future__ import annotations

import pytest
import torch

from protfold.bench.synthetic import synthetic_batch
from protfold.config import MemoryConfig, model_preset
from protfold.model.alphafold import AlphaFold


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return synthetic_batch(9, 3, 2, seed=1)


def test_experimentally_resolved_head_reads_the_evoformer_single(batch, randomize) -> None:
    """AF2 supplement 1.9.10: the head is applied to the Evoformer's single representation s_i (Algorithm 2
    line 17's output, before the structure module), not to the structure module's single."""
    model = randomize(AlphaFold(cfg=model_preset("tiny"), mem=MemoryConfig())).eval()
    seen = {}
    model.evoformer.register_forward_hook(lambda mod, args, out: seen.__setitem__("s", out[2]))
    out = model(batch, n_recycles=1)
    expected = model.heads.experimentally_resolved(seen["s"])
    torch.testing.assert_close(out["experimentally_resolved_logits"], expected, rtol=0, atol=0)
    assert not torch.allclose(expected, model.heads.experimentally_resolved(out["single"]))
    torch.testing.assert_close(out["single_evoformer"], seen["s"], rtol=0, atol=0)
    # its gradient reaches the Evoformer, not the structure module
    model.train()
    out = model(batch, n_recycles=0)
    out["experimentally_resolved_logits"].square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.structure_module.parameters())
    assert model.evoformer.linear_s.weight.grad.abs().sum() > 0
