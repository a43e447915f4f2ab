"""The no-grad in-place pair updates' shortcuts (fewer passes over pair- and logits-sized tensors) compute what the
plain path computes: the half logits' up-cast fused into the first fp32 bias add, an all-ones mask's zero bias left
out, the triangle attention bias kept in fp32, LayerNorm(z) cast once for both projections of the triangle update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import protfold.model.primitives as primitives
import protfold.model.triangle_exec as triangle_exec
from protfold.config import MemoryConfig
from protfold.model.execution import AddInto, add_into
from protfold.model.plan import resolve
from protfold.model.primitives import _naive_attention, mask_bias
from protfold.model.triangle import TriangleAttention, TriangleMultiplication

from .conftest import randomize_, real_mask

LOW = MemoryConfig(pair_chunk=3, attention_chunk_mb=1e-4, low_memory_triangle=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_naive_attention_fused_up_cast_is_bitwise_the_plain_sum(dtype) -> None:
    """No grad: half logits + fp32 mask bias in one out-of-place add, then the half pair bias in place, equal the
    grad path's up-cast, add, add bit for bit (the same fp32 additions in the same order)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 9, 8).to(dtype) for _ in range(3))  # [R, S, H, L, c]
    keys = real_mask(2, 3, 9)
    keys[0, 0] = 0.0  # one fully masked row as well
    biases = [mask_bias(keys)[..., None, None, :], torch.randn(1, 4, 9, 9).to(dtype)]
    fp32_pair = [biases[0], biases[1].float()]
    with torch.enable_grad():
        ref = _naive_attention(q, k, v, biases)
    with torch.no_grad():
        assert torch.equal(_naive_attention(q, k, v, biases), ref)
        assert torch.equal(_naive_attention(q, k, v, fp32_pair), ref)  # an fp32 first bias: the fused add too
        assert torch.equal(_naive_attention(q, k, v, fp32_pair[1:]), _naive_attention(q, k, v, biases[1:]))


def _triangle(kind: str) -> nn.Module:
    torch.manual_seed(4)
    if kind.startswith("mul"):
        mod = TriangleMultiplication(c_z=6, c_hidden=5, outgoing=kind == "mul_out")
    else:
        mod = TriangleAttention(c_z=6, c_hidden=3, n_heads=2, starting=kind == "att_start")
    return randomize_(mod)


@pytest.mark.parametrize("ones", [True, False])
@pytest.mark.parametrize("kind", ["mul_out", "mul_in", "att_start", "att_end"])
def test_in_place_pair_update_equals_plain_under_bf16_autocast(kind, ones, monkeypatch) -> None:
    """fp32 z (as the model keeps it) under bf16 autocast, an all-ones pair mask or a random one:
    the in-place update rounds to bf16 at the same points as z + the plain update (equal on the CPU; 1e-6 leaves
    room for another BLAS blocking of the chunked fp32 sums)."""
    monkeypatch.setattr(triangle_exec, "_INFER_EDGE_FRACTION", 1 / 64)  # several channel slices
    monkeypatch.setattr(triangle_exec, "_INFER_EDGE_ROW_CHUNKS", 0)
    calls = []
    plain_mask_bias = primitives.mask_bias
    monkeypatch.setattr(primitives, "mask_bias", lambda m: calls.append(m.shape) or plain_mask_bias(m))
    mod = _triangle(kind)
    torch.manual_seed(5)
    z = torch.randn(2, 8, 8, 6)
    mask = torch.ones(2, 8, 8) if ones else real_mask(2, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = z + mod(z, mask, plan=resolve(MemoryConfig(), grad=False, device="cpu")).float()
        plain_calls, calls[:] = len(calls), []
        z_in = z.clone()
        add_into(mod, z_in, mask, plan=resolve(LOW, grad=False, device="cpu"), emit=AddInto(z_in, None))
    torch.testing.assert_close(z_in, expected, rtol=1e-6, atol=1e-6)
    if kind.startswith("att"):
        assert plain_calls == 1 and len(calls) > 1  # the in-place path makes the mask bias per row chunk


@pytest.mark.parametrize("grad", [False, True])
def test_sdpa_with_a_bias_shared_by_every_row_matches_naive(grad) -> None:
    """A pair bias alone (an all-ones mask left out) is handed to sdpa as a broadcast view, not copied per row;
    outputs (and the bias gradient, with its own shape) equal the naive kernel's."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 5, 3, 7, 4, requires_grad=grad) for _ in range(3))
    pair = torch.randn(1, 1, 3, 7, 7, requires_grad=grad)
    outs = []
    for kind in ("naive", "sdpa"):
        with torch.set_grad_enabled(grad):
            out = primitives.attention(q, k, v, [pair], resolve(MemoryConfig(attention=kind), grad=grad, device="cpu"))
        if grad:
            pair.grad = None
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            outs.append((out.detach(), pair.grad.clone()))
        else:
            outs.append((out, out))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not grad or outs[1][1].shape == pair.shape


@pytest.mark.parametrize("outgoing", [True, False])
def test_large_row_chunks_widen_the_edge_slices(outgoing, monkeypatch) -> None:
    """Row chunks of at least N/8 rows give the fp32 b slice two row chunks of room more (fewer, wider slices);
    smaller chunks keep a sixteenth of z; both equal the plain update."""
    made = []
    plain_slices = triangle_exec.slices
    monkeypatch.setattr(triangle_exec, "slices", lambda c, parts: made.append(plain_slices(c, parts)) or made[-1])
    torch.manual_seed(8)
    mod = randomize_(TriangleMultiplication(c_z=6, c_hidden=8, outgoing=outgoing))
    z, mask = torch.randn(1, 16, 16, 6), real_mask(1, 16, 16)
    with torch.no_grad():
        expected = z + mod(z, mask, plan=resolve(MemoryConfig(), grad=False, device="cpu"))
        for rows, parts in ((8, 2), (1, 8)):  # 16 x 16 x 8 fp32 edge: 8 KiB; 1/16 of z: 384 B; 2 chunks of 8: 6 KiB
            z_in = z.clone()
            plan = resolve(MemoryConfig(pair_chunk=rows, low_memory_triangle=True), grad=False, device="cpu")
            add_into(mod, z_in, mask, plan=plan, emit=AddInto(z_in, None))
            assert len(made.pop()) == parts
            torch.testing.assert_close(z_in, expected, rtol=1e-5, atol=1e-5)


def test_z_stored_in_bf16_gets_the_slices_of_fp32_z(monkeypatch) -> None:
    """The planner counts the fp32 b slice as a sixteenth of z in fp32 whatever z is stored in; a bf16 z takes the
    same slices as an fp32 one (half z's bytes would have made twice the slices, each pass recomputing a and b)."""
    made = []
    plain_slices = triangle_exec.slices
    monkeypatch.setattr(triangle_exec, "slices", lambda c, parts: made.append(plain_slices(c, parts)) or made[-1])
    torch.manual_seed(8)
    mod = randomize_(TriangleMultiplication(c_z=64, c_hidden=8, outgoing=True))
    z, mask = torch.randn(1, 16, 16, 64), real_mask(1, 16, 16)  # a sixteenth of fp32 z: 4 of the 8 fp32 channels
    plan = resolve(MemoryConfig(pair_chunk=1, low_memory_triangle=True), grad=False, device="cpu")
    counts = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):
            z_in = z.to(dtype)
            add_into(mod, z_in, mask, plan=plan, emit=AddInto(z_in, None))
            counts[dtype] = len(made.pop())
    assert counts[torch.bfloat16] == counts[torch.float32] == 2
