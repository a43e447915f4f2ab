"""Triangle multiplicative updates, triangle attention, pair transition: contracts, definitions, gradcheck."""

from __future__ import annotations

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model.memory import peak_new_bytes
from protfold.model.triangle import PairTransition, TriangleAttention, TriangleMultiplication
from protfold.model.triangle_exec import train_slices

from .conftest import planned

MEM = MemoryConfig()
RTOL, ATOL = 1e-5, 1e-6


def _pair_modules(c_z: int, mem: MemoryConfig = MEM, c_hidden: int = 5) -> dict[str, torch.nn.Module]:
    return {
        "mul_out": planned(TriangleMultiplication(c_z=c_z, c_hidden=c_hidden, outgoing=True), mem),
        "mul_in": planned(TriangleMultiplication(c_z=c_z, c_hidden=c_hidden, outgoing=False), mem),
        "att_start": planned(TriangleAttention(c_z=c_z, c_hidden=3, n_heads=2, starting=True), mem),
        "att_end": planned(TriangleAttention(c_z=c_z, c_hidden=3, n_heads=2, starting=False), mem),
        "transition": planned(PairTransition(c_z=c_z, factor=2), mem),
    }


def _pair_mask(mask_factory, *lead: int, n: int) -> torch.Tensor:
    seq = mask_factory(*lead, n, p=0.2)
    return seq[..., :, None] * seq[..., None, :]


@pytest.mark.parametrize("name", ["mul_out", "mul_in", "att_start", "att_end", "transition"])
def test_pair_module_contracts(name, randomize, mask_factory) -> None:
    mod = randomize(_pair_modules(6)[name])
    z, mask = torch.randn(2, 7, 7, 6), _pair_mask(mask_factory, 2, n=7)
    out = mod(z, mask)
    assert out.shape == z.shape and torch.isfinite(out).all()
    if name != "transition":  # the transition acts per position; the others must see the i/j orientation
        assert not torch.allclose(out, mod(z.transpose(1, 2), mask.transpose(1, 2)).transpose(1, 2))


def test_pair_modules_start_as_zero_updates(mask_factory) -> None:
    z, mask = torch.randn(1, 5, 5, 6), _pair_mask(mask_factory, 1, n=5)
    for name, mod in _pair_modules(6).items():
        assert mod(z, mask).abs().max() == 0, name


def _edges(mod: TriangleMultiplication, z, mask):
    z_ln = mod.norm_in(z)
    a = torch.sigmoid(mod.linear_a_g(z_ln)) * mod.linear_a_p(z_ln) * mask[..., None]
    b = torch.sigmoid(mod.linear_b_g(z_ln)) * mod.linear_b_p(z_ln) * mask[..., None]
    return z_ln, a, b


@pytest.mark.parametrize("outgoing", [True, False])
def test_triangle_multiplication_matches_definition(outgoing, randomize, mask_factory) -> None:
    """Algorithm 11: x_ij = sum_k a_ik * b_jk; Algorithm 12: x_ij = sum_k a_ki * b_kj (loops, not einsum)."""
    mod = randomize(planned(TriangleMultiplication(c_z=6, c_hidden=5, outgoing=outgoing), MEM))
    z, mask = torch.randn(7, 7, 6), _pair_mask(mask_factory, n=7)
    z_ln, a, b = _edges(mod, z, mask)
    x = torch.zeros(7, 7, 5)
    for i in range(7):
        for j in range(7):
            for k in range(7):
                x[i, j] += a[i, k] * b[j, k] if outgoing else a[k, i] * b[k, j]
    expected = torch.sigmoid(mod.linear_g(z_ln)) * mod.linear_o(mod.norm_out(x))
    torch.testing.assert_close(mod(z, mask), expected, rtol=RTOL, atol=1e-5)


