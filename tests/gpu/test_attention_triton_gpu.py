"""protfold's Triton attention kernel (`attention: triton`) on the GPU against the naive kernel: the kernel alone in
fp32 (outputs and the gradients of q, k, v and the row-shared pair bias, lengths that leave partial 64-wide tiles,
the extra MSA stack's 8-channel heads and the Evoformer's 32), the MSA row attention and triangle attention
modules in fp32 and under bf16 autocast (every weight's gradient), and a no-grad pass at 1,024 residues. Skipped
without CUDA or triton."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model.evoformer import MSARowAttentionWithPairBias
from protfold.model.plan import resolve
from protfold.model.primitives import _naive_attention, mask_bias
from protfold.model.triangle import TriangleAttention

from .conftest import nonzero_final_layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton missing"),
]

NAIVE, TRITON = MemoryConfig(), MemoryConfig(attention="triton")


def _gen() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(0)


@pytest.mark.parametrize(("head_dim", "n"), [(8, 96), (32, 200)])
def test_kernel_matches_naive_fp32(head_dim: int, n: int) -> None:
    from protfold.model.kernels.attention import pair_bias_attention

    gen, rows, heads = _gen(), 6, 4
    q, k, v = (torch.randn(2, rows, heads, n, head_dim, device="cuda", generator=gen) for _ in range(3))
    pair = torch.randn(2, 1, heads, n, n, device="cuda", generator=gen)
    mask = (torch.rand(2, rows, n, device="cuda", generator=gen) > 0.2).float()
    mask[0, 1] = 0.0  # one row with every key masked
    keys = mask_bias(mask)[..., None, None, :]
    weights = torch.randn(2, rows, heads, n, head_dim, device="cuda", generator=gen)
    results = []
    for kernel in (_naive_attention, pair_bias_attention):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pair)]
        out = kernel(*leaves[:3], [keys, leaves[3]])
        (out * weights).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for name, got, want in zip(("out", "q", "k", "v", "pair"), results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "msa_row":
        return nonzero_final_layers(MSARowAttentionWithPairBias(c_m=256, c_z=128, n_heads=8, c_hidden=32))
    return nonzero_final_layers(TriangleAttention(c_z=128, c_hidden=32, n_heads=4, starting=kind == "att_start"))


def _run(kind: str, mem: MemoryConfig, autocast: bool, dtype: torch.dtype = torch.float32, n: int = 80):
    gen = _gen()
    z = torch.randn(1, n, n, 128, device="cuda", generator=gen, dtype=dtype).requires_grad_()
    m = torch.randn(1, 16, n, 256, device="cuda", generator=gen, dtype=dtype).requires_grad_()
    pair_mask = (torch.rand(1, n, n, device="cuda", generator=gen) > 0.2).to(dtype)
    msa_mask = (torch.rand(1, 16, n, device="cuda", generator=gen) > 0.2).to(dtype)
    mod = _module(kind).to(dtype)
    plan = resolve(mem, grad=True, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = mod(m, z, msa_mask, plan=plan) if kind == "msa_row" else mod(z, pair_mask, plan=plan)
    weights = torch.randn(out.shape, device="cuda", generator=gen, dtype=dtype)
    (out.to(dtype) * weights).sum().backward()
    grads = {"z": z.grad.double(), **{name: p.grad.double() for name, p in mod.named_parameters()}}
    if kind == "msa_row":
        grads["m"] = m.grad.double()
    return {"out": out.detach().double(), **grads}


def _scale(results: dict[str, torch.Tensor], name: str) -> float:
    """The tensor's largest entry; for a gradient that is zero in exact arithmetic, the largest entry of all. The
    LayerNorm bias that feeds the pair bias shifts every logit of a softmax row equally, so its gradient is a sum
    that cancels: what is left is rounding noise of the other gradients' size. (Under bf16 the kernel's is larger
    than the naive kernel's: backward's δ = Σ dO·O reads O rounded to bf16, as in FlashAttention, so the row sums
    of dS cancel only to bf16 precision.)"""
    largest = max(float(t.abs().max()) for t in results.values())
    own = float(results[name].abs().max())
    return own if own > 1e-4 * largest else largest


@pytest.mark.parametrize("kind", ["msa_row", "att_start", "att_end"])
def test_modules_match_naive_fp32(kind: str) -> None:
    want, got = _run(kind, NAIVE, False), _run(kind, TRITON, False)
    assert resolve(TRITON, grad=True, device="cuda").attention == "triton"
    for name in want:
        scale = _scale(want, name)
        assert float(want[name].abs().max()) > 0, name  # every gradient is exercised
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("kind", ["msa_row", "att_start", "att_end"])
def test_modules_under_bf16_autocast_are_as_close_to_fp64_as_naive(kind: str) -> None:
    """The kernel keeps the scores in fp32 where the naive kernel rounds q kᵀ to bf16: its error against the float64
    result is within twice the naive kernel's own bf16 error (plus a floor of bf16 rounding), everywhere."""
    exact = _run(kind, NAIVE, False, dtype=torch.float64)
    plain, fused = _run(kind, NAIVE, True), _run(kind, TRITON, True)
    for name in exact:
        scale = _scale(exact, name)
        err_plain = float((plain[name] - exact[name]).abs().max())
        err_fused = float((fused[name] - exact[name]).abs().max())
        assert err_fused <= 2 * err_plain + 8e-3 * scale, (name, err_fused, err_plain, scale)


