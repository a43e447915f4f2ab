"""Predicted aligned error and pTM (AF2 supplement 1.9.7): the formulas, the head, and the fixture's values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protfold.config import MemoryConfig, model_preset
from protfold.model.confidence import (
    aligned_error_bin_centres,
    predicted_aligned_error,
    predicted_tm_score,
)
from protfold.model.heads import AuxiliaryHeads, PredictedAlignedErrorHead
from protfold.model.plan import resolve

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alphafold_params_small"
B, S, N, BINS = 2, 3, 7, 64

PLAIN = resolve(MemoryConfig(), grad=True, device="cpu")  # the plain path (no head_chunk)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_pae_ptm(logits: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The fixture README's formulas, written out in float64 numpy for one example: logits [N, N, bins]."""
    breaks = np.linspace(0.0, 31.0, logits.shape[-1] - 1)
    centres = np.append(breaks + 0.25, 31.75)
    probs = _softmax(logits)
    pae = (probs * centres).sum(-1)
    n_w = weights.sum()
    d0 = 1.24 * (max(n_w, 19.0) - 15.0) ** (1.0 / 3.0) - 1.8
    per_pair = (probs / (1.0 + (centres / d0) ** 2)).sum(-1)  # [N, N]
    per_alignment = np.array([sum(per_pair[i, j] * weights[j] / (1e-8 + n_w) for j in range(len(weights)))
                              for i in range(len(weights))])
    best = int(np.argmax(per_alignment * weights))
    return pae, float(centres[-1]), float(per_alignment[best])


def test_bin_centres_are_af2s() -> None:
    centres = aligned_error_bin_centres(64, 31.0, dtype=torch.float64)
    assert centres.shape == (64,)
    torch.testing.assert_close(centres, torch.arange(64, dtype=torch.float64) / 2 + 0.25, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_res", [7, 30])  # below and above the d0 clamp at 19 residues
def test_pae_and_ptm_match_a_numpy_evaluation(mask_factory, n_res: int) -> None:
    logits = 3.0 * torch.randn(B, n_res, n_res, BINS, dtype=torch.float64)
    mask = mask_factory(B, n_res).double()
    pae, max_pae = predicted_aligned_error(logits)
    ptm = predicted_tm_score(logits, mask)
    ptm_all = predicted_tm_score(logits)
    for b in range(B):
        ref_pae, ref_max, ref_ptm = _numpy_pae_ptm(logits[b].numpy(), mask[b].numpy())
        np.testing.assert_allclose(pae[b].numpy(), ref_pae, rtol=1e-12)
        assert float(max_pae) == ref_max == 31.75
        assert float(ptm[b]) == pytest.approx(ref_ptm, rel=1e-12)
        _, _, ref_all = _numpy_pae_ptm(logits[b].numpy(), np.ones(n_res))
        assert float(ptm_all[b]) == pytest.approx(ref_all, rel=1e-12)
    # the mask matters: residues outside it neither count as aligned points nor as frames
    assert not torch.allclose(ptm, ptm_all)


def test_ptm_ignores_padded_logits(mask_factory) -> None:
    logits = torch.randn(1, N, N, BINS, dtype=torch.float64)
    mask = mask_factory(1, N).double()
    pad = mask[0] == 0
    changed = logits.clone()
    changed[0, pad] = 50.0 * torch.randn_like(changed[0, pad])
    changed[0, :, pad] = 50.0 * torch.randn_like(changed[0, :, pad])
    torch.testing.assert_close(predicted_tm_score(changed, mask), predicted_tm_score(logits, mask))


def test_confidence_is_fp32_under_autocast() -> None:
    logits = torch.randn(1, N, N, BINS).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pae, max_pae = predicted_aligned_error(logits)
        ptm = predicted_tm_score(logits, torch.ones(1, N))
    assert pae.dtype == max_pae.dtype == ptm.dtype == torch.float32
    torch.testing.assert_close(ptm, predicted_tm_score(logits.float(), torch.ones(1, N)))


def test_head_shapes_range_and_uniform_start(tiny_cfg, mask_factory, randomize) -> None:
    cfg = model_preset("tiny", predicted_aligned_error=True)
    z, seq_mask = torch.randn(B, N, N, cfg.c_z), mask_factory(B, N)
    heads = AuxiliaryHeads(cfg=cfg)
    assert isinstance(heads.predicted_aligned_error.linear, torch.nn.Linear)
    s = torch.randn(B, N, cfg.c_s)
    out = heads(torch.randn(B, S, N, cfg.c_m), z, s_evoformer=s, s_structure=s, seq_mask=seq_mask, plan=PLAIN)
    assert out["pae_logits"].shape == (B, N, N, 64)
    assert out["predicted_aligned_error"].shape == (B, N, N)
    assert out["max_predicted_aligned_error"].shape == () and float(out["max_predicted_aligned_error"]) == 31.75
    assert out["ptm"].shape == (B,)
    # zero-initialised logits: uniform bins, so the PAE is the mean bin centre, 16 A
    torch.testing.assert_close(out["predicted_aligned_error"], torch.full((B, N, N), 16.0))
    head = randomize(PredictedAlignedErrorHead(cfg=cfg), std=1.0)
    res = head(z, seq_mask)
    assert ((res["ptm"] > 0) & (res["ptm"] <= 1)).all()
    assert ((res["predicted_aligned_error"] > 0) & (res["predicted_aligned_error"] < 31.75)).all()
    assert res["pae_logits"].requires_grad and not res["ptm"].requires_grad


def test_head_absent_unless_asked(tiny_cfg) -> None:
    heads = AuxiliaryHeads(cfg=tiny_cfg)
    assert heads.predicted_aligned_error is None
    assert not any(k.startswith("predicted_aligned_error") for k in heads.state_dict())


def test_fixture_pae_and_ptm_from_its_logits() -> None:
    """OpenFold's PAE, max PAE and pTM over real residues, reproduced from its own PAE (`tm`) logits."""
    expected = np.load(FIXTURE / "expected.npz")
    seq_mask = torch.from_numpy(np.load(FIXTURE / "inputs.npz")["seq_mask"])
    logits = torch.from_numpy(expected["tm_logits"])
    pae, max_pae = predicted_aligned_error(logits)
    np.testing.assert_allclose(pae.numpy(), expected["predicted_aligned_error"], rtol=1e-10)
    assert float(max_pae) == float(expected["max_predicted_aligned_error"])
    # OpenFold evaluates the TM term with float32 bin constants: 3e-8 relative from float64 (fixture README)
    ptm = predicted_tm_score(logits, seq_mask)
    assert float(ptm[0]) == pytest.approx(float(expected["ptm_score_seq_mask"]), rel=1e-6)
    assert float(predicted_tm_score(logits)[0]) == pytest.approx(float(expected["ptm_score"]), rel=1e-6)
