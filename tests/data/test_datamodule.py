"""ProteinDataset / ProteinDataModule over the prepared sample cache."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from protfold.config import DataConfig
from protfold.data.crop import FEATURE_DIMS
from protfold.data.datamodule import EpochSampler, ProteinDataModule, ProteinDataset

SPLITS = Path(__file__).resolve().parents[2] / "data" / "samples" / "splits.json"
CROP, CLUSTERS, EXTRA = 48, 8, 16


def _module(cache_dir: Path, **kw) -> ProteinDataModule:  # noqa: ANN003
    args = dict(crop_size=CROP, max_msa_clusters=CLUSTERS, max_extra_msa=EXTRA, batch_size=3, num_workers=0, seed=7)
    args.update(kw)
    return ProteinDataModule(str(cache_dir), str(SPLITS), **args)


def _batches(loader, n: int) -> list[dict]:  # noqa: ANN001
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["id"] == y["id"]
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, y[key], rtol=0, atol=0, msg=key)


def test_train_batches_have_crop_size_and_keys(prepared_samples) -> None:  # noqa: ANN001
    dm = _module(prepared_samples.cache_dir, samples_per_epoch=7)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 7 draws with replacement from 20 train ids, batch 3
    assert [len(b["id"]) for b in batches] == [3, 3, 1]
    train_ids = set(json.loads(SPLITS.read_text())["train"])
    for batch in batches:
        assert set(FEATURE_DIMS) | {"id"} == set(batch)
        assert set(batch["id"]) <= train_ids
        n = len(batch["id"])
        assert batch["aatype"].shape == (n, CROP)
        assert batch["msa_feat"].shape[:2] == (n, CLUSTERS)  # padded to the fixed depth (compile once)
        assert batch["msa_feat"].shape[2] == CROP and batch["extra_msa_feat"].shape[1] == EXTRA
        assert batch["all_atom_positions"].shape == (n, CROP, 37, 3)
        assert batch["resolution"].shape == (n,)
        assert torch.isfinite(batch["all_atom_positions"]).all()


def test_short_dataset_still_gives_samples_per_epoch(prepared_samples) -> None:  # noqa: ANN001
    dm = _module(prepared_samples.cache_dir, samples_per_epoch=50, batch_size=5)
    assert len(dm.train_dataloader()) == 10


def test_deterministic_for_fixed_seed(prepared_samples) -> None:  # noqa: ANN001
    first = _batches(_module(prepared_samples.cache_dir, samples_per_epoch=6).train_dataloader(), 2)
    again = _batches(_module(prepared_samples.cache_dir, samples_per_epoch=6).train_dataloader(), 2)
    _assert_batches_equal(first, again)
    other = _batches(_module(prepared_samples.cache_dir, samples_per_epoch=6, seed=8).train_dataloader(), 2)
    assert other[0]["id"] != first[0]["id"] or not torch.equal(other[0]["msa_feat"], first[0]["msa_feat"])


def test_worker_processes_give_the_same_batches(prepared_samples) -> None:  # noqa: ANN001
    serial = _batches(_module(prepared_samples.cache_dir, samples_per_epoch=4, batch_size=2).train_dataloader(), 2)
    parallel = _batches(
        _module(prepared_samples.cache_dir, samples_per_epoch=4, batch_size=2, num_workers=2).train_dataloader(), 2
    )
    _assert_batches_equal(serial, parallel)


def test_epochs_differ_and_repeat(prepared_samples) -> None:  # noqa: ANN001
    loader = _module(prepared_samples.cache_dir, samples_per_epoch=6).train_dataloader()
    loader.sampler.set_epoch(0)
    epoch0 = _batches(loader, 2)
    loader.sampler.set_epoch(1)
    epoch1 = _batches(loader, 2)
    loader.sampler.set_epoch(0)
    _assert_batches_equal(epoch0, _batches(loader, 2))
    assert [b["id"] for b in epoch0] != [b["id"] for b in epoch1]


def test_validation_is_whole_split_in_order_and_fixed(prepared_samples) -> None:  # noqa: ANN001
    dm = _module(prepared_samples.cache_dir, batch_size=1)
    val = json.loads(SPLITS.read_text())["validation"]
    first = list(dm.val_dataloader())
    assert [b["id"][0] for b in first] == val
    _assert_batches_equal(first, list(dm.val_dataloader()))
    assert all(b["aatype"].shape[1] <= CROP for b in first)


def test_sampler_seeds_depend_on_epoch_position_and_index() -> None:
    sampler = EpochSampler(5, num_samples=12, seed=3)
    draws = list(sampler)
    assert len(draws) == 12 and all(0 <= i < 5 for i, _ in draws)
    assert len({s for _, s in draws}) == 12
    assert list(sampler) != draws  # next pass = next epoch when set_epoch is not called
    sampler.set_epoch(0)
    assert list(sampler) == draws


def test_sampler_resume_leaves_out_draws_without_moving_seeds() -> None:
    full = list(EpochSampler(5, num_samples=12, seed=3))  # epoch 0
    sampler = EpochSampler(5, num_samples=12, seed=3)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    sampler.resume_at(2, 5)
    assert list(sampler) == epoch2[5:]  # the same (index, seed) pairs, the first five left out
    assert list(sampler) != epoch2  # no set_epoch: the pass after the resumed epoch is epoch 3, whole
    sampler.resume_at(0, 4)
    sampler.set_epoch(0)  # Lightning sets the epoch after the restore: the skip still applies once
    assert list(sampler) == full[4:]
    assert list(sampler) == full
    sampler.resume_at(1, 4)
    sampler.set_epoch(2)  # another epoch than the checkpoint's: nothing is left out
    assert list(sampler) == epoch2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_resumes_train_loader_mid_epoch(prepared_samples, num_workers: int) -> None:  # noqa: ANN001
    """load_state_dict (as Lightning calls it on resume) makes the next train loader continue the epoch,
    also with worker processes, which start drawing from the sampler before Lightning calls set_epoch."""
    dm = _module(prepared_samples.cache_dir, samples_per_epoch=8, batch_size=2)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = list(loader)
    assert len(epoch1) == 4
    resumed = _module(prepared_samples.cache_dir, samples_per_epoch=8, batch_size=2, num_workers=num_workers)
    resumed.load_state_dict({"train_position": {"epoch": 1, "batches": 3, "batch_size": 2, "samples_per_epoch": 8,
                                                "seed": 7, "world_size": 1}})
    _assert_batches_equal(list(resumed.train_dataloader()), epoch1[3:])


def test_datamodule_state_without_trainer_is_empty_and_other_batch_size_restarts(prepared_samples, caplog) -> None:  # noqa: ANN001
    dm = _module(prepared_samples.cache_dir, samples_per_epoch=8, batch_size=2)
    assert dm.state_dict() == {}
    dm.load_state_dict({})
    with caplog.at_level(logging.WARNING, logger="protfold.data.datamodule"):
        dm.load_state_dict({"train_position": {"epoch": 1, "batches": 3, "batch_size": 4, "samples_per_epoch": 8,
                                               "seed": 7, "world_size": 1}})
    assert any("another batch_size" in r.getMessage() for r in caplog.records)
    sampler = dm.train_dataloader().sampler
    assert len(list(sampler)) == 8 and sampler._passes == 2  # epoch 1, whole


def test_missing_ids_reported_once(prepared_samples, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["1aki_A", "9zzz_A"], "validation": ["6mrr_A", "8yyy_B"]}))
    dm = ProteinDataModule(str(prepared_samples.cache_dir), str(split), crop_size=CROP, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="protfold.data.datamodule"):
        dm.setup("fit")
        dm.setup("validate")
        dm.train_dataloader()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("9zzz_A" in m for m in messages) == 1 and sum("8yyy_B" in m for m in messages) == 1
    assert dm.splits["train"] == ["1aki_A"] and dm.splits["validation"] == ["6mrr_A"]


def test_bad_entry_is_skipped_and_counted(prepared_samples, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    ids = ["1a8o_A", "6mrr_A", "1aki_A"]
    for entry_id in ids:
        shutil.copy(prepared_samples.cache_dir / f"{entry_id}.npz", tmp_path / f"{entry_id}.npz")
    data = (tmp_path / "6mrr_A.npz").read_bytes()
    (tmp_path / "6mrr_A.npz").write_bytes(data[: len(data) // 3])  # truncated
    dataset = ProteinDataset(tmp_path, ids, DataConfig(crop_size=CROP, max_msa_clusters=4, max_extra_msa=4), train=True, seed=0)
    with caplog.at_level(logging.WARNING, logger="protfold.data.datamodule"):
        got = [dataset[(i, 123)]["id"] for i in range(3)]
    assert got == ["1a8o_A", "1aki_A", "1aki_A"]
    assert list(dataset.bad_entries) == ["6mrr_A"]
    assert sum("6mrr_A" in r.getMessage() for r in caplog.records) == 1


def test_no_split_file_trains_on_everything(prepared_samples) -> None:  # noqa: ANN001
    dm = ProteinDataModule(str(prepared_samples.cache_dir), crop_size=CROP, num_workers=0)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 40 and dm.val_dataloader() == []
