"""RankShare: each rank's share of the epoch's draws (protfold.data.datamodule)."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from protfold.data.datamodule import EpochSampler, RankShare


def test_ranks_take_the_draws_round_robin_disjoint_and_whole() -> None:
    draws = list(EpochSampler(5, num_samples=8, seed=3))
    shares = [list(RankShare(EpochSampler(5, num_samples=8, seed=3), num_replicas=2, rank=r)) for r in (0, 1)]
    assert shares == [draws[0::2], draws[1::2]]
    assert not set(shares[0]) & set(shares[1])
    assert isinstance(RankShare(EpochSampler(5), num_replicas=2, rank=0), DistributedSampler)  # Lightning keeps it


def test_uneven_epochs_repeat_the_first_draws_so_ranks_get_as_many() -> None:
    draws = list(EpochSampler(4, num_samples=7, seed=1))
    shares = [RankShare(EpochSampler(4, num_samples=7, seed=1), num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    padded = draws + draws[:2]
    assert [list(s) for s in shares] == [padded[r::3] for r in range(3)]


def test_set_epoch_reaches_the_draws_and_a_resume_skips_global_draws() -> None:
    reference = EpochSampler(5, num_samples=8, seed=3)
    reference.set_epoch(1)
    epoch1 = list(reference)
    share = RankShare(EpochSampler(5, num_samples=8, seed=3), num_replicas=2, rank=1)
    share.set_epoch(1)
    assert list(share) == epoch1[1::2]
    # a checkpoint 2 steps into epoch 1 (2 ranks x batch 1): 4 draws done, the ranks continue where they were
    share.sampler.resume_at(1, 4)
    share.set_epoch(1)
    assert list(share) == epoch1[5::2]


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        RankShare(EpochSampler(3), num_replicas=2, rank=2)