def test_no_grad_triangle_attention_at_1024_residues() -> None:
    """Inference length: the kernel walks 16 key tiles per query tile; bf16 autocast, against the naive kernel."""
    mod = _module("att_start")
    gen = _gen()
    z = torch.randn(1, 1024, 1024, 128, device="cuda", generator=gen)
    mask = (torch.rand(1, 1024, 1024, device="cuda", generator=gen) > 0.1).float()
    outs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for mem in (NAIVE, TRITON):
            outs.append(mod(z, mask, plan=resolve(mem, grad=False, device="cuda")).float())
    scale = float(outs[0].abs().max())
    torch.testing.assert_close(outs[1], outs[0], rtol=3e-2, atol=1e-2 * scale)


def test_offsets_past_two_to_the_31_elements() -> None:
    """Triangle attention's 4,096 rows at 4,096 residues in one call: q, k, v [4096, 4, 4096, 32] bf16, 2^31
    elements each, so the last rows' element offsets pass int32's range (the kernels index in int64). Forward and
    the dq, dk, dv kernels of the first and the last rows against the naive kernel on those rows alone (rows are
    independent; the pair bias's gradient sums over all of them and is left out here)."""
    from protfold.model.kernels.attention import pair_bias_attention

    if torch.cuda.mem_get_info()[0] < 48 * 2**30:
        pytest.skip("needs 48 GiB of free GPU memory")
    gen, n, heads, c = _gen(), 4096, 4, 32
    q, k, v = (torch.randn(n, heads, n, c, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    pair = torch.randn(1, heads, n, n, device="cuda", generator=gen)
    keys = mask_bias((torch.rand(n, 1, 1, n, device="cuda", generator=gen) > 0.1).float())
    out = pair_bias_attention(q, k, v, [keys, pair])
    weights = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), weights)
    for rows in (slice(0, 4), slice(n - 4, n)):
        leaves = [t.detach()[rows].float().requires_grad_() for t in (q, k, v)]
        ref = _naive_attention(*leaves, [keys[rows], pair])
        ref_grads = torch.autograd.grad(ref, leaves, weights[rows].float())
        for name, got, want in zip(("out", "q", "k", "v"), (out[rows], *(g[rows] for g in grads)), (ref, *ref_grads)):
            torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()), msg=name)
