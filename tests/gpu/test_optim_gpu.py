"""GPU halves of the optimizer-state and recovery switches (needs CUDA; skipped without):
fused fp32 Adam against the unfused one, host-offloaded Adam against device Adam (clipping included), and
a real out-of-memory error recovered by stepping down the memory presets.

Run: PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_optim_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from protfold.config import OptimConfig
from protfold.train.step import adam, clip_and_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device)) for s in ((64, 128), (128,), (7, 5))]


def _train(params, opt, sched, steps: int = 5) -> None:
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        loss = sum(((p - torch.randn(p.shape, generator=gen).to(p.device)) ** 2).sum() for p in params)
        loss.backward()
        clip_and_step(opt, params, OptimConfig().grad_clip)
        sched.step()
        opt.zero_grad(set_to_none=True)


def _sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / 3)


def test_fused_adam_on_cuda_equals_unfused():
    fused_p, plain_p = _params("cuda"), _params("cuda")
    fused = adam(fused_p, OptimConfig())
    assert fused.defaults["fused"]
    plain = torch.optim.Adam(plain_p, lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
    _train(fused_p, fused, _sched(fused))
    _train(plain_p, plain, _sched(plain))
    for a, b in zip(plain_p, fused_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cpu_offload_equals_device_adam_with_clipping():
    pytest.importorskip("torchao", reason="optim.state cpu_offload needs torchao: pip install 'protfold[lowbit]'")
    off_p, ref_p = _params("cuda"), _params("cuda")
    off = adam(off_p, OptimConfig(state="cpu_offload"))
    ref = torch.optim.Adam(ref_p, lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
    _train(off_p, off, _sched(off))
    _train(ref_p, ref, _sched(ref))
    for a, b in zip(ref_p, off_p):  # the gradients are far above 0.1: clipping decides every step
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
