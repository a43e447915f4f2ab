"""protfold's Triton attention kernel (`attention="triton"`) against the naive kernel, run on the CPU by Triton's
interpreter: outputs and the gradients of q, k, v and the row-shared pair bias in fp32, at the shapes of every
attention that takes it (MSA rows with the pair bias, triangle attention, MSA columns with the mask only), with
lengths that leave partial tiles, and through the Evoformer and extra-MSA stacks. The same kernels on CUDA:
tests/gpu/test_attention_triton_gpu.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model import plan as plan_module
from protfold.model import primitives
from protfold.model.plan import resolve
from protfold.model.primitives import _naive_attention, attention, mask_bias

from .conftest import real_mask
from .test_memory_equivalence import _assert_same, _build, _run

RTOL, ATOL = 1e-5, 1e-5

# (lead dims, pair-bias lead dims or None, heads, queries = keys, head dim); the kernel's CPU tiles are 16 wide
CASES = {
    "msa rows + pair bias, narrow heads (extra MSA)": ((2, 3), (2, 1), 2, 37, 8),
    "triangle attention": ((1, 20), (1, 1), 4, 20, 16),
    "msa columns, mask only": ((1, 21), None, 2, 9, 32),
    "pair bias per batch, 3 lead dims": ((2, 2, 3), (2, 1, 1), 3, 17, 4),
    "several key tiles, wide heads": ((1, 2), (1, 1), 2, 70, 32),
}


def _inputs(lead, pair_lead, heads, n, c):
    q, k, v = (torch.randn(*lead, heads, n, c, requires_grad=True) for _ in range(3))
    biases = [mask_bias(real_mask(*lead, n))[..., None, None, :]]
    if pair_lead is not None:
        biases.append(torch.randn(*pair_lead, heads, n, n, requires_grad=True))
    return q, k, v, biases


def _out_and_grads(fn, q, k, v, biases):
    leaves = [q, k, v, *biases[1:]]
    out = fn(q, k, v, biases)
    grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), grads


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_naive_outputs_and_every_gradient(case, triton_interpreter) -> None:
    q, k, v, biases = _inputs(*CASES[case])
    ref, ref_grads = _out_and_grads(_naive_attention, q, k, v, biases)
    out, grads = _out_and_grads(triton_interpreter.pair_bias_attention, q, k, v, biases)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    for name, got, want in zip(("q", "k", "v", "pair bias"), grads, ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * float(want.abs().max()), msg=name)


def test_values_at_masked_keys_do_not_matter(triton_interpreter) -> None:
    q, k, v, biases = _inputs((1, 3), (1, 1), 2, 19, 8)
    keep = biases[0][..., 0, 0, :] == 0  # [1, 3, 19]
    v2 = v.detach().clone()
    v2.masked_fill_(~keep[..., None, :, None], 1e3)
    with torch.no_grad():
        torch.testing.assert_close(triton_interpreter.pair_bias_attention(q, k, v2, biases),
                                   triton_interpreter.pair_bias_attention(q, k, v, biases), rtol=RTOL, atol=ATOL)


def test_biases_of_another_form_run_the_naive_kernel_logged_once(triton_interpreter, caplog) -> None:
    """A bias that varies over the rows (not shared by them) is not the kernel's pair bias: naive, logged once."""
    lead, heads, n = (2, 3), 2, 11
    q, k, v = (torch.randn(*lead, heads, n, 8) for _ in range(3))
    per_row = [torch.randn(1, 3, heads, n, n)]
    assert triton_interpreter.split_biases(per_row, (*lead, heads, n, n)) is None
    plan = resolve(MemoryConfig(attention="triton"), grad=False, device="cpu")
    assert plan.attention == "triton"
    primitives._triton_fallback_logged.clear()
    with caplog.at_level(logging.WARNING, logger="protfold.model.primitives"):
        out = attention(q, k, v, per_row, plan)
        attention(q, k, v, per_row, plan)
    assert caplog.text.count("run the naive kernel") == 1
    torch.testing.assert_close(out, _naive_attention(q, k, v, per_row), rtol=0, atol=0)


