"""The whole model with the pair representation stored in bf16 (`MemoryConfig.pair_storage`), on the GPU under bf16
autocast (skipped without CUDA): on CUDA, LayerNorm of a bf16 input returns fp32 under autocast where the CPU
returns bf16, so this is the arithmetic `protfold predict --precision bf16` runs. Against the same plan with fp32 z
under the same autocast, both against the fp32 plain path: storing z in bf16 moves the outputs by an error of
autocast's own order, and the peak drops by about half of z's bytes."""

from __future__ import annotations

import pytest
import torch

from protfold.bench.synthetic import synthetic_batch
from protfold.config import MemoryConfig, model_preset
from protfold.model.alphafold import AlphaFold

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_bf16_pair_storage_on_the_gpu() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = AlphaFold(cfg=model_preset("small_ptm"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no head is identically zero
    model = model.to(dev).eval()
    n = 384
    batch = synthetic_batch(n, 8, 16, seed=4)
    batch["seq_mask"] = (torch.rand(1, n) > 0.1).float()
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        ref = model(batch, n_recycles=1, memory=MemoryConfig())
    chunked = dict(pair_chunk=32, attention_chunk_mb=8, low_memory_triangle=True, structure_chunk=32, head_chunk=32)
    out, peak = {}, {}
    for storage in ("fp32", "bf16"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out[storage] = model(batch, n_recycles=1, memory=MemoryConfig(**chunked, pair_storage=storage))
        peak[storage] = torch.cuda.max_memory_allocated(dev)
    assert out["bf16"]["pair"].dtype == torch.bfloat16
    for key in ("final_atom37", "plddt_logits", "single", "predicted_aligned_error", "ptm"):
        autocast_err, storage_err = _rel(out["fp32"][key], ref[key]), _rel(out["bf16"][key], ref[key])
        assert torch.isfinite(out["bf16"][key].float()).all(), key
        assert storage_err < 4 * autocast_err + 1e-2, (key, storage_err, autocast_err)
    z_fp32 = 4 * n * n * model.cfg.c_z
    assert peak["fp32"] - peak["bf16"] >= 0.3 * z_fp32, (peak, z_fp32)  # half of z's fp32 bytes, less slack

