"""No-grad in-place inference path of the Evoformer block: same outputs as the grad path, the caller's tensors
left alone unless handed over, and a bounded peak (CPU measurement, LayerNorm up-cast as under CUDA autocast)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from protfold.config import MemoryConfig, model_preset
from protfold.model.evoformer import (
    EvoformerBlock,
    EvoformerStack,
    ExtraMSAStack,
    OuterProductMean,
)
from protfold.model.execution import AddInto as _AddInto
from protfold.model.execution import add_into
from protfold.model.memory import chunk_rows, peak_new_bytes
from protfold.model.plan import resolve
from protfold.model.triangle import PairTransition, TriangleAttention, TriangleMultiplication

from .conftest import make_trunk_inputs, planned, randomize_

MEMS = {
    "none": MemoryConfig(),
    "low": MemoryConfig(pair_chunk=2, msa_chunk=2, attention_chunk_mb=1e-4, low_memory_triangle=True),
    "low_default_rows": MemoryConfig(low_memory_triangle=True),
    # the combined triangle edge in host memory (here the host is the device, so this checks the layout/copies)
    "low_edge_on_host": MemoryConfig(pair_chunk=2, msa_chunk=2, attention_chunk_mb=1e-4, low_memory_triangle=True,
                                     offload_triangle_edge=True),
}


def _block(mem: MemoryConfig, train: bool) -> EvoformerBlock:
    torch.manual_seed(1)
    blk = randomize_(planned(EvoformerBlock.from_config(model_preset("tiny")), mem))
    return blk.train(train)


# MemoryConfig() keeps the plain no-grad path (no chunking asked for), which never writes into the inputs
@pytest.mark.parametrize("train", [False, True])  # True: dropout masks drawn as the grad path draws them
@pytest.mark.parametrize("mem", list(MEMS))
def test_no_grad_block_matches_grad_path_fp32(mem, train) -> None:
    blk = _block(MEMS[mem], train)
    t = make_trunk_inputs(model_preset("tiny"))
    torch.manual_seed(7)
    m_ref, z_ref = blk(t.m, t.z, t.msa_mask, t.pair_mask)  # grad on: the plain (out-of-place) path
    m0, z0 = t.m.clone(), t.z.clone()
    for inplace in (False, True):
        m_in, z_in = t.m.clone(), t.z.clone()
        torch.manual_seed(7)
        with torch.no_grad():
            m_out, z_out = blk(m_in, z_in, t.msa_mask, t.pair_mask, inplace=inplace)
        torch.testing.assert_close(m_out, m_ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z_out, z_ref.detach(), rtol=1e-5, atol=1e-5)
        if inplace and resolve(MEMS[mem], grad=False, device="cpu").inplace:  # handed over: the block wrote into the caller's buffers
            assert z_out.data_ptr() == z_in.data_ptr() and m_out.data_ptr() == m_in.data_ptr()
        else:
            assert torch.equal(m_in, m0) and torch.equal(z_in, z0)


def test_no_grad_block_matches_grad_path_bf16() -> None:
    """Pure-bf16 inputs under bf16 autocast: both paths round to bf16 at the same points; chunked fp32 sums may
    differ in their last bit, which a later bf16 rounding can expose, so the bound is a few bf16 ulps."""
    blk = _block(MEMS["low"], False)
    t = make_trunk_inputs(model_preset("tiny"), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = blk(t.m, t.z, t.msa_mask, t.pair_mask)
        with torch.no_grad():
            out = blk(t.m.clone(), t.z.clone(), t.msa_mask, t.pair_mask, inplace=True)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.detach().float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("stack_cls", [EvoformerStack, ExtraMSAStack])
def test_stacks_leave_inputs_alone_unless_handed_over(stack_cls) -> None:
    cfg = model_preset("tiny")
    torch.manual_seed(2)
    stack = randomize_(planned(stack_cls(cfg), MEMS["low"])).eval()
    t = make_trunk_inputs(cfg)
    m = t.e if stack_cls is ExtraMSAStack else t.m
    mask = t.extra_msa_mask if stack_cls is ExtraMSAStack else t.msa_mask
    ref = stack(m, t.z, mask, t.pair_mask)
    m0, z0 = m.clone(), t.z.clone()
    with torch.no_grad():
        kept = stack(m, t.z, mask, t.pair_mask)
        assert torch.equal(m, m0) and torch.equal(t.z, z0)
        z_in = t.z.clone()
        given = stack(m.clone(), z_in, mask, t.pair_mask, inplace_inputs=True)
    z_ref = ref if stack_cls is ExtraMSAStack else ref[1]
    for out in (kept, given):
        z_out = out if stack_cls is ExtraMSAStack else out[1]
        torch.testing.assert_close(z_out, z_ref.detach(), rtol=1e-5, atol=1e-5)
    z_given = given if stack_cls is ExtraMSAStack else given[1]
    assert z_given.data_ptr() == z_in.data_ptr()  # handed over: no copy of z was made


def _pair_modules(c: int, mem: MemoryConfig) -> dict[str, nn.Module]:
    return {
        "mul_out": planned(TriangleMultiplication(c_z=c, c_hidden=c, outgoing=True), mem),
        "mul_in": planned(TriangleMultiplication(c_z=c, c_hidden=c, outgoing=False), mem),
        "mul_in_5": planned(TriangleMultiplication(c_z=c, c_hidden=5, outgoing=False), mem),
        "att_start": planned(TriangleAttention(c_z=c, c_hidden=3, n_heads=2, starting=True), mem),
        "att_end": planned(TriangleAttention(c_z=c, c_hidden=3, n_heads=2, starting=False), mem),
        "transition": planned(PairTransition(c_z=c, factor=2), mem),
    }


@pytest.mark.parametrize("mem", list(MEMS))
@pytest.mark.parametrize("name", ["mul_out", "mul_in", "mul_in_5", "att_start", "att_end", "transition"])
def test_pair_add_into_equals_forward(name, mem, mask_factory) -> None:
    mod = randomize_(_pair_modules(6, MEMS[mem])[name])
    z, mask = torch.randn(2, 7, 7, 6), mask_factory(2, 7, 7)
    with torch.no_grad():
        expected = z + mod(z, mask)
        z_in = z.clone()
        add_into(mod.module, z_in, mask, plan=mod.plan(), emit=_AddInto(z_in, nn.Identity()))
    torch.testing.assert_close(z_in, expected, rtol=1e-5, atol=1e-5)


def test_opm_add_into_equals_forward(mask_factory) -> None:
    opm = randomize_(planned(OuterProductMean(c_m=5, c_z=6, c_hidden=3), MEMS["low"]))
    m, mask, z = torch.randn(2, 4, 7, 5), mask_factory(2, 4, 7), torch.randn(2, 7, 7, 6)
    with torch.no_grad():
        expected = z + opm(m, mask)
        add_into(opm.module, m, mask, plan=opm.plan(), emit=_AddInto(z, nn.Identity()))
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_chunk_rows_emit_refuses_grad() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="no-grad"):
        chunk_rows(lambda a: a * 2, [x], [-2], 2, out_dim=-2, emit=lambda s, n, u: None)


def test_cuda_autocast_emulation_counts_fp32_layernorm() -> None:
    ln, x = nn.LayerNorm(64), torch.randn(32, 64).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu = peak_new_bytes(lambda: ln(x), [x, *ln.parameters()])
        cuda = peak_new_bytes(lambda: ln(x), [x, *ln.parameters()], cuda_autocast=True)
    assert cpu < x.numel() * 2 * 1.2 <= x.numel() * 4 * 2 <= cuda  # bf16 output vs fp32 input copy + output


def test_af2_block_no_grad_peak_near_two_pair_tensors() -> None:
    """af2 channels, N=96, 8 rows, small row chunks, bf16 inputs under bf16 autocast, LayerNorm in fp32 as on
    CUDA: the peak including the inputs stays below 2.6x the bf16 pair tensor for a block that owns z (z plus
    the triangle multiplication's combined edge is the 2x floor); a user-facing call adds one copy of z."""
    n, s = 96, 8
    cfg = model_preset("af2")
    mem = MemoryConfig(pair_chunk=n // 32, attention_chunk_mb=512 * (n / 4096) ** 2, low_memory_triangle=True)
    torch.manual_seed(0)
    # bf16 weights: autocast's cached bf16 copies of fp32 weights (~3.6 MB per af2 block) would be 1.5 pair
    # tensors at this N (a 1e-3 share at N=4096), hiding what the test is about
    blk = planned(EvoformerBlock.from_config(cfg), mem).eval().bfloat16()
    m, z = torch.randn(1, s, n, cfg.c_m).bfloat16(), torch.randn(1, n, n, cfg.c_z).bfloat16()
    mm, pm = torch.ones(1, s, n).bfloat16(), torch.ones(1, n, n).bfloat16()
    inputs = [m, z, mm, pm]
    pair, in_bytes = z.numel() * 2, sum(t.numel() * t.element_size() for t in inputs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        owned = peak_new_bytes(lambda: blk(m, z, mm, pm, inplace=True), [*blk.parameters(), *inputs],
                               cuda_autocast=True)
        kept = peak_new_bytes(lambda: blk(m, z, mm, pm), [*blk.parameters(), *inputs], cuda_autocast=True)
    owned, kept = (owned + in_bytes) / pair, (kept + in_bytes) / pair
    assert owned < 2.6 and kept < 3.6, (owned, kept)


def test_offloaded_triangle_edge_is_built_in_host_memory(monkeypatch, mask_factory) -> None:
    """With offload_triangle_edge the combined edge is allocated on the CPU, one [*, N, N, width] tensor per
    channel slice, and the update equals the on-device one; without low_memory_triangle it is a config error."""
    import protfold.model.triangle_exec as triangle

    made = []
    plain = triangle._host_buffer

    def spy(shape, dtype, *, pin):
        made.append(plain(shape, dtype, pin=pin))
        return made[-1]

    monkeypatch.setattr(triangle, "_host_buffer", spy)
    monkeypatch.setattr(triangle, "_INFER_EDGE_FRACTION", 1 / 64)  # force several channel slices here
    monkeypatch.setattr(triangle, "_INFER_EDGE_ROW_CHUNKS", 0)
    z, mask = torch.randn(2, 9, 9, 6), mask_factory(2, 9, 9)
    outs = []
    for host in (False, True):
        mem = MemoryConfig(pair_chunk=4, low_memory_triangle=True, offload_triangle_edge=host)
        torch.manual_seed(3)  # the same weights for both
        mod = randomize_(planned(TriangleMultiplication(c_z=6, c_hidden=5, outgoing=False), mem))
        z_in = z.clone()
        with torch.no_grad():
            add_into(mod.module, z_in, mask, plan=mod.plan(), emit=_AddInto(z_in, nn.Identity()))
        outs.append(z_in)
    assert len(made) > 1 and sum(t.shape[-1] for t in made) == 5
    assert all(t.shape[:-1] == (2, 9, 9) and t.device.type == "cpu" for t in made)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="low_memory_triangle"):
        MemoryConfig(offload_triangle_edge=True)


def _no_pinned_memory(monkeypatch, error: type[Exception] = RuntimeError) -> list:
    """Every pinned allocation fails for lack of memory (as cudaHostAlloc does when the host cannot lock more) and
    the process starts with pinning allowed. Returns the attempts."""
    import protfold.model.triangle_exec as triangle

    attempts = []

    def no_room(shape, dtype):
        attempts.append(shape)
        raise error("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.")

    monkeypatch.setattr(triangle, "_pin_failed", False)
    monkeypatch.setattr(triangle, "_pinned_empty", no_room)
    return attempts


_PIN_ERRORS = [e for e in (getattr(torch, "AcceleratorError", None), torch.OutOfMemoryError, RuntimeError) if e]


@pytest.mark.parametrize("error", _PIN_ERRORS, ids=lambda e: e.__name__)
def test_host_edge_falls_back_to_pageable_memory_once(monkeypatch, caplog, error) -> None:
    """A pinned allocation that fails for lack of memory gives a pageable buffer of the same shape and dtype, and
    every later one is pageable without trying (one warning naming the size); pin=False never tries."""
    import protfold.model.triangle_exec as triangle

    attempts = _no_pinned_memory(monkeypatch, error)
    with caplog.at_level(logging.WARNING, logger=triangle.__name__):
        bufs = [triangle._host_buffer((2, 5, 5, 3), torch.bfloat16, pin=True) for _ in range(2)]
    for buf in bufs:
        assert (buf.shape, buf.dtype, buf.device.type, buf.is_pinned()) == ((2, 5, 5, 3), torch.bfloat16, "cpu", False)
    assert attempts == [(2, 5, 5, 3)]  # tried once: pageable for the rest of the process
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GiB of pinned host memory" in warnings[0] and "slower" in warnings[0]
    assert "CUDA error: out of memory" in warnings[0] and "DSA" not in warnings[0]  # the error's first line
    monkeypatch.setattr(triangle, "_pin_failed", False)
    triangle._host_buffer((4, 1), torch.float32, pin=False)
    assert len(attempts) == 1


def test_host_edge_other_pinning_errors_propagate(monkeypatch) -> None:
    import protfold.model.triangle_exec as triangle

    def broken(shape, dtype):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(triangle, "_pin_failed", False)
    monkeypatch.setattr(triangle, "_pinned_empty", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        triangle._host_buffer((3, 3, 2), torch.float32, pin=True)
    assert not triangle._pin_failed  # still tries pinned memory next time


def test_no_grad_block_with_pageable_host_edge_matches_grad_path(monkeypatch, caplog) -> None:
    """The in-place no-grad block with the triangle edge in host memory, every pinned allocation failing: pageable
    buffers, one warning, and the grad path's outputs."""
    import protfold.model.triangle_exec as triangle

    attempts = _no_pinned_memory(monkeypatch)
    plain = triangle._host_buffer  # asked for pinned memory, as with z on a GPU
    monkeypatch.setattr(triangle, "_host_buffer", lambda shape, dtype, *, pin: plain(shape, dtype, pin=True))
    released: list[int] = []
    monkeypatch.setattr(triangle, "_release_pinned_cache", lambda: released.append(1))
    blk = _block(MEMS["low_edge_on_host"], False)
    t = make_trunk_inputs(model_preset("tiny"))
    m_ref, z_ref = blk(t.m, t.z, t.msa_mask, t.pair_mask)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=triangle.__name__):
        m_out, z_out = blk(t.m.clone(), t.z.clone(), t.msa_mask, t.pair_mask, inplace=True)
    torch.testing.assert_close(m_out, m_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_out, z_ref.detach(), rtol=1e-5, atol=1e-5)
    assert len(attempts) == 1 and triangle._pin_failed  # both triangle updates ran, the second never tried
    assert sum("pinned host memory" in r.getMessage() for r in caplog.records) == 1
    # torch's pinned cache is emptied when pinning fails and again after each update's edge is freed
    assert len(released) == 3
