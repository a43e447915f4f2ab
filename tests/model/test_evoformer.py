"""Evoformer modules, block, stacks and embedders: contracts with odd shapes and real masks, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protfold.config import MemoryConfig
from protfold.model.embedders import ExtraMSAEmbedder, InputEmbedder, RecyclingEmbedder
from protfold.model.evoformer import (
    EvoformerBlock,
    EvoformerStack,
    ExtraMSAStack,
    MSAColumnAttention,
    MSAColumnGlobalAttention,
    MSARowAttentionWithPairBias,
    MSATransition,
    OuterProductMean,
    SharedDropout,
)

from .conftest import planned

MEM = MemoryConfig()
RTOL, ATOL = 1e-5, 1e-6


def _msa_modules(c_m: int, c_z: int, mem: MemoryConfig = MEM) -> dict[str, torch.nn.Module]:
    return {
        "row": planned(MSARowAttentionWithPairBias(c_m=c_m, c_z=c_z, n_heads=2, c_hidden=3), mem),
        "col": planned(MSAColumnAttention(c_m=c_m, n_heads=2, c_hidden=3), mem),
        "global_col": planned(MSAColumnGlobalAttention(c_m=c_m, n_heads=2, c_hidden=3), mem),
        "transition": planned(MSATransition(c_m=c_m, factor=2), mem),
        "opm": planned(OuterProductMean(c_m=c_m, c_z=c_z, c_hidden=3), mem),
    }


def _call(name: str, mod, m, z, msa_mask):
    return mod(m, z, msa_mask) if name == "row" else mod(m, msa_mask)


@pytest.mark.parametrize("name", ["row", "col", "global_col", "transition", "opm"])
def test_msa_module_contracts(name, randomize, mask_factory) -> None:
    S, N, c_m, c_z = 5, 7, 6, 4
    mod = randomize(_msa_modules(c_m, c_z)[name])
    m, z, msa_mask = torch.randn(2, S, N, c_m), torch.randn(2, N, N, c_z), mask_factory(2, S, N)
    out = _call(name, mod, m, z, msa_mask)
    assert out.shape == ((2, N, N, c_z) if name == "opm" else (2, S, N, c_m))
    assert torch.isfinite(out).all()
    # values of m at masked MSA positions must not leak into unmasked outputs
    m2 = torch.where(msa_mask[..., None] == 0, torch.randn_like(m) * 5, m)
    out2 = _call(name, mod, m2, z, msa_mask)
    if name == "opm":
        torch.testing.assert_close(out2, out, rtol=RTOL, atol=1e-5)
    else:
        keep = msa_mask == 1
        torch.testing.assert_close(out2[keep], out[keep], rtol=RTOL, atol=1e-5)


def test_msa_modules_start_as_zero_updates(mask_factory) -> None:
    """With AF2 initialisers (final-init output projections) every residual update starts at zero."""
    m, z, msa_mask = torch.randn(1, 3, 5, 6), torch.randn(1, 5, 5, 4), mask_factory(1, 3, 5)
    for name, mod in _msa_modules(6, 4).items():
        assert _call(name, mod, m, z, msa_mask).abs().max() == 0, name


def test_outer_product_mean_matches_definition(randomize, mask_factory) -> None:
    opm = randomize(planned(OuterProductMean(c_m=6, c_z=4, c_hidden=3), MEM))
    m, mask = torch.randn(5, 7, 6), mask_factory(5, 7)
    a = opm.linear_a(opm.norm(m)) * mask[..., None]
    b = opm.linear_b(opm.norm(m)) * mask[..., None]
    expected = torch.empty(7, 7, 4)
    for i in range(7):
        for j in range(7):
            outer = sum(torch.outer(a[s, i], b[s, j]) for s in range(5))
            expected[i, j] = opm.linear_o(outer.flatten()) / (1e-3 + (mask[:, i] * mask[:, j]).sum())
    torch.testing.assert_close(opm(m, mask), expected, rtol=RTOL, atol=1e-5)


def test_shared_dropout_shares_its_mask() -> None:
    x = torch.ones(4, 6, 9, 8)
    row = SharedDropout(0.5, shared_dim=-3).train()(x)
    assert (row == row[..., :1, :, :]).all() and (row == 0).any() and (row == 2).any()
    col = SharedDropout(0.5, shared_dim=-2).train()(x)
    assert (col == col[..., :, :1, :]).all() and (col == 0).any()
    assert torch.equal(SharedDropout(0.5, shared_dim=-3).eval()(x), x)


# AF2 supplement Algorithm 6 and AF2's config (`orientation` of each pair update): both triangle multiplicative
# updates and the starting-node attention drop per row (one mask shared by all rows i: shared dim -3), the
# ending-node attention per column (shared by all columns j: dim -2).
PAIR_DROPOUT_AXES = {"tri_mul_out": -3, "tri_mul_in": -3, "tri_att_start": -3, "tri_att_end": -2}
# every execution path of a block in train mode: with grad (eager, recomputed per update) and without grad
# (the recycling passes of training: plain, and the in-place row-chunked path that draws masks in `_AddInto`)
BLOCK_PATHS = {
    "grad": (True, MEM),
    "grad, recompute_inside_block": (True, MemoryConfig(recompute_inside_block=True)),
    "no grad": (False, MEM),
    "no grad, chunked in place": (False, MemoryConfig(low_memory_triangle=True, pair_chunk=3)),
}


@pytest.mark.parametrize("path", BLOCK_PATHS)
@pytest.mark.parametrize("update", PAIR_DROPOUT_AXES)
def test_pair_dropout_orientation(tiny_cfg, randomize, update: str, path: str) -> None:
    """Only `update` has non-zero weights (AF2 init leaves every other residual update at zero), so the block's
    change to z is dropout(update(z)): its ratio to the update without dropout is 0 or 1 / (1 - p) and must be
    the same along the shared axis, and differ along the other one."""
    grad, mem = BLOCK_PATHS[path]
    block = planned(EvoformerBlock.from_config(tiny_cfg), mem)
    randomize(getattr(block, update))
    n = 9
    z, m = torch.randn(1, n, n, tiny_cfg.c_z), torch.randn(1, 3, n, tiny_cfg.c_m)
    msa_mask, pair_mask = torch.ones(1, 3, n), torch.ones(1, n, n)
    with torch.no_grad():
        clean = block.eval()(m, z, msa_mask, pair_mask)[1] - z
    with torch.set_grad_enabled(grad):
        dropped = block.train()(m, z, msa_mask, pair_mask)[1].detach() - z
    assert clean.abs().min() > 0
    ratio = dropped / clean
    p = tiny_cfg.pair_dropout
    kept = torch.isclose(ratio, torch.tensor(1.0 / (1.0 - p)), rtol=1e-3)
    assert (kept | (ratio.abs() < 1e-3)).all() and kept.any() and not kept.all()
    shared = PAIR_DROPOUT_AXES[update]
    other = -2 if shared == -3 else -3
    assert (kept == kept.narrow(shared, 0, 1)).all(), "mask not shared along its axis"
    assert not (kept == kept.narrow(other, 0, 1)).all(), "mask shared along the other axis too"


def test_evoformer_block_contract(tiny_cfg, trunk_inputs, randomize) -> None:
    block = randomize(planned(EvoformerBlock.from_config(tiny_cfg), MEM)).train()
    t = trunk_inputs
    m, z = block(t.m, t.z, t.msa_mask, t.pair_mask)
    assert m.shape == t.m.shape and z.shape == t.z.shape
    assert torch.isfinite(m).all() and torch.isfinite(z).all()
    block.eval()
    m1, z1 = block(t.m, t.z, t.msa_mask, t.pair_mask)
    assert not torch.allclose(m1, m)  # dropout was on in train mode


def test_evoformer_stack_returns_single_from_first_row(tiny_cfg, trunk_inputs, randomize) -> None:
    stack = randomize(planned(EvoformerStack(tiny_cfg), MEM)).eval()
    t = trunk_inputs
    m, z, s = stack(t.m, t.z, t.msa_mask, t.pair_mask)
    assert m.shape == t.m.shape and z.shape == t.z.shape and s.shape == (*t.m.shape[:1], t.m.shape[2], tiny_cfg.c_s)
    torch.testing.assert_close(s, stack.linear_s(m[:, 0]), rtol=0, atol=0)
    assert len(stack.blocks) == tiny_cfg.n_evoformer_blocks


def test_inference_path_matches_grad_path_and_leaves_inputs_alone(tiny_cfg, trunk_inputs, randomize) -> None:
    """Without grad the block adds updates in place; the caller's tensors must stay untouched."""
    stack = randomize(planned(EvoformerStack(tiny_cfg), MEM)).eval()
    t = trunk_inputs
    m0, z0 = t.m.clone(), t.z.clone()
    with torch.no_grad():
        fast = stack(t.m, t.z, t.msa_mask, t.pair_mask)
    assert torch.equal(t.m, m0) and torch.equal(t.z, z0)
    slow = stack(t.m, t.z, t.msa_mask, t.pair_mask)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=RTOL, atol=ATOL)


