"""Output heads: shapes, zero-initialised final layers, symmetric distogram."""

from __future__ import annotations

import math

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.losses import distogram_loss
from protfold.model.heads import AuxiliaryHeads, DistogramHead
from protfold.model.plan import resolve

B, S, N = 2, 3, 7

PLAIN = resolve(MemoryConfig(), grad=True, device="cpu")  # the plain path (no head_chunk)


def test_shapes_and_zero_init(tiny_cfg) -> None:
    heads = AuxiliaryHeads(cfg=tiny_cfg)
    m, z, s = torch.randn(B, S, N, tiny_cfg.c_m), torch.randn(B, N, N, tiny_cfg.c_z), torch.randn(B, N, tiny_cfg.c_s)
    out = heads(m, z, s_evoformer=s, s_structure=s, plan=PLAIN)
    shapes = {
        "distogram_logits": (B, N, N, 64), "plddt_logits": (B, N, 50), "masked_msa_logits": (B, S, N, 23),
        "experimentally_resolved_logits": (B, N, 37),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    for key, value in out.items():  # AF2 "final" init: untrained heads predict uniform bins
        assert torch.count_nonzero(value) == 0, key


def test_experimentally_resolved_head_optional(tiny_cfg) -> None:
    from protfold.config import model_preset

    heads = AuxiliaryHeads(cfg=model_preset("tiny", experimentally_resolved=False))
    s = torch.randn(B, N, tiny_cfg.c_s)
    out = heads(torch.randn(B, S, N, tiny_cfg.c_m), torch.randn(B, N, N, tiny_cfg.c_z), s_evoformer=s, s_structure=s,
                plan=PLAIN)
    assert "experimentally_resolved_logits" not in out


def test_distogram_symmetric_and_trainable(tiny_cfg, randomize) -> None:
    head = randomize(DistogramHead(cfg=tiny_cfg))
    z = torch.randn(B, N, N, tiny_cfg.c_z)
    logits = head(z)
    torch.testing.assert_close(logits, logits.transpose(1, 2))
    # starting from zero init the loss is log(64); a few gradient steps lower it
    head = DistogramHead(cfg=tiny_cfg)
    coords, mask = 4.0 * torch.randn(B, N, 3), torch.ones(B, N)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = distogram_loss(head(z), coords, mask).mean()
    assert first.item() == pytest.approx(math.log(64), abs=1e-5)
    for _ in range(5):
        opt.zero_grad()
        loss = distogram_loss(head(z), coords, mask).mean()
        loss.backward()
        opt.step()
    assert distogram_loss(head(z), coords, mask).mean() < first
