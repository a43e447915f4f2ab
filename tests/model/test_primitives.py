"""Linear initialisers, the attention dispatch point (naive / sdpa / flex), Attention, GlobalAttention, fp32 island."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model import plan as plan_module
from protfold.model import primitives
from protfold.model.memory import fp32_island
from protfold.model.plan import resolve
from protfold.model.primitives import Attention, GlobalAttention, Linear, attention, mask_bias

from .conftest import planned


def _plan(memory: MemoryConfig, device: str = "cpu"):
    return resolve(memory, grad=torch.is_grad_enabled(), device=device)

RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------ Linear


def test_linear_inits() -> None:
    final = Linear(9, 5, init="final")
    assert final.weight.abs().sum() == 0 and final.bias.abs().sum() == 0
    gating = Linear(9, 5, init="gating")
    assert gating.weight.abs().sum() == 0 and torch.equal(gating.bias, torch.ones(5))
    assert Linear(9, 5, bias=False).bias is None
    for init, scale in (("default", 1.0), ("relu", 2.0)):
        layer = Linear(400, 300, init=init)
        assert layer.bias.abs().sum() == 0
        # the truncated normal is rescaled so that the std is sqrt(scale / fan_in)
        assert layer.weight.std().item() == pytest.approx(math.sqrt(scale / 400), rel=0.05)
        assert layer.weight.abs().max() <= 2 * math.sqrt(scale / 400) / 0.8796 + 1e-6
    glorot = Linear(400, 300, init="glorot")
    assert glorot.weight.abs().max() <= math.sqrt(6 / 700) + 1e-6
    with pytest.raises(ValueError, match="unknown Linear init"):
        Linear(3, 3, init="nope")  # type: ignore[arg-type]


# ------------------------------------------------------------------ attention dispatch


def _reference(q, k, v, biases):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    for b in biases:
        logits = logits + b
    return torch.softmax(logits, -1) @ v


def _attention_inputs(mask_factory, dtype=torch.float32):
    """MSA-row-attention-like shapes: [B, S, H, Q, c]; a mask bias per row and a pair bias shared by rows."""
    B, S, H, N, c = 2, 5, 3, 7, 4
    q, k, v = (torch.randn(B, S, H, N, c, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = mask_factory(B, S, N).to(dtype)
    pair = torch.randn(B, 1, H, N, N, dtype=dtype, requires_grad=True)
    return q, k, v, [mask_bias(mask)[:, :, None, None, :], pair], mask


def test_naive_attention_matches_reference_and_masks_keys(mask_factory) -> None:
    q, k, v, biases, mask = _attention_inputs(mask_factory)
    out = attention(q, k, v, biases, _plan(MemoryConfig()))
    torch.testing.assert_close(out, _reference(q, k, v, biases), rtol=RTOL, atol=ATOL)
    # values at masked key positions must not matter
    v2 = v.detach().clone()
    v2[mask[:, :, None, :].expand_as(v2[..., 0]) == 0] = 1e3
    out2 = attention(q, k, v2, biases, _plan(MemoryConfig()))
    torch.testing.assert_close(out2, out, rtol=RTOL, atol=1e-5)


def _out_and_grads(kind, q, k, v, biases):
    for t in (q, k, v, biases[1]):
        t.grad = None
    out = attention(q, k, v, biases, _plan(MemoryConfig(attention=kind)))
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [t.grad.clone() for t in (q, k, v, biases[1])]


def test_sdpa_matches_naive_including_pair_bias_gradient(mask_factory) -> None:
    q, k, v, biases, _ = _attention_inputs(mask_factory)
    ref, ref_grads = _out_and_grads("naive", q, k, v, biases)
    out, grads = _out_and_grads("sdpa", q, k, v, biases)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    for name, g, r in zip("qkvb", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL, msg=name)
    assert grads[3].shape == (2, 1, 3, 7, 7)  # the broadcast pair bias keeps its own shape


def test_sdpa_without_bias_and_in_4d(mask_factory) -> None:
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    out = attention(q, k, v, [], _plan(MemoryConfig(attention="sdpa")))
    torch.testing.assert_close(out, _reference(q, k, v, []), rtol=RTOL, atol=ATOL)


def test_flex_falls_back_on_cpu_with_a_warning(mask_factory, caplog) -> None:
    q, k, v, biases, _ = _attention_inputs(mask_factory)
    plan_module._fallback_warned.clear()
    with caplog.at_level(logging.WARNING, logger="protfold.model.plan"):
        plan = _plan(MemoryConfig(attention="flex"))
    assert "needs CUDA" in caplog.text and plan.attention == "naive"
    out = attention(q, k, v, biases, plan)
    torch.testing.assert_close(out, attention(q, k, v, biases, _plan(MemoryConfig())), rtol=0, atol=0)


def test_flex_kernel_eager_matches_naive(mask_factory) -> None:
    """The flex path itself, eager (what CPU can run): bias indexing, the broadcast pair bias gradient, and the
    zero padding of heads narrower than 16 channels (these have 4) with the scale of the real width.

    CPU FlexAttention has no backward for q, k, v, so only the bias requires grad here.
    """
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, biases, _ = _attention_inputs(mask_factory)
    q, k, v = (t.detach() for t in (q, k, v))
    grads = []
    for run in (lambda: attention(q, k, v, biases, _plan(MemoryConfig())),
                lambda: primitives._flex_attention(q, k, v, biases, compiled=False)):
        biases[1].grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            out = run()
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), biases[1].grad.clone()))
    (ref, ref_grad), (got, got_grad) = grads
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_grad, ref_grad, rtol=RTOL, atol=ATOL)
    assert got_grad.shape == (2, 1, 3, 7, 7)


def test_flex_inside_a_compiled_region_is_traced_once(mask_factory, monkeypatch) -> None:
    """A compiled block calling the flex path compiles one graph, even in a fresh process (no compiled kernel cached
    yet). Session 6's `fit` failed there: the first block's trace made the cached kernel, dynamo guarded that graph
    on the cache being empty, every later block got a second graph, and the first block's recompute in backward
    ran the second one (CheckpointError). dynamo's eager backend runs flex's reference implementation, so this
    runs on the CPU, without grad (CPU FlexAttention has no backward)."""
    from torch._dynamo.testing import CompileCounter

    q, k, v, biases, _ = _attention_inputs(mask_factory)
    q, k, v, *biases = (t.detach() for t in (q, k, v, *biases))  # CPU flex refuses inputs that require grad
    monkeypatch.setattr(primitives, "_flex_compiled", None)
    torch._dynamo.reset()
    counter = CompileCounter()
    block = torch.compile(lambda *qkv: primitives._flex_attention(*qkv, biases, compiled=True), backend=counter)
    try:
        with torch.no_grad():
            outs = [block(q, k, v) for _ in range(3)]
            ref = attention(q, k, v, biases, _plan(MemoryConfig()))
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_eager_flex_compiles_past_dynamos_default_limit(monkeypatch) -> None:
    """Called outside a compiled block (no-grad passes, validation), the compiled flex kernel gets one graph per
    attention kind and shape. Session 6's `fit` made more than dynamo's default 8, and FlexAttention then ran
    unfused. Here 10 shapes, with the sizes kept static so that each one compiles: all 10 run compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.attention.flex_attention import flex_attention

    counter = CompileCounterWithBackend("eager")
    monkeypatch.setattr(primitives, "_flex_compiled", torch.compile(flex_attention, backend=counter, dynamic=False))
    torch._dynamo.reset()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # "flex_attention called without torch.compile()": the unfused fallback
            for n in range(3, 13):
                q, k, v = torch.randn(3, 2, 1, n, 16).unbind(0)
                bias = torch.randn(1, n, n)
                out = primitives._flex_attention(q, k, v, [bias], compiled=True)
                torch.testing.assert_close(out, attention(q, k, v, [bias], _plan(MemoryConfig())), rtol=RTOL, atol=ATOL)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 10 > torch._dynamo.config.recompile_limit


