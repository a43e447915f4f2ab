"""Crops, padding, collate and the whole make_example on real chains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protfold import constants as rc
from protfold.config import DataConfig
from protfold.data import crop as C
from protfold.data.pipeline import make_example

_CA = rc.atom_order["CA"]

EXPECTED = {  # key -> (shape with N=n, S=s, E=e symbols, dtype)
    "aatype": (("N",), torch.int64), "residue_index": (("N",), torch.int64), "seq_mask": (("N",), None),
    "target_feat": (("N", 22), None), "msa_feat": (("S", "N", 49), None), "msa_mask": (("S", "N"), None),
    "true_msa": (("S", "N"), torch.int64), "bert_mask": (("S", "N"), None),
    "extra_msa_feat": (("E", "N", 25), None), "extra_msa_mask": (("E", "N"), None),
    "all_atom_positions": (("N", 37, 3), None), "all_atom_mask": (("N", 37), None),
    "atom14_gt_positions": (("N", 14, 3), None), "atom14_gt_exists": (("N", 14), None),
    "atom14_alt_gt_positions": (("N", 14, 3), None), "atom14_alt_gt_exists": (("N", 14), None),
    "atom14_atom_exists": (("N", 14), None), "atom14_atom_is_ambiguous": (("N", 14), None),
    "atom37_atom_exists": (("N", 37), None), "residx_atom14_to_atom37": (("N", 14), torch.int64),
    "backbone_rigid_tensor": (("N", 4, 4), None), "backbone_rigid_mask": (("N",), None),
    "rigidgroups_gt_frames": (("N", 8, 4, 4), None), "rigidgroups_alt_gt_frames": (("N", 8, 4, 4), None),
    "rigidgroups_gt_exists": (("N", 8), None), "rigidgroups_group_exists": (("N", 8), None),
    "rigidgroups_group_is_ambiguous": (("N", 8), None), "torsion_angles_sin_cos": (("N", 7, 2), None),
    "alt_torsion_angles_sin_cos": (("N", 7, 2), None), "torsion_angles_mask": (("N", 7), None),
    "chi_angles_sin_cos": (("N", 4, 2), None), "chi_mask": (("N", 4), None), "pseudo_beta": (("N", 3), None),
    "pseudo_beta_mask": (("N",), None), "resolution": ((), None),
}
MASK_KEYS = [k for k in EXPECTED if k.endswith(("mask", "exists")) and k not in ("rigidgroups_group_exists",)]


def _check_shapes(example: dict, n: int, s: int, e: int, batch: tuple[int, ...] = ()) -> None:
    sizes = {"N": n, "S": s, "E": e}
    assert set(example) == set(EXPECTED) | {"id"}
    for key, (shape, dtype) in EXPECTED.items():
        want = batch + tuple(sizes.get(d, d) for d in shape)
        assert tuple(example[key].shape) == want, key
        assert example[key].dtype == (dtype or torch.float32), key


def test_contiguous_crop_inside_chain_with_requested_size():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        idx = C.contiguous_crop(100, 37, rng)
        assert len(idx) == 37 and idx[0] >= 0 and idx[-1] < 100 and (np.diff(idx) == 1).all()
    starts = {C.contiguous_crop(100, 37, np.random.default_rng(s))[0] for s in range(30)}
    assert len(starts) > 10
    np.testing.assert_array_equal(C.contiguous_crop(20, 37, np.random.default_rng(0)), np.arange(20))


def test_spatial_crop_takes_the_nearest_residues(structures):
    s = structures["6ehb"]
    ca, ca_mask = s["all_atom_positions"][:, _CA], s["all_atom_mask"][:, _CA]
    centres = set()
    for seed in range(10):
        idx = C.spatial_crop(ca, ca_mask, 64, np.random.default_rng(seed))
        assert len(idx) == 64 and len(set(idx.tolist())) == 64
        assert (np.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < len(ca)
        assert (ca_mask[idx] > 0).all()
        # some residue of the crop is its centre: every residue inside is nearer to it than any outside
        outside = np.setdiff1d(np.flatnonzero(ca_mask > 0), idx)
        d_in = np.linalg.norm(ca[idx][:, None] - ca[idx][None], axis=-1).max(1)  # [64] radius per candidate
        d_out = np.linalg.norm(ca[idx][:, None] - ca[outside][None], axis=-1).min(1)
        ok = np.flatnonzero(d_in <= d_out + 1e-4)
        assert ok.size >= 1
        centres.add(int(idx[ok[0]]))
    assert len(centres) > 3


def test_eval_crop_is_deterministic_and_prefers_observed_residues():
    mask = np.ones(50)
    mask[:10] = 0
    np.testing.assert_array_equal(C.eval_crop(mask, 30), np.arange(10, 40))
    np.testing.assert_array_equal(C.eval_crop(mask, 60), np.arange(50))


def test_mixed_mode_uses_both_crops(raw_6ehb):
    cfg = DataConfig(crop_size=40, crop_mode="mixed", spatial_crop_prob=0.5)
    kinds = set()
    for seed in range(20):
        idx = C.select_crop(raw_6ehb, cfg, np.random.default_rng(seed), train=True)
        assert len(idx) == 40
        kinds.add(bool((np.diff(idx) == 1).all()))
    assert kinds == {True, False}


def test_make_example_keys_shapes_and_padding(raw_6mrr):
    cfg = DataConfig(crop_size=80, max_msa_clusters=16, max_extra_msa=20)
    ex = make_example(raw_6mrr, cfg, seed=0, train=True)
    n = len(raw_6mrr["aatype"])
    assert n < 80
    _check_shapes(ex, 80, 16, 20)
    assert ex["id"] == raw_6mrr["id"]
    assert ex["seq_mask"][:n].all() and not ex["seq_mask"][n:].any()
    for key in MASK_KEYS:
        assert ex[key][n:].abs().sum() == 0, key
        assert key in ("extra_msa_mask", "msa_mask", "bert_mask") or ex[key][:n].sum() > 0, key
    assert ex["msa_mask"][:, n:].sum() == 0 and ex["extra_msa_mask"][:, n:].sum() == 0
    assert ex["msa_feat"][:, n:].abs().sum() == 0 and ex["target_feat"][n:].abs().sum() == 0
    eye = torch.eye(4).expand(80 - n, 8, 4, 4)
    torch.testing.assert_close(ex["rigidgroups_gt_frames"][n:], eye)
    torch.testing.assert_close(ex["backbone_rigid_tensor"][n:], eye[:, 0])
    assert ex["resolution"] == pytest.approx(1.18, abs=1e-4)


def test_crop_is_applied_alike_to_every_array(raw_6ehb):
    cfg = DataConfig(crop_size=50, crop_mode="spatial", max_msa_clusters=8, max_extra_msa=16)
    ex = make_example(raw_6ehb, cfg, seed=4, train=True)
    idx = np.searchsorted(raw_6ehb["residue_index"], ex["residue_index"].numpy())
    np.testing.assert_array_equal(raw_6ehb["residue_index"][idx], ex["residue_index"].numpy())
    assert not (np.diff(idx) == 1).all()  # spatial: not one window
    np.testing.assert_array_equal(ex["aatype"].numpy(), raw_6ehb["aatype"][idx])
    np.testing.assert_array_equal(ex["true_msa"][0].numpy(), raw_6ehb["msa"][0, idx])
    np.testing.assert_allclose(ex["all_atom_positions"].numpy(), raw_6ehb["all_atom_positions"][idx] * raw_6ehb["all_atom_mask"][idx][..., None])
    rows = {tuple(r) for r in raw_6ehb["msa"][:, idx].tolist()}
    assert all(tuple(r) in rows for r in ex["true_msa"].tolist())
    # omega/phi at crop edges come from the full chain: a residue whose predecessor is outside the crop
    edge = [i for i in range(1, len(idx)) if idx[i] - 1 != idx[i - 1] and raw_6ehb["residue_index"][idx[i]] - raw_6ehb["residue_index"][idx[i] - 1] == 1]
    assert edge and ex["torsion_angles_mask"][edge, 1].sum() > 0


def test_same_seed_same_example_different_seed_different(raw_6ehb):
    cfg = DataConfig(crop_size=64, max_msa_clusters=16, max_extra_msa=32)
    a = make_example(raw_6ehb, cfg, seed=11, train=True)
    b = make_example(raw_6ehb, cfg, seed=11, train=True)
    c = make_example(raw_6ehb, cfg, seed=12, train=True)
    for key in EXPECTED:
        torch.testing.assert_close(a[key], b[key], equal_nan=True, msg=key)
    assert not torch.equal(a["residue_index"], c["residue_index"]) or not torch.equal(a["msa_feat"], c["msa_feat"])
    assert not torch.equal(a["bert_mask"], c["bert_mask"])


def test_eval_keeps_whole_chain_unpadded(raw_6mrr, raw_6ehb):
    cfg = DataConfig(crop_size=100, max_msa_clusters=16, max_extra_msa=20)
    ex = make_example(raw_6mrr, cfg, seed=0, train=False)
    _check_shapes(ex, len(raw_6mrr["aatype"]), 16, 20)
    long = make_example(raw_6ehb, cfg, seed=0, train=False)
    again = make_example(raw_6ehb, cfg, seed=99, train=False)
    assert long["aatype"].shape == (100,)
    torch.testing.assert_close(long["residue_index"], again["residue_index"])  # crop does not depend on seed


def test_collate_pads_to_longest_and_keeps_masks_zero(raw_6mrr, raw_6ehb):
    cfg = DataConfig(crop_size=90, max_msa_clusters=16, max_extra_msa=100)
    short = make_example(raw_6mrr, DataConfig(crop_size=90, max_msa_clusters=5, max_extra_msa=7), seed=0, train=False)
    long = make_example(raw_6ehb, cfg, seed=0, train=False)
    batch = C.collate([short, long])
    n_short = len(raw_6mrr["aatype"])
    _check_shapes(batch, 90, 16, 100, batch=(2,))
    assert batch["id"] == [raw_6mrr["id"], raw_6ehb["id"]]
    assert batch["seq_mask"][0, n_short:].sum() == 0 and batch["seq_mask"][1].sum() == 90
    assert batch["msa_mask"][0, 5:].sum() == 0 and batch["msa_mask"][0, :5, n_short:].sum() == 0
    assert batch["extra_msa_mask"][0, 7:].sum() == 0 and batch["extra_msa_mask"][1].sum() == 100 * 90
    for key in MASK_KEYS:
        assert batch[key][0, ..., n_short:, :].sum() == 0 if EXPECTED[key][0][:2] == ("S", "N") or EXPECTED[key][0][:2] == ("E", "N") else batch[key][0, n_short:].sum() == 0, key
    torch.testing.assert_close(batch["aatype"][1], long["aatype"])
    torch.testing.assert_close(batch["msa_feat"][0, :5, :n_short], short["msa_feat"])