def test_resolve_falls_back_to_naive_on_the_cpu_without_the_interpreter(monkeypatch, caplog) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan_module._fallback_warned.clear()
    with caplog.at_level(logging.WARNING, logger="protfold.model.plan"):
        plan = resolve(MemoryConfig(attention="triton"), grad=True, device="cpu")
        resolve(MemoryConfig(attention="triton"), grad=False, device="cpu")
    assert plan.attention == "naive"
    assert caplog.text.count("attention='triton' needs CUDA") == 1


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
def test_stacks_with_the_kernel_are_exact(kind, triton_interpreter, tiny_cfg_no_dropout, trunk_inputs,
                                          randomize) -> None:
    """Every attention of the stack through the kernel (MSA rows and columns, triangle attention; the extra MSA
    stack's global column attention stays naive): outputs and every parameter's and input's gradient."""
    ref_model = randomize(_build(kind, tiny_cfg_no_dropout, MemoryConfig()))
    alt_model = _build(kind, tiny_cfg_no_dropout, MemoryConfig(attention="triton"))
    alt_model.load_state_dict(ref_model.state_dict())
    calls = []
    kernel = triton_interpreter.pair_bias_attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_interpreter, "pair_bias_attention", lambda *a: calls.append(1) or kernel(*a))
        alt = _run(alt_model, kind, trunk_inputs)
    assert calls, "the kernel never ran"
    _assert_same(_run(ref_model, kind, trunk_inputs), alt)