def test_eager_flex_fails_loudly_at_its_limit(monkeypatch) -> None:
    """Past its own limit the eagerly called flex kernel raises, instead of running unfused."""
    from torch._dynamo.exc import FailOnRecompileLimitHit
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(primitives, "_FLEX_RECOMPILE_LIMIT", 4)
    monkeypatch.setattr(primitives, "_flex_compiled", torch.compile(flex_attention, backend="eager", dynamic=False))
    torch._dynamo.reset()
    compiled = 0
    # torch's own patch, not monkeypatch: pytest 9's monkeypatch undo deletes a config module's attribute
    # (it finds no static value to restore), which hides the setting for the rest of the process.
    with torch._dynamo.config.patch(recompile_limit=2):  # the kernel's own limit (4) applies, not this
        try:
            with torch.no_grad(), pytest.raises(FailOnRecompileLimitHit):
                for n in range(3, 13):
                    q, k, v = torch.randn(3, 2, 1, n, 16).unbind(0)
                    primitives._flex_attention(q, k, v, [torch.randn(1, n, n)], compiled=True)
                    compiled += 1
        finally:
            torch._dynamo.reset()
        assert compiled == 4  # the 5th shape needs a 5th graph
        assert not torch._dynamo.config.fail_on_recompile_limit_hit  # the process-wide settings are left as they were
        assert torch._dynamo.config.recompile_limit == 2


