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
    model = randomize(AlphaFold(cfg=model_preset("tiny"))).eval()
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


def _double(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no grad"])
@pytest.mark.parametrize("mem", [MemoryConfig(), MemoryConfig(low_memory_triangle=True)], ids=["plain", "low tri"])
def test_runs_in_float64(batch, randomize, grad: bool, mem: MemoryConfig) -> None:
    """`.double()` runs end to end (the fixture's float64 comparison needs it), recycling included, and every
    floating output is float64: nothing is rebuilt in float32 on the way (recycling distogram, triangle buffers)."""
    model = randomize(AlphaFold(cfg=model_preset("tiny_ptm"))).double().train(grad)
    with torch.set_grad_enabled(grad):
        out = model(_double(batch), n_recycles=1, memory=mem)
    floats = {k: v.dtype for k, v in out.items() if v.is_floating_point()}
    assert {"final_atom37", "pair", "single_evoformer", "predicted_aligned_error", "ptm"} <= floats.keys()
    assert set(floats.values()) == {torch.float64}, floats
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())
    if grad:
        out["final_atom37"].square().mean().backward()
        assert model.evoformer.linear_s.weight.grad.dtype == torch.float64


def test_low_memory_triangle_float64_equals_plain(batch, randomize) -> None:
    """No grad, float64: the low-memory triangle path (its float32 edge buffer now follows the compute dtype)
    gives the plain path's outputs to float64 round-off."""
    torch.manual_seed(2)
    ref = randomize(AlphaFold(cfg=model_preset("tiny_ptm"))).double().eval()
    with torch.no_grad():
        a = ref(_double(batch), n_recycles=1)
        b = ref(_double(batch), n_recycles=1, memory=MemoryConfig(low_memory_triangle=True))
    for key in ("final_atom37", "pair", "predicted_aligned_error", "ptm"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-10, msg=key)