def test_a_row_with_every_key_masked_matches(triton_interpreter) -> None:
    """Every key masked: the scores sit near -1e9, where fp32's spacing is 64; the kernel keeps the softmax's max
    and sum apart (max + log(sum) would round the log away and make backward's probabilities 1 instead of 1/K)."""
    q, k, v, biases = _inputs((1, 4), (1, 1), 2, 23, 8)
    mask = real_mask(1, 4, 23)
    mask[0, 2] = 0.0
    biases[0] = mask_bias(mask)[..., None, None, :]
    ref, ref_grads = _out_and_grads(_naive_attention, q, k, v, biases)
    out, grads = _out_and_grads(triton_interpreter.pair_bias_attention, q, k, v, biases)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    for name, got, want in zip(("q", "k", "v", "pair bias"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * float(want.abs().max()), msg=name)


def test_kernel_stays_in_a_compiled_graph(triton_interpreter) -> None:
    """The kernels are custom operators with fake versions: dynamo captures a call (bias sorting, reshapes and the
    operator) as one graph, `fullgraph=True` (a graph break would raise), forward and backward equal to eager."""
    q, k, v, biases = _inputs((1, 3), (1, 1), 2, 18, 8)

    def fn(q, k, v, mask_term, pair):
        return triton_interpreter.pair_bias_attention(q, k, v, [mask_term, pair])

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = [_out_and_grads(lambda *a: f(*a[:3], *a[3]), q, k, v, biases) for f in (fn, compiled)]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
def test_compiled_blocks_with_the_kernel_match_eager_naive(kind, triton_interpreter, tiny_cfg_no_dropout,
                                                           trunk_inputs, randomize, aot_eager_compile) -> None:
    """`compiled` with `attention: triton`: each block through torch.compile with block recompute, the kernel inside
    the block's one graph (forward and recompute), equal to the eager blocks with the naive kernel."""
    mem = MemoryConfig(blocks_per_checkpoint=1)
    ref_model = randomize(_build(kind, tiny_cfg_no_dropout, mem))
    alt_model = _build(kind, tiny_cfg_no_dropout, MemoryConfig(blocks_per_checkpoint=1, compile_blocks=True,
                                                               attention="triton"))
    alt_model.load_state_dict(ref_model.state_dict())
    assert alt_model.plan().attention == "triton"
    _assert_same(_run(ref_model, kind, trunk_inputs), _run(alt_model, kind, trunk_inputs))
    assert aot_eager_compile.counter.frame_count == 1  # no graph break around the kernel


def test_on_cuda_the_kernels_are_autotuned_over_tiles() -> None:
    """Imported without the interpreter (as on CUDA; a fresh process, since triton decides at import), every kernel
    is wrapped by Triton's autotuner: keys and tile names that the kernel takes, and candidate tiles that cover the
    tile shape the interpreter runs (64 x 64 with 4 warps)."""
    pytest.importorskip("triton")
    code = (
        "import json, protfold.model.kernels.attention_kernels as a\n"
        "out = {}\n"
        "for name in ('fwd', 'bwd_dkdv', 'bwd_dq', 'bwd_dpb'):\n"
        "    t = getattr(a, name)\n"
        "    out[name] = {'type': type(t).__name__, 'keys': list(t.keys), 'args': list(t.fn.arg_names),\n"
        "                 'tiles': [[c.kwargs['BM'], c.kwargs['BN'], c.num_warps] for c in t.configs]}\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, info in json.loads(result.stdout).items():
        assert info["type"] == "Autotuner", name
        assert set(info["keys"]) <= set(info["args"]) and {"BM", "BN"} <= set(info["args"]), name
        assert [64, 64, 4] in info["tiles"], name


def test_a_pair_bias_projected_channels_last_is_read_right(triton_interpreter) -> None:
    """The model's pair bias is linear(z) [B, N, N, H] moved to [B, H, N, N] (last stride H, a channels-last layout
    that F.pad would keep): the kernel gets it copied into rows padded to 16 elements, last stride 1, and the
    gradient flows back through the copy."""
    q, k, v, biases = _inputs((2, 3), None, 4, 21, 8)
    projected = torch.randn(2, 21, 21, 4, requires_grad=True)
    biases.append(projected.movedim(-1, -3)[:, None])
    pair, _ = triton_interpreter.split_biases(biases, (2, 3, 4, 21, 21))
    assert pair.stride(-1) == 1 and pair.stride(-2) == 32 and pair.shape == (2, 4, 21, 21)
    ref, ref_grads = _out_and_grads(_naive_attention, q, k, v, biases)
    out, grads = _out_and_grads(triton_interpreter.pair_bias_attention, q, k, v, biases)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    (want,) = torch.autograd.grad(_naive_attention(q, k, v, biases).sum(), projected)
    (got,) = torch.autograd.grad(triton_interpreter.pair_bias_attention(q, k, v, biases).sum(), projected)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * float(want.abs().max()))


def test_keys_and_values_broadcast_over_rows_are_left_to_the_naive_kernel(triton_interpreter) -> None:
    q = torch.randn(1, 3, 2, 11, 8)
    k, v = torch.randn(1, 1, 2, 11, 8), torch.randn(1, 1, 2, 11, 8)
    assert triton_interpreter.pair_bias_attention(q, k, v, []) is None
    assert triton_interpreter.pair_bias_attention(q, q.clone(), q.double(), []) is None  # mixed dtypes


def test_row_attention_lays_the_pair_bias_out_once_not_per_chunk(triton_interpreter, monkeypatch) -> None:
    """row_attention copies the pair bias into the kernels' layout once; each row chunk's bias sorting then takes
    it as it is (the small per-chunk key bias [rows, L] is made afresh anyway) (a copy per chunk is a pair-sized copy per chunk: about 100 of them per triangle attention at 4,096
    residues)."""
    from protfold.model.primitives import Attention, row_attention

    copies = []
    plain = triton_interpreter.aligned_rows
    monkeypatch.setattr(triton_interpreter, "aligned_rows",
                        lambda t: (copies.append(t.shape) if t.dim() == 4 and plain(t) is not t else None) or plain(t))
    attn = Attention(c_q=8, c_kv=8, c_hidden=4, n_heads=2)
    x, mask = torch.randn(1, 6, 13, 8), real_mask(1, 6, 13)
    pair = torch.randn(1, 13, 13, 2).movedim(-1, -3)  # [1, H, L, L], last stride H: not the kernels' layout
    plan = resolve(MemoryConfig(attention="triton"), grad=False, device="cpu")
    with torch.no_grad():
        out = row_attention(None, attn, x, mask, pair, 2, plan=plan)  # three chunks of 2 rows
        ref = row_attention(None, attn, x, mask, pair, None, plan=resolve(MemoryConfig(), grad=False, device="cpu"))
    assert copies == [(1, 2, 13, 13)]
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    aligned = plain(pair)
    assert plain(aligned) is aligned and aligned.stride(-2) == 16