def test_logits_are_fp32_under_autocast() -> None:
    """Under bf16 autocast the softmax sees fp32 logits (checked through the island's dtype)."""
    x = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
        with fp32_island(x):
            assert (x @ x).dtype == torch.float32
        q = torch.randn(2, 3, 5, 4).to(torch.bfloat16)
        out = attention(q, q, q, [torch.zeros(3, 5, 5)], _plan(MemoryConfig()))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q.float(), q.float(), q.float(), []), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ modules


def test_attention_module_contract(mask_factory) -> None:
    att = planned(Attention(c_q=6, c_kv=5, c_hidden=3, n_heads=2), MemoryConfig())
    assert att.linear_o.weight.abs().sum() == 0  # final init: the block starts as identity
    torch.nn.init.normal_(att.linear_o.weight)
    q_x, kv_x = torch.randn(2, 7, 6), torch.randn(2, 9, 5)
    bias = mask_bias(mask_factory(2, 9))[:, None, None, :]
    out = att(q_x, kv_x, [bias])
    assert out.shape == (2, 7, 6) and torch.isfinite(out).all()


def test_global_attention_contract_and_masking(mask_factory) -> None:
    ga = GlobalAttention(c_in=6, c_hidden=3, n_heads=2)
    with torch.no_grad():
        for p in ga.parameters():
            p.normal_(0, 0.5)
    x, mask = torch.randn(7, 5, 6), mask_factory(7, 5)
    out = ga(x, mask)
    assert out.shape == x.shape
    # masked rows do not change the output of the unmasked rows (they only receive the gate)
    x2 = torch.where(mask[..., None] == 0, torch.randn_like(x) * 10, x)
    out2 = ga(x2, mask)
    torch.testing.assert_close(out2[mask == 1], out[mask == 1], rtol=RTOL, atol=1e-5)


def test_gradcheck_attention_and_global_attention(mask_factory) -> None:
    mem = MemoryConfig()
    att = planned(Attention(c_q=4, c_kv=4, c_hidden=2, n_heads=2), mem).double()
    ga = GlobalAttention(c_in=4, c_hidden=2, n_heads=2).double()
    for mod in (att, ga):
        with torch.no_grad():
            for p in mod.parameters():
                p.normal_(0, 0.5)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = mask_factory(2, 5).double()
    bias = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, b_: att(x_, x_, [b_, mask_bias(mask)[:, None, None]]), (x, bias))
    assert torch.autograd.gradcheck(lambda x_: ga(x_, mask), (x,))


def test_attention_chunk_cap_sets_rows_per_chunk() -> None:
    """One chunk's fp32 logits [rows, H, L, L] stay under the cap: rows = cap // (H * L * L * 4 bytes)."""
    from protfold.model.primitives import Attention, capped_chunk

    attn = Attention(c_q=4, c_kv=4, c_hidden=2, n_heads=3)
    plan = _plan(MemoryConfig(attention_chunk_mb=1.0))
    x = torch.zeros(2, 50, 64, 4)  # batch 2, 50 rows, L = 64
    per_row = 2 * 3 * 64 * 64 * 4
    assert capped_chunk(None, attn, x, plan) == 2**20 // per_row
    assert capped_chunk(5, attn, x, plan) == min(5, 2**20 // per_row)
    plain = _plan(MemoryConfig())
    assert capped_chunk(7, attn, x, plain) == 7 and capped_chunk(None, attn, x, plain) is None


def test_attention_chunk_cap_with_the_triton_kernel_counts_activations_not_logits(monkeypatch) -> None:
    """The Triton kernel makes no logits: the cap bounds a chunk's rows of normalised input, q, k, v, gate and output
    (fp32-counted), [rows, L, c + 5 H c], so at long lengths a chunk holds many more rows."""
    from protfold.model.primitives import Attention, capped_chunk

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets `resolve` keep the kernel on the CPU
    pytest.importorskip("triton")
    attn = Attention(c_q=128, c_kv=128, c_hidden=32, n_heads=4)
    plan = _plan(MemoryConfig(attention="triton", attention_chunk_mb=512.0))
    assert plan.attention == "triton"
    x = torch.zeros(1, 1, 1, 128).expand(1, 4096, 4096, 128)  # triangle attention's rows at 4,096 residues
    per_row = 4096 * (128 + 5 * 4 * 32) * 4
    assert capped_chunk(None, attn, x, plan) == 512 * 2**20 // per_row == 42
    naive = _plan(MemoryConfig(attention_chunk_mb=512.0))
    assert capped_chunk(None, attn, x, naive) == 2  # two rows' [4, 4096, 4096] fp32 logits
