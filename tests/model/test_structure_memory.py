"""MemoryConfig.recompute_structure: same outputs and gradients as the plain structure module, less kept."""

from __future__ import annotations

import torch

from protfold.config import MemoryConfig, model_preset
from protfold.model.memory import saved_activation_bytes
from protfold.model.structure import StructureModule

from .conftest import planned

B, N = 2, 7


def _run(module: StructureModule, s, z, aatype, mask, seed: int):
    torch.manual_seed(seed)  # dropout on: the recompute must draw the same masks again
    out = module(s, z, aatype, mask)
    loss = sum(out[k].float().square().mean() for k in ("frames", "positions", "angles", "unnormalized_angles",
                                                         "single", "final_atom37", "sidechain_frames"))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [s, z, *params], allow_unused=True)
    return out, grads


def test_recompute_structure_is_exact_with_dropout(mask_factory) -> None:
    cfg = model_preset("tiny", structure_dropout=0.3)
    torch.manual_seed(1)
    plain = planned(StructureModule(cfg=cfg), MemoryConfig()).train()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))  # leave the zero "final" inits so every path carries gradient
    lean = planned(StructureModule(cfg=cfg), MemoryConfig(recompute_structure=True)).train()
    lean.load_state_dict(plain.state_dict())
    s = torch.randn(B, N, cfg.c_s, requires_grad=True)
    z = torch.randn(B, N, N, cfg.c_z, requires_grad=True)
    aatype, mask = torch.randint(0, 21, (B, N)), mask_factory(B, N, p=0.3)
    out_a, grads_a = _run(plain, s, z, aatype, mask, seed=3)
    out_b, grads_b = _run(lean, s, z, aatype, mask, seed=3)
    for key in out_a:
        torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_a)


def test_recompute_structure_keeps_less_for_backward(mask_factory) -> None:
    cfg = model_preset("tiny", structure_dropout=0.0)
    s, z = torch.randn(1, 24, cfg.c_s, requires_grad=True), torch.randn(1, 24, 24, cfg.c_z, requires_grad=True)
    aatype, mask = torch.randint(0, 21, (1, 24)), torch.ones(1, 24)
    kept = {}
    for flag in (False, True):
        module = planned(StructureModule(cfg=cfg), MemoryConfig(recompute_structure=flag))
        kept[flag] = saved_activation_bytes(lambda: module(s, z, aatype, mask))
    assert kept[True] < 0.5 * kept[False]
