"""MSA sampling, BERT masking, nearest-cluster assignment and the 49/25-channel features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protfold import constants as rc
from protfold.config import DataConfig
from protfold.data import msa as M

GAP, MASK, X = rc.msa_gap_index, rc.msa_mask_index, rc.unk_restype_index


@pytest.fixture(scope="module")
def real_features(real_msa_3zee):
    msa, deletions = real_msa_3zee
    cfg = DataConfig(max_msa_clusters=31, max_extra_msa=500)
    return msa, deletions, cfg, M.make_msa_features(msa, deletions, cfg, np.random.default_rng(3))


def test_shapes_one_hots_and_deletion_channels(real_features):
    msa, deletions, cfg, f = real_features
    n_res = msa.shape[1]
    assert f["msa_feat"].shape == (31, n_res, 49) and f["extra_msa_feat"].shape == (500, n_res, 25)
    assert f["true_msa"].dtype == torch.int64 and f["msa_mask"].shape == f["bert_mask"].shape == (31, n_res)
    torch.testing.assert_close(f["msa_feat"][..., :23].sum(-1), torch.ones(31, n_res))
    torch.testing.assert_close(f["extra_msa_feat"][..., :23].sum(-1), torch.ones(500, n_res))
    torch.testing.assert_close(f["msa_feat"][..., 25:48].sum(-1), torch.ones(31, n_res))  # cluster profile
    for feat, base in ((f["msa_feat"], 23), (f["extra_msa_feat"], 23)):
        has, value = feat[..., base], feat[..., base + 1]
        assert ((has == 0) | (has == 1)).all()
        assert (value >= 0).all() and (value < 1).all()
        assert ((value > 0) == (has > 0)).all()
    mean = f["msa_feat"][..., 48]
    assert (mean >= 0).all() and (mean < 1).all()
    assert deletions.max() > 10  # the real alignment has long deletions, so the transform is exercised


def test_deletion_value_formula():
    d = np.array([0, 1, 3, 10, 1000])
    torch.testing.assert_close(M.deletion_value(d), torch.tensor([2 / math.pi * math.atan(x / 3) for x in d], dtype=torch.float32))
    has, value = M._deletion_channels(d[None])
    torch.testing.assert_close(value[0], M.deletion_value(d))
    torch.testing.assert_close(has[0], torch.tensor([0.0, 1, 1, 1, 1]))


def test_query_first_and_rows_partitioned():
    rng = np.random.default_rng(0)
    centres, rest = M.sample_clusters(50, 8, rng)
    assert centres[0] == 0 and len(centres) == 8 and len(rest) == 42
    assert sorted(np.concatenate([centres, rest]).tolist()) == list(range(50))
    others = M.sample_clusters(50, 8, np.random.default_rng(1))[0]
    assert not np.array_equal(centres, others)  # the rest is shuffled by the seed
    small = M.sample_clusters(3, 8, rng)
    assert len(small[0]) == 3 and len(small[1]) == 0


def test_true_msa_is_the_unmasked_centres(real_features):
    msa, _, _, f = real_features
    true = f["true_msa"].numpy()
    np.testing.assert_array_equal(true[0], msa[0])  # the query is always the first centre
    assert all((row == msa).all(-1).any() for row in true)
    shown = f["msa_feat"][..., :23].argmax(-1)
    keep = f["bert_mask"] == 0
    assert (shown[keep] == f["true_msa"][keep]).all()


def test_bert_masking_fractions_over_many_seeds():
    """All-gap MSA and a profile that is all X: the four outcomes are told apart by the token they leave
    (uniform -> an amino acid, profile -> X, unchanged -> gap, mask -> mask token)."""
    cfg = DataConfig()
    msa = np.full((64, 50), GAP, dtype=np.int8)
    profile = np.zeros((50, 23), dtype=np.float32)
    profile[:, X] = 1.0
    counts = np.zeros(4)
    selected = total = 0
    for seed in range(40):
        out, bert = M.bert_mask_msa(msa, profile, cfg, np.random.default_rng(seed))
        sel = bert > 0
        assert (out[~sel] == GAP).all()
        picked = out[sel]
        counts += [(picked < 20).sum(), (picked == X).sum(), (picked == GAP).sum(), (picked == MASK).sum()]
        selected += sel.sum()
        total += sel.size
    assert abs(selected / total - 0.15) < 0.01
    fractions = counts / counts.sum()
    np.testing.assert_allclose(fractions, [0.1, 0.1, 0.1, 0.7], atol=0.02)


def test_profile_branch_samples_the_column_profile():
    cfg = DataConfig(masked_msa_prob=1.0, masked_msa_uniform=0.0, masked_msa_profile=1.0, masked_msa_same=0.0)
    msa = np.full((2000, 2), GAP, dtype=np.int8)
    profile = np.zeros((2, 23), dtype=np.float32)
    profile[0, [3, 7]] = [0.25, 0.75]
    profile[1, 12] = 1.0
    out, _ = M.bert_mask_msa(msa, profile, cfg, np.random.default_rng(0))
    assert set(np.unique(out[:, 0])) == {3, 7} and abs((out[:, 0] == 7).mean() - 0.75) < 0.04
    assert (out[:, 1] == 12).all()


def _brute_force_agreement(centres: np.ndarray, others: np.ndarray) -> np.ndarray:
    out = np.zeros((len(others), len(centres)), dtype=np.int64)
    for e, row in enumerate(others):
        for s, centre in enumerate(centres):
            out[e, s] = np.sum((row == centre) & (row < GAP))
    return out


def test_every_extra_sequence_goes_to_its_nearest_centre(real_msa_3zee):
    msa, _ = real_msa_3zee
    rng = np.random.default_rng(5)
    centre_rows, rest_rows = M.sample_clusters(len(msa), 24, rng)
    masked, _ = M.bert_mask_msa(msa[centre_rows], M.msa_profile(msa), DataConfig(), rng)
    assert (masked == MASK).any()
    rest = msa[rest_rows][:300]
    want = _brute_force_agreement(masked, rest)
    np.testing.assert_array_equal(M.agreement(masked, rest).numpy().astype(np.int64), want)
    assignment = M.nearest_clusters(masked, rest)
    np.testing.assert_array_equal(assignment, want.argmax(-1))  # first centre on ties, like argmax


def test_agreement_exact_beyond_bfloat16_range():
    """Counts above 256 (not representable in bf16) stay exact: long chains must not break ties wrongly."""
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 20, size=(3, 700)).astype(np.int8)
    others = centres[[2, 0]].copy()
    others[0, :5] = GAP
    got = M.agreement(centres, others).numpy()
    assert got[0, 2] == 695 and got[1, 0] == 700
    np.testing.assert_array_equal(got.astype(np.int64), _brute_force_agreement(centres, others))


def test_cluster_profile_and_deletion_mean_by_brute_force():
    rng = np.random.default_rng(2)
    centres = rng.integers(0, 23, size=(4, 9)).astype(np.int8)
    others = rng.integers(0, 22, size=(13, 9)).astype(np.int8)
    c_del = rng.integers(0, 4, size=(4, 9)).astype(np.float32)
    o_del = rng.integers(0, 7, size=(13, 9)).astype(np.int32)
    assign = rng.integers(0, 4, size=13)
    profile, del_mean = M.cluster_summary(centres, c_del, others, o_del, assign)
    for s in range(4):
        members = np.concatenate([centres[s : s + 1], others[assign == s]])
        dels = np.concatenate([c_del[s : s + 1], o_del[assign == s]])
        want = np.stack([np.bincount(members[:, col], minlength=23) for col in range(9)]) / len(members)
        np.testing.assert_allclose(profile[s], want, atol=1e-6)
        np.testing.assert_allclose(del_mean[s], dels.mean(0), atol=1e-5)


def test_single_sequence_msa_gives_one_masked_dummy_extra_row():
    aatype = np.array([0, 4, 19, 20, 7], dtype=np.int8)
    f = M.make_msa_features(aatype[None], np.zeros((1, 5), np.int32), DataConfig(), np.random.default_rng(0))
    assert f["msa_feat"].shape == (1, 5, 49) and f["extra_msa_feat"].shape == (1, 5, 25)
    assert f["extra_msa_mask"].sum() == 0 and f["extra_msa_feat"].abs().sum() == 0
    np.testing.assert_array_equal(f["true_msa"][0].numpy(), aatype)