def test_extra_msa_stack(tiny_cfg, trunk_inputs, randomize) -> None:
    t = trunk_inputs
    stack = randomize(planned(ExtraMSAStack(tiny_cfg), MEM)).train()
    z = stack(t.e, t.z, t.extra_msa_mask, t.pair_mask)
    assert z.shape == t.z.shape and torch.isfinite(z).all() and not torch.allclose(z, t.z)
    assert isinstance(stack.blocks[0].msa_col, MSAColumnGlobalAttention)
    off = planned(ExtraMSAStack(type(tiny_cfg)(**{**tiny_cfg.__dict__, "extra_msa_enabled": False})), MEM)
    assert len(off.blocks) == 0 and off(t.e, t.z, t.extra_msa_mask, t.pair_mask) is t.z


# ------------------------------------------------------------------ embedders


def test_input_embedder(tiny_cfg, randomize) -> None:
    emb = randomize(InputEmbedder.from_config(tiny_cfg))
    N, S = 7, 5
    target_feat, msa_feat = torch.randn(2, N, 22), torch.randn(2, S, N, 49)
    residue_index = torch.tensor([[0, 1, 2, 40, 41, 42, 100], [3, 4, 5, 6, 7, 8, 9]])
    m, z = emb(target_feat, residue_index, msa_feat)
    assert m.shape == (2, S, N, tiny_cfg.c_m) and z.shape == (2, N, N, tiny_cfg.c_z)
    # Algorithm 4 written out: one-hot of the clipped offset through the Linear
    d = (residue_index[:, :, None] - residue_index[:, None, :]).clamp(-32, 32) + 32
    relpos = emb.linear_relpos(F.one_hot(d, 65).float())
    expected_z = (emb.linear_tf_z_i(target_feat)[:, :, None] + emb.linear_tf_z_j(target_feat)[:, None]) + relpos
    torch.testing.assert_close(z, expected_z, rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(m[:, 3], emb.linear_msa_m(msa_feat[:, 3]) + emb.linear_tf_m(target_feat),
                               rtol=RTOL, atol=1e-5)
    # offsets beyond +-32 all land in the edge bins
    torch.testing.assert_close(emb.relpos(residue_index)[0, 0, 6], emb.relpos(residue_index)[0, 0, 3])


def test_recycling_embedder_bins(tiny_cfg, randomize) -> None:
    emb = randomize(RecyclingEmbedder.from_config(tiny_cfg))
    x = torch.zeros(1, 5, 3)
    x[0, :, 0] = torch.tensor([0.0, 3.0, 4.0, 10.0, 40.0])  # distances from residue 0: 3, 4, 10, 40
    dgram = emb.distogram(x)
    assert dgram.shape == (1, 5, 5, 15)
    assert dgram[0, 0, 1].sum() == 0  # 3 A is below the first edge 3.25
    assert dgram[0, 0, 2].argmax() == 0  # 4 A: first bin [3.25, 4.5)
    assert dgram[0, 0, 3].argmax() == 5  # 10 A: [9.5, 10.75)
    assert dgram[0, 0, 4].argmax() == 14  # 40 A: last, open bin
    torch.testing.assert_close(dgram, dgram.transpose(1, 2))
    m0, z = torch.randn(1, 5, tiny_cfg.c_m), torch.randn(1, 5, 5, tiny_cfg.c_z)
    m_upd, z_upd = emb(m0, z, x)
    torch.testing.assert_close(m_upd, emb.norm_m(m0))
    torch.testing.assert_close(z_upd, emb.linear_d(dgram) + emb.norm_z(z))


def test_extra_msa_embedder(tiny_cfg) -> None:
    emb = ExtraMSAEmbedder.from_config(tiny_cfg)
    assert emb(torch.randn(2, 3, 7, 25)).shape == (2, 3, 7, tiny_cfg.c_e)


# ------------------------------------------------------------------ gradcheck (float64)


@pytest.mark.parametrize("name", ["row", "col", "global_col", "transition", "opm"])
def test_gradcheck_msa_modules(name, mask_factory) -> None:
    mod = _msa_modules(4, 3)[name].double()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.5)
    m = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = mask_factory(3, 4).double()
    if name == "row":
        assert torch.autograd.gradcheck(lambda m_, z_: mod(m_, z_, mask), (m, z))
    else:
        assert torch.autograd.gradcheck(lambda m_: mod(m_, mask), (m,))


def test_bf16_residual_stream_stays_bf16_in_inference() -> None:
    """Pure-bf16 inference: an fp32 update (OPM's division by fp32 counts) must not widen z to fp32, which would
    double every later pair-sized buffer (measured: block peak 5.2x -> 3.2x the bf16 pair tensor at N=384)."""
    from protfold.config import model_preset
    from protfold.model.evoformer import EvoformerBlock

    torch.manual_seed(0)
    blk = planned(EvoformerBlock.from_config(model_preset("tiny")), MemoryConfig()).eval()
    m, z = torch.randn(1, 3, 7, 16).bfloat16(), torch.randn(1, 7, 7, 8).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m_out, z_out = blk(m, z, torch.ones(1, 3, 7).bfloat16(), torch.ones(1, 7, 7).bfloat16())
    assert m_out.dtype == torch.bfloat16 and z_out.dtype == torch.bfloat16
