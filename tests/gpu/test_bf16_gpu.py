"""bf16 autocast against fp32 on the GPU, for the plain path and for `low` (needs CUDA; skipped without)."""

from __future__ import annotations

import pytest
import torch

from protfold.bench.synthetic import synthetic_batch
from protfold.config import LossConfig, MemoryConfig, model_preset
from protfold.losses import alphafold_loss
from protfold.model.alphafold import AlphaFold

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Documented tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per operation); through 2
# Evoformer blocks, the structure module and the losses the errors add up to about 1e-2 relative.
BF16_RTOL = 3e-2
LOW = MemoryConfig(blocks_per_checkpoint=1, recompute_inside_block=True, checkpoint_storage="cpu", msa_chunk=4,
                   pair_chunk=8, low_memory_triangle=True)


def _run(model: AlphaFold, batch: dict, bf16: bool, mem: MemoryConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch, n_recycles=0, memory=mem)
        loss, _ = alphafold_loss(out, batch, LossConfig(), use_clamped_fape=True)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach().float(), out["final_atom14"].detach().float(), grad.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("mem", [MemoryConfig(), LOW], ids=["none", "low"])
def test_bf16_matches_fp32_within_tolerance(mem: MemoryConfig) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in synthetic_batch(40, 8, 16, seed=3).items()}
    model = AlphaFold(cfg=model_preset("small", msa_dropout=0.0, pair_dropout=0.0, structure_dropout=0.0))
    model = model.to(dev).train()
    for p in model.parameters():  # AF2's zero-initialised final layers would make the comparison trivial
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    loss32, pos32, grad32 = _run(model, batch, bf16=False, mem=mem)
    loss16, pos16, grad16 = _run(model, batch, bf16=True, mem=mem)
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert _rel(loss16, loss32) < BF16_RTOL
    assert _rel(pos16, pos32) < BF16_RTOL
    assert _rel(grad16, grad32) < 0.1  # gradients: sums over many bf16 products, documented looser bound


def test_low_matches_none_on_gpu_in_fp32() -> None:
    """The memory switches compute the same function on CUDA too (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dev = torch.device("cuda")
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in synthetic_batch(40, 8, 16, seed=4).items()}
    cfg = model_preset("small", msa_dropout=0.0, pair_dropout=0.0, structure_dropout=0.0)
    model = AlphaFold(cfg=cfg).to(dev).train()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    loss_r, pos_r, grad_r = _run(model, batch, bf16=False, mem=MemoryConfig())
    loss_l, pos_l, grad_l = _run(model, batch, bf16=False, mem=LOW)
    assert _rel(loss_l, loss_r) < 1e-5
    assert _rel(pos_l, pos_r) < 1e-5
    assert _rel(grad_l, grad_r) < 1e-4