def test_triangle_attention_ending_is_starting_on_transpose(randomize, mask_factory) -> None:
    start = randomize(planned(TriangleAttention(c_z=6, c_hidden=3, n_heads=2, starting=True), MEM))
    end = planned(TriangleAttention(c_z=6, c_hidden=3, n_heads=2, starting=False), MEM)
    end.load_state_dict(start.state_dict())
    z, mask = torch.randn(2, 7, 7, 6), _pair_mask(mask_factory, 2, n=7)
    expected = start(z.transpose(1, 2), mask.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(end(z, mask), expected, rtol=0, atol=0)


def test_triangle_attention_starting_node_definition(randomize, mask_factory) -> None:
    """Algorithm 13 for one (i, j): attend over k with q_ij . k_ik + b_jk, keys masked by pair_mask[i, k]."""
    mod = randomize(planned(TriangleAttention(c_z=6, c_hidden=3, n_heads=2, starting=True), MEM))
    z, mask = torch.randn(7, 7, 6), _pair_mask(mask_factory, n=7)
    out = mod(z, mask)
    z_ln = mod.norm(z)
    att = mod.attention
    q = att.linear_q(z_ln).unflatten(-1, (2, 3))
    k = att.linear_k(z_ln).unflatten(-1, (2, 3))
    v = att.linear_v(z_ln).unflatten(-1, (2, 3))
    bias = mod.linear_b(z_ln)  # [j, k, H]
    i, j = 2, 4
    logits = torch.einsum("hc,khc->hk", q[i, j], k[i]) / 3**0.5 + bias[j].T + (mask[i] - 1) * 1e9
    o = torch.einsum("hk,khc->hc", torch.softmax(logits, -1), v[i]).flatten()
    expected = att.linear_o(o * torch.sigmoid(att.linear_g(z_ln[i, j])))
    torch.testing.assert_close(out[i, j], expected, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("c_hidden", [6, 5])  # equal to c_z (output written over x) and not
@pytest.mark.parametrize("outgoing", [True, False])
def test_low_memory_inference_matches(outgoing, c_hidden, randomize, mask_factory) -> None:
    ref = randomize(planned(TriangleMultiplication(c_z=6, c_hidden=c_hidden, outgoing=outgoing), MEM))
    for mem in (MemoryConfig(low_memory_triangle=True), MemoryConfig(low_memory_triangle=True, pair_chunk=2)):
        low = planned(TriangleMultiplication(c_z=6, c_hidden=c_hidden, outgoing=outgoing), mem)
        low.load_state_dict(ref.state_dict())
        z, mask = torch.randn(2, 7, 7, 6), _pair_mask(mask_factory, 2, n=7)
        with torch.no_grad():
            torch.testing.assert_close(low(z, mask), ref(z, mask), rtol=RTOL, atol=ATOL)


def test_triangle_einsum_runs_in_fp32_under_autocast(randomize, mask_factory) -> None:
    mod = randomize(planned(TriangleMultiplication(c_z=6, c_hidden=5, outgoing=True), MEM))
    z, mask = torch.randn(7, 7, 6), _pair_mask(mask_factory, n=7)
    seen = []
    original = torch.einsum

    def spy(eq, *ops):
        seen.append(tuple(o.dtype for o in ops))
        return original(eq, *ops)

    torch.einsum = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mod(z, mask)
    finally:
        torch.einsum = original
    assert seen == [(torch.float32, torch.float32)]
    torch.testing.assert_close(out.float(), mod(z, mask), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    ("name", "low"),
    [(n, False) for n in ("mul_out", "mul_in", "att_start", "att_end", "transition")]
    + [("mul_out", True), ("mul_in", True)],  # low_memory_triangle only changes the multiplicative updates
)
def test_gradcheck_pair_modules(name, low, mask_factory) -> None:
    mem = MemoryConfig(low_memory_triangle=low, pair_chunk=2 if low else None)
    mod = _pair_modules(3, mem=mem, c_hidden=3)[name].double()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.5)
    z = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    # A real mask, but no fully masked attention row: there every logit carries the -1e9 mask bias, whose
    # float64 rounding (~1e-7) swamps the finite differences (the analytic gradient is fine).
    mask = mask_factory(4, 4).double().fill_diagonal_(1.0)
    # fast mode (random projections of the Jacobian) keeps the nested-recompute cases quick
    assert torch.autograd.gradcheck(lambda z_: mod(z_, mask), (z,), fast_mode=low)


@pytest.mark.parametrize("outgoing", [True, False])
def test_low_memory_inference_peak_is_near_2_5_pair_tensors(outgoing) -> None:
    """Without grad, beyond the input z the low-memory path allocates at most ~1.5 pair tensors at once."""
    N, c = 64, 16
    z, mask = torch.randn(N, N, c), torch.ones(N, N)
    pair = z.numel() * z.element_size()
    peaks = {}
    for low in (False, True):
        mod = planned(TriangleMultiplication(c_z=c, c_hidden=c, outgoing=outgoing), MemoryConfig(low_memory_triangle=low))
        with torch.no_grad():
            peaks[low] = peak_new_bytes(lambda: mod(z, mask), [z, mask, *mod.parameters()]) / pair
    assert peaks[True] <= 1.5 < 4.0 <= peaks[False], peaks


@pytest.mark.parametrize("outgoing", [True, False])
def test_low_memory_training_channel_slices_match(outgoing, randomize, mask_factory) -> None:
    """Large pair tensors are sliced over hidden channels in training; force that path at a small N."""
    ref = randomize(planned(TriangleMultiplication(c_z=6, c_hidden=5, outgoing=outgoing), MemoryConfig()))
    two_channels = 7 * 7 * 4 * 2 / 2**20  # MiB of two fp32 channels at N = 7: 3 slices of 5 channels
    mem = MemoryConfig(low_memory_triangle=True, triangle_slice_mb=two_channels)
    low = planned(TriangleMultiplication(c_z=6, c_hidden=5, outgoing=outgoing), mem)
    low.load_state_dict(ref.state_dict())
    assert len(train_slices(low, torch.zeros(7, 7, 6), low.plan())) == 3
    z = torch.randn(7, 7, 6)
    mask = mask_factory(7, 7)
    outs, grads = [], []
    for module in (ref, low):
        zz = z.clone().requires_grad_(True)
        out = module(zz, mask)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([zz.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_low, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_low, g_ref, rtol=1e-5, atol=1e-6)


def test_smaller_training_slices_lower_the_peak() -> None:
    """`triangle_slice_mb` at a quarter of one fp32 [N, N, c_hidden] edge: 4 channel slices, each made and
    recomputed on its own, so forward + backward peaks lower (CPU measurement: 10.9 edges with one slice, 4.9 with
    four). Session 6 located `long`'s peak at crop 1024 in this update's backward, unsliced at the default 512 MiB."""
    from protfold.model.memory import peak_new_bytes

    n, c_z, c_hidden = 48, 8, 32
    z0, mask = torch.randn(n, n, c_z), (torch.rand(n, n) > 0.1).float()
    edge = n * n * 4 * c_hidden
    peaks, grads = {}, {}
    for slice_mb in (512.0, edge / 4 / 2**20):
        torch.manual_seed(0)
        mem = MemoryConfig(low_memory_triangle=True, triangle_slice_mb=slice_mb)
        mod = planned(TriangleMultiplication(c_z=c_z, c_hidden=c_hidden, outgoing=True), mem)
        torch.nn.init.normal_(mod.linear_o.weight)  # AF2's zero init would leave z without a gradient
        z = z0.clone().requires_grad_()

        def step():
            mod(z, mask).square().sum().backward()

        peaks[len(train_slices(mod, z0, mod.plan()))] = peak_new_bytes(step, [z0, z, mask, *mod.parameters()]) / edge
        grads[slice_mb] = z.grad
    assert sorted(peaks) == [1, 4] and peaks[4] < 0.6 * peaks[1], peaks
    first, second = grads.values()  # the same gradient: slicing reorders fp32 sums only
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5 * float(first.abs().max()))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_triangle_slice_mb_must_be_positive(bad) -> None:
    with pytest.raises(ValueError, match="triangle_slice_mb must be > 0"):
        MemoryConfig(triangle_slice_mb=bad)
