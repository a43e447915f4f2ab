"""compile_blocks with the real (inductor) backend on the GPU against eager, af2 widths, two blocks with block
recompute, fp32 (skipped without CUDA), for the presets `compiled`, `compiled_flex` and `compiled_inblock`, with
and without dropout, for the Evoformer and the extra MSA stack (8-channel heads, zero-padded under flex). Also
times both (printed).

With dropout the compiled blocks must draw the eager masks (`fallback_random`): without it inductor
draws its own masks and the gradients differ entirely. Fused kernels reorder fp32 sums, and two randomised
blocks amplify that, so tensors are compared by their norm-wise relative difference (1e-3; a CPU inductor run
of this setup gave at most 1.6e-4, and
eager fp32 itself differs from fp64 by more than an elementwise 1e-4 would allow).
"""

from __future__ import annotations

import time

import pytest
import torch

from protfold.config import MemoryConfig, model_preset
from protfold.model.evoformer import EvoformerStack, ExtraMSAStack
from protfold.model.memory import reset_compiled
from protfold.model.plan import resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NORM_RTOL = 1e-3


def _step(stack, kind: str, msa: torch.Tensor, z: torch.Tensor, masks, mem: MemoryConfig) -> list[torch.Tensor]:
    """[first output, grad of the MSA input, grad of z, every parameter gradient] of one seeded step."""
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout draws in every step
    msa, z = msa.detach().requires_grad_(), z.detach().requires_grad_()
    outs = stack(msa, z, *masks, plan=resolve(mem, grad=True, device=z.device))
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(o.square().mean() for o in outs).backward()
    return [outs[0].detach(), msa.grad, z.grad, *(p.grad for p in stack.parameters())]


@pytest.mark.parametrize(("kind", "dropout", "attention", "inblock"), [
    ("evoformer", False, "naive", False), ("evoformer", True, "naive", False), ("evoformer", True, "flex", False),
    ("evoformer", True, "naive", True), ("extra_msa", True, "flex", False)])
def test_compiled_stack_matches_eager_on_gpu(kind: str, dropout: bool, attention: str, inblock: bool) -> None:
    """Eager with the plain attention kernel against compiled blocks (with the plain or the Flex kernel, with or
    without in-block recompute). Each case compiles afresh: recompiling the shared block function for in-block
    recompute after another configuration trips a dynamo assertion (torch 2.13, CPU inductor)."""
    reset_compiled()
    dev, n = torch.device("cuda"), 128
    rates = {} if dropout else {"msa_dropout": 0.0, "pair_dropout": 0.0}
    cfg = model_preset("af2", n_evoformer_blocks=2, n_extra_msa_blocks=2, **rates)
    torch.manual_seed(0)
    if kind == "evoformer":
        stack, rows, width = EvoformerStack(cfg), 32, cfg.c_m
    else:
        stack, rows, width = ExtraMSAStack(cfg), 64, cfg.c_e
    stack = stack.to(dev).train()
    with torch.no_grad():  # AF2's zero-initialised output projections would hide the dropout masks from outputs
        for p in stack.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    gen = torch.Generator(device=dev).manual_seed(1)
    msa = torch.randn(1, rows, n, width, device=dev, generator=gen)
    z = torch.randn(1, n, n, cfg.c_z, device=dev, generator=gen)
    masks = ((torch.rand(1, rows, n, device=dev, generator=gen) > 0.1).float(),
             (torch.rand(1, n, n, device=dev, generator=gen) > 0.1).float())
    results, times = {}, {}
    for compile_blocks in (False, True):
        mem = MemoryConfig(blocks_per_checkpoint=1, compile_blocks=compile_blocks,
                           attention=attention if compile_blocks else "naive",
                           recompute_inside_block=inblock and compile_blocks)
        results[compile_blocks] = _step(stack, kind, msa, z, masks, mem)  # the compiled run compiles here
        torch.cuda.synchronize()
        start = time.perf_counter()
        _step(stack, kind, msa, z, masks, mem)
        torch.cuda.synchronize()
        times[compile_blocks] = time.perf_counter() - start
    print(f"torch {torch.__version__}: 2-block af2 {kind} stack at {n}, dropout {dropout}, {attention}, in-block "
          f"{inblock}: eager {times[False]:.4f} s, compiled {times[True]:.4f} s")
    names = ["output", "msa.grad", "z.grad", *(name for name, _ in stack.named_parameters())]
    grads = [w for w in results[False][1:] if w is not None]
    largest = max(float(w.abs().max()) for w in grads)
    for name, got, want in zip(names, results[True], results[False]):
        if want is None:
            assert got is None, name
            continue
        if name != "output" and float(want.abs().max()) < 1e-8 * largest:
            # zero up to rounding in both (e.g. the bias of the LayerNorm feeding only the pair bias: a shift equal
            # for every key cancels in the softmax); compiled must be as negligible
            assert float(got.abs().max()) < 1e-6 * largest, name
            continue
        diff = float((got - want).norm() / want.norm())
        assert diff < NORM_RTOL, (name, diff)
