"""Losses: analytic zeros, invariance on real coordinates (6mrr), renaming, clamping, violations, the total."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from protfold import constants as rc
from protfold import losses, violations
from protfold.config import LossConfig
from protfold.geometry import Rigid, atom14_to_atom37, atom37_to_atom14, frames_to_atom14, torsion_angles_to_frames
from protfold.io.structure import parse_structure

PDB = Path(__file__).resolve().parents[1] / "data" / "samples" / "pdb" / "6mrr.pdb"
N_RES = 17  # odd; 6mrr's first 17 residues include GLU (pi-periodic chi3) and PHE (pi-periodic chi2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def chain():
    return parse_structure(PDB)[0]


def random_rotation(dtype=torch.float32) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    return (q * torch.sign(torch.linalg.det(q))).to(dtype)


def backbone_frames(atom37: torch.Tensor) -> Rigid:
    return Rigid.from_3_points(atom37[..., 0, :], atom37[..., 1, :], atom37[..., 2, :])


def synthetic_batch(chain, n: int = N_RES, batch: int = 2) -> dict[str, torch.Tensor]:
    """Real 6mrr backbone frames with side chains built from random torsions (self-consistent ground truth)."""
    aatype = torch.as_tensor(chain.aatype[:n]).expand(batch, n).clone()
    pos37 = torch.as_tensor(chain.atom_positions[:n]).expand(batch, n, 37, 3)
    backbone = backbone_frames(pos37)
    theta = 2 * math.pi * torch.rand(batch, n, 7)
    angles = torch.stack([torch.sin(theta), torch.cos(theta)], dim=-1)
    periodic = torch.as_tensor(rc.chi_pi_periodic)[aatype]
    alt_angles = angles.clone()
    alt_angles[..., 3:, :] = angles[..., 3:, :] * (1 - 2 * periodic)[..., None]
    groups = torsion_angles_to_frames(backbone, angles, aatype)
    alt_groups = torsion_angles_to_frames(backbone, alt_angles, aatype)
    atom14 = frames_to_atom14(groups, aatype)
    swap = torch.as_tensor(rc.restype_atom14_swap_index)[aatype]
    alt14 = torch.gather(atom14, 2, swap[..., None].expand(-1, -1, -1, 3))
    seq_mask = (torch.rand(batch, n) > 0.15).float()
    exists14 = torch.as_tensor(rc.restype_atom14_mask)[aatype]
    group_exists = torch.as_tensor(rc.restype_rigid_group_mask)[aatype]
    chi_mask = torch.as_tensor(rc.chi_angles_mask)[aatype] * seq_mask[..., None]
    atom37 = atom14_to_atom37(atom14, aatype)
    exists37 = torch.as_tensor(rc.restype_atom37_mask)[aatype]
    n_seq = 3
    return {
        "aatype": aatype, "seq_mask": seq_mask, "residue_index": torch.arange(n).expand(batch, n),
        "all_atom_positions": atom37, "all_atom_mask": exists37 * seq_mask[..., None],
        "atom14_gt_positions": atom14, "atom14_gt_exists": exists14 * seq_mask[..., None],
        "atom14_alt_gt_positions": alt14, "atom14_alt_gt_exists": exists14 * seq_mask[..., None],
        "atom14_atom_exists": exists14,
        "atom14_atom_is_ambiguous": torch.as_tensor(rc.restype_atom14_is_ambiguous)[aatype],
        "atom37_atom_exists": exists37,
        "residx_atom14_to_atom37": torch.as_tensor(rc.restype_atom14_to_atom37)[aatype],
        "backbone_rigid_tensor": backbone.to_tensor_4x4(), "backbone_rigid_mask": seq_mask,
        "rigidgroups_gt_frames": groups.to_tensor_4x4(), "rigidgroups_alt_gt_frames": alt_groups.to_tensor_4x4(),
        "rigidgroups_gt_exists": group_exists * seq_mask[..., None], "rigidgroups_group_exists": group_exists,
        "rigidgroups_group_is_ambiguous": torch.zeros_like(group_exists),
        "torsion_angles_sin_cos": angles, "alt_torsion_angles_sin_cos": alt_angles,
        "torsion_angles_mask": torch.cat([torch.ones(batch, n, 3), chi_mask], -1) * seq_mask[..., None],
        "chi_angles_sin_cos": angles[..., 3:, :], "chi_mask": chi_mask,
        "pseudo_beta": atom37[..., 3, :], "pseudo_beta_mask": seq_mask,
        "true_msa": torch.randint(0, 23, (batch, n_seq, n)), "bert_mask": (torch.rand(batch, n_seq, n) > 0.5).float(),
        "resolution": torch.tensor([1.5, 4.0])[:batch],
    }


def perfect_outputs(batch: dict, layers: int = 2) -> dict[str, torch.Tensor]:
    b, n = batch["aatype"].shape
    stack = lambda t: t.expand(layers, *t.shape).clone()  # noqa: E731
    return {
        "frames": stack(batch["backbone_rigid_tensor"]), "sidechain_frames": batch["rigidgroups_gt_frames"],
        "angles": stack(batch["torsion_angles_sin_cos"]), "unnormalized_angles": stack(batch["torsion_angles_sin_cos"]),
        "positions": stack(batch["atom14_gt_positions"]), "final_atom14": batch["atom14_gt_positions"],
        "final_atom37": batch["all_atom_positions"], "distogram_logits": torch.randn(b, n, n, 64),
        "masked_msa_logits": torch.randn(b, 3, n, 23), "plddt_logits": torch.randn(b, n, 50),
        "experimentally_resolved_logits": torch.randn(b, n, 37), "pae_logits": torch.randn(b, n, n, 64),
    }


def test_fape_invariant_under_global_transforms_real_coordinates(chain) -> None:
    true37 = torch.as_tensor(chain.atom_positions)
    mask37 = torch.as_tensor(chain.atom_mask)
    pred37 = true37 + 1.5 * torch.randn_like(true37)
    frames_mask = mask37[:, :3].prod(-1) * (torch.rand(len(chain)) > 0.2).float()

    def value(p37: torch.Tensor, t37: torch.Tensor) -> torch.Tensor:
        return losses.fape(backbone_frames(p37), backbone_frames(t37), frames_mask, p37.reshape(-1, 3),
                           t37.reshape(-1, 3), mask37.reshape(-1), length_scale=10.0, clamp=10.0)

    base = value(pred37, true37)
    assert 0.05 < base.item() < 1.0
    r1, r2 = random_rotation(), random_rotation()
    moved = value(pred37 @ r1.T + torch.tensor([5.0, -20.0, 3.0]), true37 @ r2.T + torch.tensor([-7.0, 1.0, 30.0]))
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=0)


def test_fape_of_identical_structures(chain) -> None:
    true37 = torch.as_tensor(chain.atom_positions, dtype=torch.float64)
    frames, mask = backbone_frames(true37), torch.ones(len(chain), dtype=torch.float64)
    pos, pos_mask = true37.reshape(-1, 3), torch.as_tensor(chain.atom_mask, dtype=torch.float64).reshape(-1)
    exact = losses.fape(frames, frames, mask, pos, pos, pos_mask, length_scale=10.0, clamp=10.0, eps=0.0)
    assert exact.item() == pytest.approx(0.0, abs=1e-10)
    with_eps = losses.fape(frames, frames, mask, pos, pos, pos_mask, length_scale=10.0, clamp=10.0, eps=1e-4)
    assert with_eps.item() == pytest.approx(math.sqrt(1e-4) / 10.0, rel=1e-5)  # the eps floor, nothing else


def test_backbone_fape_clamping_per_example_and_layer_mean(chain) -> None:
    batch = synthetic_batch(chain)
    true = batch["backbone_rigid_tensor"]
    far = Rigid.from_tensor_4x4(true)
    far = Rigid(far.rot, far.trans * 3.0).to_tensor_4x4()  # errors well beyond the 10 A clamp
    mask = batch["backbone_rigid_mask"]
    clamped = losses.backbone_fape_loss(far[None], true, mask, use_clamped=True)
    unclamped = losses.backbone_fape_loss(far[None], true, mask, use_clamped=False)
    assert (clamped <= 1.0 + 1e-6).all() and (unclamped > clamped).all()
    mixed = losses.backbone_fape_loss(far[None], true, mask, use_clamped=torch.tensor([True, False]))
    torch.testing.assert_close(mixed, torch.stack([clamped[0], unclamped[1]]))
    two_layers = losses.backbone_fape_loss(torch.stack([true, far]), true, mask, use_clamped=False)
    perfect = losses.backbone_fape_loss(true[None], true, mask, use_clamped=False)
    torch.testing.assert_close(two_layers, 0.5 * (perfect + unclamped))


def test_sidechain_fape_renaming_makes_the_symmetric_answer_free(chain) -> None:
    batch = synthetic_batch(chain)
    ambiguous = (batch["atom14_atom_is_ambiguous"].sum(-1) > 0) & (batch["seq_mask"] > 0)
    assert ambiguous.any()

    def loss(pred14: torch.Tensor, pred_frames: torch.Tensor) -> torch.Tensor:
        alt, renamed, renamed_exists = losses.renamed_ground_truth(
            pred14, batch["atom14_gt_positions"], batch["atom14_alt_gt_positions"], batch["atom14_gt_exists"],
            batch["atom14_alt_gt_exists"], batch["atom14_atom_is_ambiguous"])
        return losses.sidechain_fape_loss(pred_frames, pred14, batch["rigidgroups_gt_frames"],
                                          batch["rigidgroups_alt_gt_frames"], batch["rigidgroups_gt_exists"], alt,
                                          renamed, renamed_exists), alt

    floor = math.sqrt(1e-4) / 10.0
    value, alt = loss(batch["atom14_gt_positions"], batch["rigidgroups_gt_frames"])
    torch.testing.assert_close(value, torch.full_like(value, floor), atol=2e-5, rtol=0)
    assert alt.sum() == 0
    # predicting the other naming of the symmetric atoms (and the pi-rotated frames) costs nothing either
    value, alt = loss(batch["atom14_alt_gt_positions"], batch["rigidgroups_alt_gt_frames"])
    torch.testing.assert_close(value, torch.full_like(value, floor), atol=2e-5, rtol=0)
    assert (alt[ambiguous] == 1).all()
    noisy, _ = loss(batch["atom14_gt_positions"] + torch.randn_like(batch["atom14_gt_positions"]),
                    batch["rigidgroups_gt_frames"])
    assert (noisy > 10 * floor).all()


def test_torsion_loss_zero_for_true_and_pi_periodic_alternative(chain) -> None:
    batch = synthetic_batch(chain)
    true = batch["torsion_angles_sin_cos"][None]
    args = (batch["aatype"], batch["chi_angles_sin_cos"], batch["chi_mask"], batch["seq_mask"])
    zero = losses.torsion_angle_loss(true, true, *args)
    torch.testing.assert_close(zero, torch.zeros(2), atol=1e-6, rtol=0)
    alt = batch["alt_torsion_angles_sin_cos"][None]
    torch.testing.assert_close(losses.torsion_angle_loss(alt, alt, *args), torch.zeros(2), atol=1e-6, rtol=0)
    # flipping every chi by pi is free only for pi-periodic chis
    flipped = true.clone()
    flipped[..., 3:, :] = -flipped[..., 3:, :]
    assert (losses.torsion_angle_loss(flipped, flipped, *args) > 0.1).all()
    # the angle-norm term: unnormalised vectors of length 2 cost angle_norm_weight * |2 - 1|
    torch.testing.assert_close(losses.torsion_angle_loss(true, 2.0 * true, *args), torch.full((2,), 0.01),
                               atol=1e-6, rtol=0)


def test_distogram_loss_decreases_for_the_correct_bin(chain) -> None:
    batch = synthetic_batch(chain)
    cb, mask = batch["pseudo_beta"], batch["pseudo_beta_mask"]
    zero = losses.distogram_loss(torch.zeros(2, N_RES, N_RES, 64), cb, mask)
    torch.testing.assert_close(zero, torch.full((2,), math.log(64)))
    edges = torch.linspace(2.3125, 21.6875, 63)
    dist = torch.cdist(cb, cb)
    target = torch.sum(dist[..., None] > edges, dim=-1)
    previous = zero
    for boost in (1.0, 3.0, 10.0):
        logits = boost * torch.nn.functional.one_hot(target, 64).float()
        value = losses.distogram_loss(logits, cb, mask)
        assert (value < previous).all()
        previous = value
    wrong = 10.0 * torch.nn.functional.one_hot((target + 5) % 64, 64).float()
    assert (losses.distogram_loss(wrong, cb, mask) > zero).all()


def test_msa_plddt_and_resolved_losses(chain) -> None:
    batch = synthetic_batch(chain)
    torch.testing.assert_close(losses.masked_msa_loss(torch.zeros(2, 3, N_RES, 23), batch["true_msa"],
                                                      batch["bert_mask"]), torch.full((2,), math.log(23)))
    args = (batch["all_atom_positions"], batch["all_atom_positions"], batch["all_atom_mask"], batch["resolution"])
    uniform = losses.plddt_loss(torch.zeros(2, N_RES, 50), *args)
    # example 0 (1.5 A) is supervised, example 1 (4.0 A) is outside [0.1, 3.0] A and gives 0
    torch.testing.assert_close(uniform, torch.tensor([math.log(50), 0.0]))
    confident = torch.zeros(2, N_RES, 50)
    confident[..., 49] = 20.0  # lDDT of a perfect prediction is 1, i.e. the last bin
    assert losses.plddt_loss(confident, *args)[0] < 1e-6
    resolved = losses.experimentally_resolved_loss(torch.zeros(2, N_RES, 37), batch["atom37_atom_exists"],
                                                   batch["all_atom_mask"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(resolved, torch.full((2,), math.log(2.0)))


def _two_frames(shift: float) -> torch.Tensor:
    """Two identity-rotation frames 4 A apart on x, the second moved by `shift` A along y: [1, 2, 4, 4]."""
    frames = torch.eye(4).repeat(1, 2, 1, 1)
    frames[0, 1, 0, 3] = 4.0
    frames[0, 1, 1, 3] = shift
    return frames


def test_pae_loss_by_hand() -> None:
    """Residue 2 (frame and Ca) moved by 1.2 A: the aligned error is 1.2 A for (1, 2) and (2, 1), 0 on the
    diagonal. Squared breaks 0, 0.25, 1, 2.25, ...: 1.44 falls in bin 3, 0 in bin 0. Logits 2 at bin 3 and 0
    elsewhere give CE log(63 + e^2) - 2 off the diagonal and log(63 + e^2) on it."""
    true, pred, mask = _two_frames(0.0), _two_frames(1.2), torch.ones(1, 2)
    logits = torch.zeros(1, 2, 2, 64)
    logits[..., 3] = 2.0
    expected = math.log(63 + math.exp(2.0)) - 1.0  # mean of two pairs at -2 and two at 0
    loss = losses.predicted_aligned_error_loss(logits, pred, true, mask, torch.tensor([1.5]))
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, rel=1e-6)
    # residue 2 masked: only pair (1, 1) counts, true bin 0
    only_first = losses.predicted_aligned_error_loss(logits, pred, true, torch.tensor([[1.0, 0.0]]), None)
    assert only_first.item() == pytest.approx(math.log(63 + math.exp(2.0)), rel=1e-6)
    # resolution outside [0.1, 3.0] A: no loss; uniform logits: log(64) whatever the error
    assert losses.predicted_aligned_error_loss(logits, pred, true, mask, torch.tensor([4.0])).item() == 0.0
    uniform = losses.predicted_aligned_error_loss(torch.zeros(1, 2, 2, 64), pred, true, mask, None)
    assert uniform.item() == pytest.approx(math.log(64), rel=1e-6)


def test_pae_loss_near_zero_for_a_perfect_prediction_and_invariant(chain) -> None:
    batch = synthetic_batch(chain)
    true, mask = batch["backbone_rigid_tensor"], batch["backbone_rigid_mask"]
    pred = backbone_frames(batch["all_atom_positions"] + 0.7 * torch.randn(2, N_RES, 37, 3)).to_tensor_4x4()
    # the true bins of this prediction: the aligned error of every point j in every frame i, binned by hand
    local = lambda f: Rigid.from_tensor_4x4(f)[..., None].invert_apply(f[..., None, :, :3, 3])  # noqa: E731
    error2 = ((local(pred) - local(true)) ** 2).sum(-1)
    bins = (error2[..., None] > torch.linspace(0, 31, 63) ** 2).sum(-1)
    assert bins.max() > 0 and bins.min() == 0
    confident = 30.0 * torch.nn.functional.one_hot(bins, 64).float()
    perfect = losses.predicted_aligned_error_loss(confident, pred, true, mask, None)
    assert (perfect < 1e-10).all()
    wrong = 30.0 * torch.nn.functional.one_hot((bins + 7) % 64, 64).float()
    assert (losses.predicted_aligned_error_loss(wrong, pred, true, mask, None) > 20).all()
    # a global rotation and translation of the prediction changes no aligned error
    rot, shift = random_rotation(), 10.0 * torch.randn(3)
    moved = pred.clone()
    moved[..., :3, :3] = rot @ pred[..., :3, :3]
    moved[..., :3, 3] = pred[..., :3, 3] @ rot.T + shift
    logits = torch.randn(2, N_RES, N_RES, 64, requires_grad=True)
    frames = pred.clone().requires_grad_(True)
    loss = losses.predicted_aligned_error_loss(logits, frames, true, mask, batch["resolution"])
    torch.testing.assert_close(losses.predicted_aligned_error_loss(logits, moved, true, mask, batch["resolution"]),
                               loss, rtol=1e-5, atol=1e-6)
    assert loss[1] == 0  # example 1 is at 4.0 A
    loss.sum().backward()
    assert logits.grad.abs().sum() > 0 and frames.grad is None  # AF2 stops the gradient to the frames


def test_violations_zero_on_real_structure_and_positive_when_broken(chain) -> None:
    aatype = torch.as_tensor(chain.aatype)[None]
    pos14 = atom37_to_atom14(torch.as_tensor(chain.atom_positions)[None], aatype)
    exists = atom37_to_atom14(torch.as_tensor(chain.atom_mask)[None], aatype)
    index = torch.as_tensor(chain.residue_index)[None]
    assert violations.violation_loss(pos14, exists, index, aatype).item() == pytest.approx(0.0, abs=1e-6)
    stretched = pos14.clone()
    stretched[:, 11:] += torch.tensor([1.0, 0.0, 0.0])  # peptide bond 10-11 about 1 A too long
    bonds = violations.between_residue_bond_loss(stretched, exists, index, aatype)
    assert bonds["c_n_loss"].item() > 0 and bonds["per_residue_violation"][0, 10:12].eq(1).all()
    clashing = pos14.clone()
    clashing[:, 30] = clashing[:, 5] + 0.3 * torch.randn(14, 3)  # residue 30 dropped onto residue 5
    inter = violations.between_residue_clash_loss(clashing, exists, index, aatype)
    assert inter["mean_loss"].item() > 0 and inter["per_atom_clash"][0, 30].any()
    curled = pos14.clone()
    lys = int((aatype[0] == rc.restype_order["K"]).nonzero()[0])
    curled[0, lys, 8] = curled[0, lys, 0] + 0.5  # LYS NZ next to its own N
    intra = violations.within_residue_clash_loss(curled, exists, aatype)
    assert intra["per_atom_violation"][0, lys, 8] == 1 and intra["per_atom_loss_sum"][0, lys].sum() > 0
    assert violations.violation_loss(curled, exists, index, aatype).item() > 0


def test_alphafold_loss_perfect_prediction_and_gradients(chain) -> None:
    batch = synthetic_batch(chain)
    cfg = LossConfig(violation=1.0, experimentally_resolved=0.01, pae=0.1)
    clamp_flags = torch.tensor([True, False])
    total, terms = losses.alphafold_loss(perfect_outputs(batch), batch, cfg, use_clamped_fape=clamp_flags)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    assert set(terms) == {"fape_backbone", "fape_sidechain", "torsion", "distogram", "masked_msa", "plddt",
                          "experimentally_resolved", "violation", "pae"}
    for key in ("fape_backbone", "fape_sidechain"):
        assert terms[key].item() < 2e-3  # the sqrt(eps) / length_scale floor
    assert terms["torsion"].item() < 1e-6
    # random outputs: every term finite and differentiable
    outputs = {k: (v + 0.5 * torch.randn_like(v)).requires_grad_(True) for k, v in perfect_outputs(batch).items()}
    total, terms = losses.alphafold_loss(outputs, batch, cfg, use_clamped_fape=True)
    total.backward()
    assert total.item() > 0 and all(v.item() > 0 for v in terms.values())
    for key in ("frames", "final_atom14", "angles", "distogram_logits", "plddt_logits", "masked_msa_logits",
                "pae_logits"):
        assert outputs[key].grad is not None and torch.isfinite(outputs[key].grad).all(), key
    # the sqrt(min(N_res, crop)) scale: each example weighted by sqrt of its residues in the crop
    unscaled, _ = losses.alphafold_loss(outputs, batch, LossConfig(scale_by_sqrt_length=False, violation=1.0,
                                        experimentally_resolved=0.01, pae=0.1), use_clamped_fape=True)
    assert total.item() > unscaled.item()


# --- chunked loss paths (exact: only the order of the final masked sums changes) ---------------------------


def _random_frames(*shape: int) -> Rigid:
    from protfold.geometry import quaternion_to_rotation

    return Rigid(quaternion_to_rotation(torch.randn(*shape, 4)), 5.0 * torch.randn(*shape, 3))


@pytest.mark.parametrize("clamp", [None, 10.0])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_fape_frame_chunks_equal_plain_values_and_gradients(clamp, chunk) -> None:
    b, f, a = 2, 11, 13
    rot, trans = _random_frames(b, f).rot.requires_grad_(), (5.0 * torch.randn(b, f, 3)).requires_grad_()
    pos = (8.0 * torch.randn(b, a, 3)).requires_grad_()
    true_frames, true_pos = _random_frames(b, f), 8.0 * torch.randn(b, a, 3)
    f_mask, p_mask = (torch.rand(b, f) > 0.2).float(), (torch.rand(b, a) > 0.2).float()
    flag = torch.tensor([True, False])

    def run(frame_chunk):
        value = losses.fape(Rigid(rot, trans), true_frames, f_mask, pos, true_pos, p_mask, length_scale=10.0,
                            clamp=clamp, use_clamped=flag, frame_chunk=frame_chunk)
        return value, torch.autograd.grad(value.sum(), [rot, trans, pos])

    ref, ref_grads = run(None)
    got, got_grads = run(chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_renamed_ground_truth_residue_chunks_equal_plain(chain) -> None:
    batch = synthetic_batch(chain)
    pred = batch["atom14_gt_positions"] + 0.5 * torch.randn_like(batch["atom14_gt_positions"])
    args = (pred, batch["atom14_gt_positions"], batch["atom14_alt_gt_positions"], batch["atom14_gt_exists"],
            batch["atom14_alt_gt_exists"], batch["atom14_atom_is_ambiguous"])
    ref = losses.renamed_ground_truth(*args)
    for chunk in (1, 4, N_RES):
        for got, want in zip(losses.renamed_ground_truth(*args, residue_chunk=chunk), ref):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sidechain_fape_chunked_in_alphafold_loss_equals_plain(chain, monkeypatch) -> None:
    """alphafold_loss chunks the side-chain FAPE by a byte budget: with a tiny budget (many chunks) the total
    and its gradients equal the unchunked loss (huge budget)."""
    batch = synthetic_batch(chain)
    outputs = perfect_outputs(batch)
    outputs["final_atom14"] = (outputs["final_atom14"] + 0.7 * torch.randn_like(outputs["final_atom14"])
                               ).requires_grad_()
    outputs["sidechain_frames"] = outputs["sidechain_frames"].clone().requires_grad_()
    results = []
    for budget in (2**40, 3 * 4 * 14 * N_RES * 2 * 5):  # one chunk; 5 frames per chunk
        monkeypatch.setattr(losses, "_FAPE_CHUNK_BYTES", budget)
        total, _ = losses.alphafold_loss(outputs, batch, LossConfig(), use_clamped_fape=True)
        grads = torch.autograd.grad(total, [outputs["final_atom14"], outputs["sidechain_frames"]])
        results.append((total, grads))
    assert losses.fape_frame_chunk(14 * N_RES, 2) == 5
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for g, r in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
