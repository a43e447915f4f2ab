"""Every MemoryConfig switch computes the same model: outputs and all gradients, dropout off and on.

Also: the chunked / recompute paths really keep less for backward (bytes counted through saved-tensor
hooks), and the one documented exception, bf16 checkpoint storage, stays within its stated tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from protfold.config import MemoryConfig, load_memory_preset
from protfold.model.evoformer import EvoformerStack, ExtraMSAStack, MSARowAttentionWithPairBias
from protfold.model.memory import chunk_rows, saved_activation_bytes
from protfold.model.triangle import TriangleAttention, TriangleMultiplication

from .conftest import planned

# fp32. The absolute tolerance is 1e-5 of the tensor's largest entry (at least 1e-5): a gradient that is a
# sum of many large terms (an output projection's weight) can land near zero, where a purely relative test
# would judge rounding noise of the big terms, reordered by chunking, against a tiny value.
RTOL, ATOL = 1e-5, 1e-5

LOW = MemoryConfig(blocks_per_checkpoint=1, recompute_inside_block=True, msa_chunk=2, pair_chunk=3,
                   low_memory_triangle=True, attention="sdpa", checkpoint_storage="cpu")
SWITCHES = {
    "blocks_per_checkpoint=1": MemoryConfig(blocks_per_checkpoint=1),
    "blocks_per_checkpoint=2": MemoryConfig(blocks_per_checkpoint=2),
    "recompute_inside_block": MemoryConfig(recompute_inside_block=True),
    "msa_chunk=2": MemoryConfig(msa_chunk=2),
    "pair_chunk=3": MemoryConfig(pair_chunk=3),
    "low_memory_triangle": MemoryConfig(low_memory_triangle=True),
    "attention=sdpa": MemoryConfig(attention="sdpa"),
    "attention=flex (CPU fallback)": MemoryConfig(attention="flex"),
    "checkpoint_storage=cpu": MemoryConfig(blocks_per_checkpoint=1, checkpoint_storage="cpu"),
    # a cap this small leaves one or two rows per chunk at these shapes, so the adaptive path really chunks
    "attention_chunk_mb": MemoryConfig(attention_chunk_mb=0.0002),
    "low (all together)": LOW,
    "low as shipped (adaptive chunks)": MemoryConfig(blocks_per_checkpoint=1, recompute_inside_block=True,
                                                     checkpoint_storage="cpu", attention_chunk_mb=0.0002,
                                                     pair_chunk=3, low_memory_triangle=True),
}


def _build(kind: str, cfg, mem: MemoryConfig):
    return planned((EvoformerStack if kind == "evoformer" else ExtraMSAStack)(cfg), mem).train()


def _strided_view(x):
    """x as a view with other strides than a fresh tensor's (the same values, gradients flowing to x)."""
    return x.transpose(-2, -3).contiguous().transpose(-2, -3)


def _run(model, kind: str, inputs, seed: int = 1, prep=lambda x: x):
    """Forward under a fixed seed (so dropout draws the same masks), backward of a fixed scalar loss. `prep` is
    applied to the MSA input on its way in."""
    t = inputs.leaves()
    torch.manual_seed(seed)
    if kind == "evoformer":
        outs = model(prep(t.m), t.z, t.msa_mask, t.pair_mask)
        leaves = {"m": t.m, "z": t.z}
    else:
        outs = (model(prep(t.e), t.z, t.extra_msa_mask, t.pair_mask),)
        leaves = {"e": t.e, "z": t.z}
    loss = sum((o * torch.linspace(-1, 2, o.shape[-1])).square().mean() for o in outs)
    loss.backward()
    grads = {f"input {k}": v.grad for k, v in leaves.items()}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return [o.detach() for o in outs], grads


