"""Structure module: contracts, fp32 islands, IPA invariance, frame equivariance, gradcheck."""

from __future__ import annotations

import pytest
import torch

from protfold import constants as rc
from protfold.config import MemoryConfig, model_preset
from protfold.geometry import Rigid, quaternion_to_rotation
from protfold.model.structure import InvariantPointAttention, StructureModule

from .conftest import planned

B, N = 2, 7


def random_rigid(*shape: int, dtype=torch.float32, scale: float = 1.0) -> Rigid:
    rot = quaternion_to_rotation(torch.randn(*shape, 4, dtype=dtype))
    return Rigid(rot, scale * torch.randn(*shape, 3, dtype=dtype))


@pytest.fixture
def cfg():
    return model_preset("tiny", structure_dropout=0.0)


@pytest.fixture
def inputs(cfg, mask_factory):
    return dict(
        s=torch.randn(B, N, cfg.c_s), z=torch.randn(B, N, N, cfg.c_z), aatype=torch.randint(0, 21, (B, N)),
        mask=mask_factory(B, N, p=0.3),
    )


def test_contract_shapes_and_units(cfg, inputs) -> None:
    module = planned(StructureModule(cfg=cfg), MemoryConfig()).eval()
    out = module(**inputs)
    L = cfg.n_structure_layers
    shapes = {
        "frames": (L, B, N, 4, 4), "sidechain_frames": (B, N, 8, 4, 4), "unnormalized_angles": (L, B, N, 7, 2),
        "angles": (L, B, N, 7, 2), "positions": (L, B, N, 14, 3), "final_atom14": (B, N, 14, 3),
        "final_atom37": (B, N, 37, 3), "single": (B, N, cfg.c_s),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert all(torch.isfinite(v).all() for v in out.values())
    # zero-initialised backbone update: frames stay at the identity, atoms are the ideal residue in Angstrom
    torch.testing.assert_close(out["frames"], torch.eye(4).expand(L, B, N, 4, 4))
    n_ca = torch.linalg.vector_norm(out["final_atom14"][..., 0, :] - out["final_atom14"][..., 1, :], dim=-1)
    real = inputs["aatype"] < 20
    torch.testing.assert_close(n_ca[real], torch.full_like(n_ca[real], 1.46), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(out["angles"], dim=-1), torch.ones(L, B, N, 7))


def test_fp32_islands_under_bf16_autocast(cfg, inputs, randomize) -> None:
    module = randomize(planned(StructureModule(cfg=cfg), MemoryConfig()).eval(), std=0.1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = module(**inputs)
    for key in ("frames", "sidechain_frames", "positions", "final_atom14", "final_atom37", "angles"):
        assert out[key].dtype == torch.float32, key
    rot = out["frames"][..., :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3).expand_as(rot), atol=1e-5, rtol=0)


def atom14_exists(aatype: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(rc.restype_atom14_mask)[aatype][..., None]


def make_ipa(cfg, dtype=torch.float32) -> InvariantPointAttention:
    return InvariantPointAttention(c_s=cfg.c_s, c_z=cfg.c_z, heads=cfg.ipa_heads, head_dim=cfg.ipa_head_dim,
                                   qk_points=cfg.ipa_qk_points, v_points=cfg.ipa_v_points).to(dtype)


def test_ipa_invariant_to_global_transform(cfg, inputs, randomize) -> None:
    ipa = randomize(make_ipa(cfg))
    frames = random_rigid(B, N, scale=2.0)
    glob = random_rigid(1, 1, scale=5.0)
    out = ipa(inputs["s"], inputs["z"], frames, inputs["mask"])
    moved = ipa(inputs["s"], inputs["z"], glob.compose(frames), inputs["mask"])
    assert out.abs().max() > 1e-2  # not vacuous
    torch.testing.assert_close(moved, out, atol=1e-4, rtol=1e-4)


def test_ipa_masked_residues_do_not_leak(cfg, inputs, randomize) -> None:
    ipa = randomize(make_ipa(cfg))
    frames = random_rigid(B, N)
    mask = inputs["mask"]
    s2 = inputs["s"].clone()
    s2[mask == 0] += 10.0 * torch.randn_like(s2[mask == 0])
    out, out2 = ipa(inputs["s"], inputs["z"], frames, mask), ipa(s2, inputs["z"], frames, mask)
    torch.testing.assert_close(out2[mask == 1], out[mask == 1])


def test_layer_output_frames_are_equivariant(cfg, inputs, randomize) -> None:
    """One layer (IPA + transition + backbone update + all-atom) given T o F returns T o (its output for F)."""
    module = randomize(planned(StructureModule(cfg=cfg), MemoryConfig()).eval(), std=0.1)
    s, z = inputs["s"], inputs["z"]
    frames, glob = random_rigid(B, N), random_rigid(1, 1, scale=3.0)
    s_a, f_a, out_a = module.layer(s, s, z, frames, inputs["aatype"], inputs["mask"])
    s_b, f_b, out_b = module.layer(s, s, z, glob.compose(frames), inputs["aatype"], inputs["mask"])
    torch.testing.assert_close(s_b, s_a, atol=1e-4, rtol=1e-4)
    expected = glob.compose(f_a)
    torch.testing.assert_close(f_b.rot, expected.rot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_b.trans, expected.trans, atol=1e-5, rtol=1e-5)
    glob_angstrom = glob.scale_translation(cfg.position_scale)
    moved = glob_angstrom.unsqueeze(-1).apply(out_a["positions"]) * atom14_exists(inputs["aatype"])
    torch.testing.assert_close(out_b["positions"], moved, atol=1e-4, rtol=1e-5)


def test_structure_module_coordinates_follow_initial_frames(cfg, inputs, randomize) -> None:
    module = randomize(planned(StructureModule(cfg=cfg), MemoryConfig()).eval(), std=0.1)
    glob = random_rigid(1, 1, scale=3.0)
    start = Rigid.identity((B, N))
    out_a = module(**inputs, frames=start)
    out_b = module(**inputs, frames=glob.compose(start))
    glob_angstrom = glob.scale_translation(cfg.position_scale)
    for layer in range(cfg.n_structure_layers):
        moved = glob_angstrom.unsqueeze(-1).apply(out_a["positions"][layer]) * atom14_exists(inputs["aatype"])
        torch.testing.assert_close(out_b["positions"][layer], moved, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_b["angles"], out_a["angles"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_b["single"], out_a["single"], atol=1e-4, rtol=1e-4)


def test_rotation_gradient_stopped_between_layers(cfg, inputs, randomize) -> None:
    """Gradients equal a two-layer unroll with the rotation (only) detached between layers, and differ
    from an unroll without the stop."""
    module = randomize(planned(StructureModule(cfg=cfg), MemoryConfig()).eval(), std=0.1)
    assert cfg.n_structure_layers == 2

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, list(module.parameters()))]

    reference = grads(module(**inputs)["positions"][-1].square().sum())

    def unrolled(stop: bool) -> torch.Tensor:
        args = (inputs["aatype"], inputs["mask"])
        s_init = module.norm_s(inputs["s"])
        z = module.norm_z(inputs["z"])
        s, frames, _ = module.layer(module.embed_s(s_init), s_init, z, Rigid.identity((B, N)), *args)
        frames = frames.detach_rot() if stop else frames
        return module.layer(s, s_init, z, frames, *args)[2]["positions"].square().sum()

    for ref, got in zip(reference, grads(unrolled(stop=True))):
        torch.testing.assert_close(got, ref)
    assert any(not torch.allclose(a, b) for a, b in zip(reference, grads(unrolled(stop=False))))


def test_ipa_gradcheck_float64(cfg) -> None:
    small = model_preset("tiny", c_s=4, c_z=3, ipa_heads=2, ipa_head_dim=2, ipa_qk_points=2, ipa_v_points=2)
    ipa = make_ipa(small, torch.float64)
    with torch.no_grad():
        for p in ipa.parameters():
            p.normal_(0.0, 0.5)
    b, n = 1, 3
    rot = quaternion_to_rotation(torch.randn(b, n, 4, dtype=torch.float64))
    s = torch.randn(b, n, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(b, n, n, 3, dtype=torch.float64, requires_grad=True)
    trans = torch.randn(b, n, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s_, z_, t_: ipa(s_, z_, Rigid(rot, t_), mask), (s, z, trans))
