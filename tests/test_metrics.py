"""Metrics: analytic values on hand-built coordinates, invariance on a real structure (6mrr), masks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from protfold import metrics
from protfold.io.structure import parse_structure

PDB = Path(__file__).resolve().parents[1] / "data" / "samples" / "pdb" / "6mrr.pdb"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ca() -> torch.Tensor:
    """Ca coordinates of 6mrr chain A, float64 [N, 3]."""
    chain = parse_structure(PDB)[0]
    assert chain.atom_mask[:, 1].all()
    return torch.tensor(chain.atom_positions[:, 1], dtype=torch.float64)


def random_transform(x: torch.Tensor) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(3, 3, dtype=x.dtype))[0]
    q = q * torch.sign(torch.linalg.det(q))  # proper rotation
    return x @ q.T + 10.0 * torch.randn(3, dtype=x.dtype)


def test_lddt_identity_and_invariance(ca: torch.Tensor) -> None:
    mask = (torch.rand(ca.shape[0]) > 0.2).double()
    pred = ca + 0.7 * torch.randn_like(ca)
    assert metrics.lddt(ca, ca, mask, per_residue=False).item() == pytest.approx(1.0)
    per_res = metrics.lddt(ca, ca, mask)
    torch.testing.assert_close(per_res, mask)
    base = metrics.lddt(pred, ca, mask)
    moved = metrics.lddt(random_transform(pred), random_transform(ca), mask)
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=0)
    assert 0.0 < metrics.lddt(pred, ca, mask, per_residue=False) < 1.0


def test_lddt_hand_built_perturbation() -> None:
    # Residues on a line 3.8 A apart; residue 3 moved 1.5 A along the line: its 3 pair distances change by
    # 1.5 A, which passes the 2 and 4 A thresholds only (score 0.5); other pairs keep score 1.
    true = torch.tensor([[0.0, 0, 0], [3.8, 0, 0], [7.6, 0, 0], [11.4, 0, 0], [5.0, 5.0, 0]])
    pred = true.clone()
    pred[3, 0] += 1.5
    pred[4] = torch.tensor([90.0, -40.0, 7.0])  # unobserved residue: must not count
    mask = torch.tensor([1.0, 1, 1, 1, 0])
    per_res = metrics.lddt(pred, true, mask)
    torch.testing.assert_close(per_res, torch.tensor([2.5 / 3, 2.5 / 3, 2.5 / 3, 0.5, 0.0]))
    assert metrics.lddt(pred, true, mask, per_residue=False).item() == pytest.approx((6 * 1.0 + 6 * 0.5) / 12)
    # the 15 A inclusion radius: residues 0 and 2 are 17.8 A apart in the truth, so that pair is not scored;
    # residue 2 moved 3 A changes the scored pair (1, 2) by 3 A: only the 4 A threshold passes (0.25)
    far_true = torch.tensor([[0.0, 0, 0], [3.8, 0, 0], [17.8, 0, 0]])
    far_pred = far_true.clone()
    far_pred[2, 0] += 3.0
    torch.testing.assert_close(metrics.lddt(far_pred, far_true, torch.ones(3)), torch.tensor([1.0, 0.625, 0.25]))


def test_lddt_ca_from_atom37(ca: torch.Tensor) -> None:
    atoms = torch.zeros(2, ca.shape[0], 37, 3, dtype=torch.float64)
    atoms[:, :, 1] = ca
    mask = torch.zeros(2, ca.shape[0], 37, dtype=torch.float64)
    mask[:, :, 1] = 1.0
    torch.testing.assert_close(metrics.lddt_ca(atoms, atoms, mask, per_residue=False),
                               torch.ones(2, dtype=torch.float64))


def test_rmsd_rotated_copy_is_zero_and_reflection_is_not(ca: torch.Tensor) -> None:
    mask = (torch.rand(ca.shape[0]) > 0.2).double()
    assert metrics.rmsd(random_transform(ca), ca, mask).item() == pytest.approx(0.0, abs=1e-6)
    mirrored = ca * torch.tensor([-1.0, 1.0, 1.0], dtype=ca.dtype)
    assert metrics.rmsd(mirrored, ca, mask).item() > 1.0  # a proper rotation cannot undo a mirror image
    rot, _ = metrics.kabsch(mirrored, ca, mask)
    assert torch.linalg.det(rot).item() == pytest.approx(1.0)


def test_rmsd_hand_built_scaled_tetrahedron() -> None:
    # By symmetry the optimal superposition of a scaled regular tetrahedron onto the original is the
    # identity, so RMSD = |s - 1| * circumradius (sqrt(3) here).
    true = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    pred = random_transform(1.5 * true)
    assert metrics.rmsd(pred, true, torch.ones(4, dtype=torch.float64)).item() == pytest.approx(0.5 * math.sqrt(3))


def test_gdt_and_tm_identical_and_invariant(ca: torch.Tensor) -> None:
    mask = (torch.rand(ca.shape[0]) > 0.2).double()
    assert metrics.gdt_ts(random_transform(ca), ca, mask).item() == pytest.approx(1.0)
    assert metrics.tm_score(ca, ca, mask).item() == pytest.approx(1.0)
    assert metrics.tm_score(random_transform(ca), ca, mask).item() == pytest.approx(1.0)
    pred = ca + 1.5 * torch.randn_like(ca)
    for fn in (metrics.gdt_ts, metrics.tm_score):
        base = fn(pred, ca, mask)
        assert fn(random_transform(pred), random_transform(ca), mask).item() == pytest.approx(base.item(), abs=1e-5)
        assert 0.0 < base.item() < 1.0


def test_gdt_hand_built_perturbation(ca: torch.Tensor) -> None:
    # 21 residues: 16 exact, 2 moved 0.6 A (within every cutoff under the identity fit), 3 moved 40 A (beyond
    # 8 A under any fit that keeps the rest within 8 A). Every cutoff then scores 18/21, so GDT-TS = 18/21.
    true = ca[:21]
    pred = true.clone()
    centre = true.mean(0)
    for i, shift in ((3, 0.6), (11, 0.6), (5, 40.0), (9, 40.0), (17, 40.0)):
        radial = (true[i] - centre) / torch.linalg.vector_norm(true[i] - centre)
        pred[i] = true[i] + shift * radial
    unobserved = torch.cat([pred, torch.full((2, 3), 55.0, dtype=pred.dtype)])
    target = torch.cat([true, torch.zeros(2, 3, dtype=true.dtype)])
    mask = torch.cat([torch.ones(21), torch.zeros(2)]).double()
    assert metrics.gdt_ts(unobserved, target, mask).item() == pytest.approx(18 / 21)
    # TM-score of the same perturbation, with the identity fit: (16 + 2/(1+(0.6/d0)^2) + 3 small terms) / 21
    d0 = metrics.tm_d0(21.0).item()
    assert d0 == pytest.approx(max(1.24 * 6 ** (1 / 3) - 1.8, 0.5))
    expected = (16 + 2 / (1 + (0.6 / d0) ** 2) + 3 / (1 + (40.0 / d0) ** 2)) / 21
    assert metrics.tm_score(unobserved, target, mask).item() == pytest.approx(expected, abs=1e-3)


def test_batched_shapes(ca: torch.Tensor) -> None:
    pred = torch.stack([ca[:9], ca[:9] + 0.5])
    true = torch.stack([ca[:9], ca[:9]])
    mask = (torch.rand(2, 9) > 0.2).double()
    for fn in (metrics.rmsd, metrics.gdt_ts, metrics.tm_score):
        assert fn(pred, true, mask).shape == (2,)
    assert metrics.lddt(pred, true, mask).shape == (2, 9)


def test_plddt_from_logits() -> None:
    logits = torch.full((2, 7, 50), -1e4)
    logits[..., 10] = 0.0
    torch.testing.assert_close(metrics.plddt_from_logits(logits), torch.full((2, 7), 21.0))
    uniform = metrics.plddt_from_logits(torch.zeros(7, 50))
    torch.testing.assert_close(uniform, torch.full((7,), 50.0))