def _assert_same(ref, alt, rtol: float = RTOL, atol: float = ATOL) -> None:
    (ref_out, ref_grads), (alt_out, alt_grads) = ref, alt
    for i, (a, b) in enumerate(zip(alt_out, ref_out)):
        scaled_atol = atol * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=rtol, atol=scaled_atol, msg=lambda m, i=i: f"output {i}: {m}")
    assert ref_grads.keys() == alt_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None and alt_grads[name] is not None, f"no gradient for {name}"
        scaled_atol = atol * max(1.0, g.abs().max().item())
        torch.testing.assert_close(alt_grads[name], g, rtol=rtol, atol=scaled_atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("dropout", ["dropout off", "dropout on"])
@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
def test_switch_is_exact(kind, dropout, switch, tiny_cfg, tiny_cfg_no_dropout, trunk_inputs, randomize) -> None:
    cfg = tiny_cfg if dropout == "dropout on" else tiny_cfg_no_dropout
    ref_model = randomize(_build(kind, cfg, MemoryConfig()))
    alt_model = _build(kind, cfg, SWITCHES[switch])
    alt_model.load_state_dict(ref_model.state_dict())
    _assert_same(_run(ref_model, kind, trunk_inputs), _run(alt_model, kind, trunk_inputs))


def test_dropout_is_really_on_in_the_dropout_runs(tiny_cfg, trunk_inputs, randomize) -> None:
    """Guards the test above against passing vacuously: another seed gives other outputs."""
    model = randomize(_build("evoformer", tiny_cfg, LOW))
    (out1, _), (out2, _) = _run(model, "evoformer", trunk_inputs, seed=1), _run(model, "evoformer", trunk_inputs, 2)
    assert not torch.allclose(out1[1], out2[1])


def test_chunked_row_attention_pair_bias_gradient(mask_factory, randomize) -> None:
    """The pair bias is shared by all MSA rows; chunking rows must accumulate its gradient exactly."""
    ref = randomize(planned(MSARowAttentionWithPairBias(c_m=6, c_z=4, n_heads=3, c_hidden=2), MemoryConfig()))
    grads = []
    for mem in (MemoryConfig(), MemoryConfig(msa_chunk=2), MemoryConfig(msa_chunk=2, attention="sdpa")):
        mod = planned(MSARowAttentionWithPairBias(c_m=6, c_z=4, n_heads=3, c_hidden=2), mem)
        mod.load_state_dict(ref.state_dict())
        torch.manual_seed(3)
        m, z = torch.randn(2, 5, 7, 6, requires_grad=True), torch.randn(2, 7, 7, 4, requires_grad=True)
        out = mod(m, z, mask_factory(2, 5, 7))
        out.square().sum().backward()
        grads.append((out.detach(), z.grad, m.grad, mod.linear_z.weight.grad))
    for alt in grads[1:]:
        for a, b in zip(alt, grads[0]):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_bf16_checkpoint_storage_within_documented_tolerance(tiny_cfg_no_dropout, trunk_inputs, randomize) -> None:
    """bf16 boundaries: forward unchanged; gradients recomputed from bf16-rounded m, z differ by bf16 precision.

    Documented tolerance: per tensor, ||g_bf16 - g|| <= 3e-2 ||g|| (see the floor below).
    """
    ref_model = randomize(_build("evoformer", tiny_cfg_no_dropout, MemoryConfig()))
    alt_model = _build("evoformer", tiny_cfg_no_dropout, MemoryConfig(blocks_per_checkpoint=1,
                                                                      checkpoint_storage="bf16"))
    alt_model.load_state_dict(ref_model.state_dict())
    (ref_out, ref_grads), (alt_out, alt_grads) = (_run(m, "evoformer", trunk_inputs) for m in (ref_model, alt_model))
    for a, b in zip(alt_out, ref_out):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    # Floor: a few gradients are exactly zero in exact arithmetic (the LayerNorm bias feeding a pair bias
    # shifts every logit of a softmax row equally), so their values are pure rounding noise; they are
    # judged against 1% of the whole gradient's norm instead of their own.
    total = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    worst = 0.0
    for name, g in ref_grads.items():
        err = (alt_grads[name] - g).norm()
        assert err <= 3e-2 * max(g.norm(), 1e-2 * total), f"{name}: gradient error {err:.3g}, norm {g.norm():.3g}"
        worst = max(worst, err.item())
    assert worst > 0  # the boundaries really were stored in bf16


# ------------------------------------------------------------------ saved bytes for backward


def _saved(fn_module, *args) -> int:
    return saved_activation_bytes(lambda: fn_module(*args))


def test_saved_activation_bytes_counts_what_autograd_keeps() -> None:
    x = torch.randn(64, 64, requires_grad=True)
    assert saved_activation_bytes(lambda: (x * 2).sum()) == 0  # mul by a constant keeps nothing
    y = torch.randn(64, 64)
    assert saved_activation_bytes(lambda: torch.tanh(x + y)) == 64 * 64 * 4  # tanh keeps its output
    assert saved_activation_bytes(lambda: chunk_rows(torch.exp, [x + y], [-2], 8, out_dim=-2)) == 64 * 64 * 4


def test_chunked_paths_keep_substantially_less_for_backward(mask_factory) -> None:
    torch.manual_seed(0)
    S, N = 32, 64  # N_seq * heads >> c_z, as in AF2 (128 * 8 vs 128), so logits dominate what is kept
    mask = mask_factory(1, S, N)
    seq = mask_factory(1, N, p=0.1)
    pair_mask = seq[..., :, None] * seq[..., None, :]
    m, z = torch.randn(1, S, N, 16, requires_grad=True), torch.randn(1, N, N, 8, requires_grad=True)
    saved = {}
    for label, mem in (("none", MemoryConfig()), ("chunked", MemoryConfig(msa_chunk=2, pair_chunk=8)),
                       ("low_tri", MemoryConfig(low_memory_triangle=True))):
        row = planned(MSARowAttentionWithPairBias(c_m=16, c_z=8, n_heads=4, c_hidden=4), mem)
        tri_att = planned(TriangleAttention(c_z=8, c_hidden=4, n_heads=2, starting=True), mem)
        tri_mul = planned(TriangleMultiplication(c_z=8, c_hidden=8, outgoing=True), mem)
        saved[label] = {
            "row": _saved(row, m, z, mask),
            "tri_att": _saved(tri_att, z, pair_mask),
            "tri_mul": _saved(tri_mul, z, pair_mask),
        }
    none, chunked, low = saved["none"], saved["chunked"], saved["low_tri"]
    # MSA row attention: the [S, H, N, N] logits and probabilities are no longer kept
    assert chunked["row"] < 0.25 * none["row"], saved
    assert chunked["tri_att"] < 0.25 * none["tri_att"], saved
    # low-memory triangle multiplication keeps z only (no [N, N, c_hidden] projections or gates)
    assert low["tri_mul"] <= N * N * 8 * 4 < 0.2 * none["tri_mul"], saved


def test_recompute_switches_keep_less_for_backward(tiny_cfg, inputs_factory) -> None:
    """Whole stack: block-level and in-block recompute keep far less than keeping everything."""
    t = inputs_factory(tiny_cfg, batch=1, n_seq=8, n_res=24, n_extra=3).leaves()
    saved = {}
    for label, mem in (("none", MemoryConfig()), ("inside", MemoryConfig(recompute_inside_block=True)),
                       ("blocks", MemoryConfig(blocks_per_checkpoint=1)), ("low", LOW)):
        model = planned(EvoformerStack(tiny_cfg), mem).train()
        saved[label] = saved_activation_bytes(lambda: model(t.m, t.z, t.msa_mask, t.pair_mask))
    assert saved["inside"] < 0.25 * saved["none"], saved
    assert saved["blocks"] < 0.1 * saved["none"], saved
    assert saved["low"] <= saved["blocks"], saved


@pytest.mark.parametrize("mem", [MemoryConfig(), LOW, MemoryConfig(blocks_per_checkpoint=1, checkpoint_storage="bf16")],
                         ids=["reference", "low", "bf16 storage"])
@pytest.mark.parametrize("grad", [True, False])
def test_bf16_autocast_runs_and_stays_close(mem, grad, tiny_cfg_no_dropout, trunk_inputs, randomize) -> None:
    """Under bf16 autocast (as on the GPU) every path runs, with and without grad, close to fp32."""
    ref = randomize(_build("evoformer", tiny_cfg_no_dropout, MemoryConfig()), std=0.1)
    model = _build("evoformer", tiny_cfg_no_dropout, mem)
    model.load_state_dict(ref.state_dict())
    t = trunk_inputs.leaves()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(t.m, t.z, t.msa_mask, t.pair_mask)
        if grad:
            sum(o.float().square().mean() for o in outs).backward()
    with torch.no_grad():
        expected = ref(t.m, t.z, t.msa_mask, t.pair_mask)
    for o, e in zip(outs, expected):
        assert ((o.float() - e).norm() / e.norm()).item() < 2e-2
    if grad:
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
@pytest.mark.parametrize("base", ["plain", "recompute", "inblock"])
@pytest.mark.parametrize("dropout", [False, True])
def test_compiled_blocks_match_eager(kind, base, dropout, tiny_cfg, tiny_cfg_no_dropout, trunk_inputs, randomize,
                                     aot_eager_compile) -> None:
    """compile_blocks runs each block through torch.compile (without recompute, with block recompute, with in-block
    recompute as well; with and without dropout): same outputs and every gradient. CI checks the capture with the
    cheap `aot_eager` backend (dynamo graph, autograd, checkpoint and RNG replay); the inductor kernels themselves,
    and their dropout draws (`fallback_random`), are compared on the GPU (tests/gpu)."""
    cfg = tiny_cfg if dropout else tiny_cfg_no_dropout
    mem = {"plain": MemoryConfig(), "recompute": MemoryConfig(blocks_per_checkpoint=1),
           "inblock": MemoryConfig(blocks_per_checkpoint=1, recompute_inside_block=True)}[base]
    ref_model = randomize(_build(kind, cfg, mem))
    alt_model = _build(kind, cfg, MemoryConfig(**{**mem.__dict__, "compile_blocks": True}))
    alt_model.load_state_dict(ref_model.state_dict())
    _assert_same(_run(ref_model, kind, trunk_inputs), _run(alt_model, kind, trunk_inputs))
    from protfold.model import memory

    assert type(alt_model.blocks[0]) in memory._COMPILED  # the compiled path really ran
    assert aot_eager_compile.options == [{"fallback_random": True}]  # inductor draws dropout masks with the eager kernels
    assert set(alt_model.state_dict()) == set(ref_model.state_dict())


@pytest.mark.parametrize("kind", ["evoformer", "extra_msa"])
@pytest.mark.parametrize("storage", ["bf16", "cpu"])
def test_compiled_recompute_runs_the_forward_graph(kind, storage, tiny_cfg_no_dropout, trunk_inputs, randomize,
                                                   monkeypatch, aot_eager_compile) -> None:
    """Block boundaries kept as copies come back in backward as new tensors, and dynamo guards on strides: if a
    copy lost the strides of a forward input (a view with other strides, say), the recompute could run another
    graph than its forward: a CheckpointError, or worse, other saved tensors of the same shapes. The copies keep
    the strides (`memory._host_copy` for `cpu`; bf16's `to` already did), so forward and recompute take one graph,
    with the results of eager blocks under the same storage. On the CPU `cpu` storage keeps references, so its GPU
    copy is made here for CPU tensors too."""
    from protfold.model import memory

    if storage == "cpu":
        def copy_as_on_gpu(t):
            return ("cpu", t.device, memory._host_copy(t)) if t.requires_grad else ("ref", t)

        monkeypatch.setattr(memory, "_pack_cpu", copy_as_on_gpu)
    mem = MemoryConfig(blocks_per_checkpoint=1, checkpoint_storage=storage)
    ref_model = randomize(_build(kind, tiny_cfg_no_dropout, mem))
    alt_model = _build(kind, tiny_cfg_no_dropout, MemoryConfig(**{**mem.__dict__, "compile_blocks": True}))
    alt_model.load_state_dict(ref_model.state_dict())
    ref = _run(ref_model, kind, trunk_inputs, prep=_strided_view)
    _assert_same(ref, _run(alt_model, kind, trunk_inputs, prep=_strided_view))
    assert aot_eager_compile.counter.frame_count == 1  # one graph for every block, in forward and in recompute


def test_each_stack_compiles_its_own_graph(tiny_cfg_no_dropout, trunk_inputs, randomize, aot_eager_compile) -> None:
    """The Evoformer and the extra MSA stack differ in widths, rows and, under autocast, the stream's dtype (the
    extra MSA embedding is bf16, the MSA stream fp32). Dynamo keeps one cache per code object: sharing one block
    `forward`, the stacks recompiled each other's graphs, and session 6's second `fit` reached dynamo's limit that
    way. Each block class has its own `forward` now, and one graph."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    mem = MemoryConfig(blocks_per_checkpoint=1, compile_blocks=True)
    evoformer = randomize(_build("evoformer", tiny_cfg_no_dropout, mem))
    extra = randomize(_build("extra_msa", tiny_cfg_no_dropout, mem))
    t = trunk_inputs.leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = extra(t.e.bfloat16(), t.z, t.extra_msa_mask, t.pair_mask)
        outs = evoformer(t.m, z, t.msa_mask, t.pair_mask)
    sum(o.float().square().mean() for o in outs).backward()
    for block in (evoformer.blocks[0], extra.blocks[0]):
        assert len(_debug_get_cache_entry_list(type(block).forward.__code__)) == 1, type(block).__name__
    assert type(evoformer.blocks[0]) is not type(extra.blocks[0])


def test_compile_with_chunking_warns_about_compile_time() -> None:
    with pytest.warns(UserWarning, match="unrolled"):
        MemoryConfig(pair_chunk=8, compile_blocks=True)
    with warnings.catch_warnings():  # in-block recompute has no loop to unroll: the compiled_inblock preset is quiet
        warnings.simplefilter("error")
        assert load_memory_preset("compiled_inblock").recompute_inside_block
