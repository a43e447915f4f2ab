"""compile_blocks with the real (inductor) backend on the GPU against eager, af2 widths, two blocks with block
recompute, fp32, without and with dropout (skipped without CUDA); also times both (printed, for
benchmarks/NOTES.md). With dropout the compiled blocks must draw the eager masks (`fallback_random`): session 4
measured gradients 100% apart without it."""

from __future__ import annotations

import time

import pytest
import torch

from protfold.config import MemoryConfig, model_preset
from protfold.model.evoformer import EvoformerStack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _step(stack: EvoformerStack, m: torch.Tensor, z: torch.Tensor, masks) -> list[torch.Tensor]:
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout draws in every step
    m, z = m.detach().requires_grad_(), z.detach().requires_grad_()
    m_out, z_out, s_out = stack(m, z, *masks)
    (m_out.square().mean() + z_out.square().mean() + s_out.square().mean()).backward()
    return [z_out.detach(), m.grad, z.grad, *(p.grad for p in stack.parameters())]


@pytest.mark.parametrize(("dropout", "attention", "inblock"),
                         [(False, "naive", False), (True, "naive", False), (True, "flex", False), (True, "naive", True)])
def test_compiled_stack_matches_eager_on_gpu(dropout: bool, attention: str, inblock: bool) -> None:
    """Eager with the plain attention kernel against compiled blocks (with the plain or the Flex kernel, with or
    without in-block recompute: presets compiled, compiled_flex, compiled_inblock)."""
    dev, n, rows = torch.device("cuda"), 128, 32
    rates = {} if dropout else {"msa_dropout": 0.0, "pair_dropout": 0.0}
    cfg = model_preset("af2", n_evoformer_blocks=2, **rates)
    torch.manual_seed(0)
    stack = EvoformerStack(cfg, mem=MemoryConfig(blocks_per_checkpoint=1)).to(dev).train()
    with torch.no_grad():  # AF2's zero-initialised output projections would hide the dropout masks from outputs
        for p in stack.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    gen = torch.Generator(device=dev).manual_seed(1)
    m = torch.randn(1, rows, n, cfg.c_m, device=dev, generator=gen)
    z = torch.randn(1, n, n, cfg.c_z, device=dev, generator=gen)
    masks = ((torch.rand(1, rows, n, device=dev, generator=gen) > 0.1).float(),
             (torch.rand(1, n, n, device=dev, generator=gen) > 0.1).float())
    results, times = {}, {}
    for compile_blocks in (False, True):
        mem = MemoryConfig(blocks_per_checkpoint=1, compile_blocks=compile_blocks,
                           attention=attention if compile_blocks else "naive",
                           recompute_inside_block=inblock and compile_blocks)
        for sub in stack.modules():
            if hasattr(sub, "mem"):
                sub.mem = mem
        results[compile_blocks] = _step(stack, m, z, masks)  # the compiled run compiles here
        torch.cuda.synchronize()
        start = time.perf_counter()
        _step(stack, m, z, masks)
        torch.cuda.synchronize()
        times[compile_blocks] = time.perf_counter() - start
    print(f"2-block af2 stack at {n}, dropout {dropout}, {attention}, in-block {inblock}: "
          f"eager {times[False]:.4f} s, compiled {times[True]:.4f} s")
    print(f"torch {torch.__version__}")  # fallback_random keeps eager's masks only if their draws stay in order
    largest = max(float(w.abs().max()) for w in results[False] if w is not None)
    for got, want in zip(results[True], results[False]):
        if want is None:
            continue
        if float(want.abs().max()) < 1e-6 * largest:
            # zero up to rounding in both (e.g. the bias of the LayerNorm feeding only the pair bias: a shift equal
            # for every key cancels in the softmax), so a tolerance scaled by its own size would compare noise
            assert float(got.abs().max()) < 1e-5 * largest
            continue
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
