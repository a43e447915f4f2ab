"""Dataset and LightningDataModule over the prepared cache (`protfold prepare`).

Reproducibility: the sampler, which runs in the main process, draws the dataset index *and* a per-draw
example seed from (base seed, epoch, draw position, index); workers only execute. So every random choice
(crop, MSA sampling, masking) is fixed by the seed, whatever `num_workers` is and although persistent
workers never see `set_epoch`.

Resume: the DataModule's `state_dict` (saved in every checkpoint) holds the training data position, the
epoch and the number of batches of it already trained on; after a restore the training sampler starts
at that epoch and leaves out that many batches' draws once, so a run resumed from a mid-epoch checkpoint
trains on exactly the batches the uninterrupted run went on with.

Several processes: `RankShare` deals each epoch's one list of draws round-robin over the ranks (rank r takes
draws r, r + W, ...), so the ranks train on disjoint draws fixed by the seed, and an optimizer step takes the
same examples at any world size with the same global batch (world size x batch_size x micro-batches per step).

A cache entry that cannot be read (or that `make_example` rejects with ProtfoldInputError) is logged
once per process, counted in `ProteinDataset.bad_entries`, and replaced by the next readable entry, so the
epoch goes on and batches keep their size.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from protfold.config import DataConfig
from protfold.data import cache
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.errors import ProtfoldInputError

logger = logging.getLogger(__name__)


def example_seed(seed: int, epoch: int, position: int, index: int) -> int:
    """The seed of one example: a hash of (base seed, epoch, draw position, dataset index), in [0, 2**63)."""
    state = np.random.SeedSequence([seed, epoch, position, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class EpochSampler(Sampler):
    """Yields (dataset index, example seed) pairs.

    train: `num_samples` indices drawn uniformly *with replacement* (a short dataset still gives the
    requested number of steps), different each epoch. Otherwise: every index once, in order, with seeds
    that do not depend on the epoch. The epoch is what `set_epoch` set (Lightning calls it), else the
    number of previous passes.

    `resume_at(epoch, skip)` (training): count `epoch` previous passes and leave out the first `skip` draws
    of the next pass if it is that epoch's. The remaining draws keep their positions, hence their seeds.
    """

    def __init__(self, n_items: int, *, num_samples: int | None = None, seed: int = 0, train: bool = True) -> None:
        if n_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n_items, self.seed, self.train = n_items, seed, train
        self.num_samples = num_samples if (train and num_samples) else n_items
        self._epoch: int | None = None
        self._passes = 0
        self._resume: tuple[int, int] | None = None  # (epoch, draws to leave out), for the next pass only

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Continue a pass interrupted after `skip` draws of epoch `epoch` (a restored checkpoint).

        The pass count is set too, so the epoch is right even when the loader starts iterating before
        `set_epoch` is called (worker processes prefetch when the iterator is made) or never (DDP wraps
        this sampler)."""
        if epoch < 0 or skip < 0:
            raise ValueError(f"epoch and skip must be >= 0, got {epoch} and {skip}")
        self._epoch, self._passes = None, epoch
        self._resume = (epoch, skip) if skip > 0 and self.train else None

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = (self._epoch if self._epoch is not None else self._passes) if self.train else 0
        self._passes += 1
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        if self.train:
            indices = np.random.default_rng([self.seed, epoch]).integers(0, self.n_items, size=self.num_samples)
        else:
            indices = np.arange(self.n_items)
        for position, index in enumerate(indices.tolist()):
            if position >= skip:
                yield index, example_seed(self.seed, epoch, position, index)


class RankShare(DistributedSampler):
    """One rank's share of an EpochSampler's draws: the pass's draws dealt round-robin over `num_replicas`
    ranks, the last ones repeated from its start so every rank gets as many (as DistributedSampler does).

    A DistributedSampler subclass so that Lightning keeps it: it wraps any other sampler in its own, which
    shuffles the draws again with a seed of its own and splits them otherwise than `dropout_seed` and a
    resume at another world size assume. `set_epoch` reaches the EpochSampler.
    """

    def __init__(self, sampler: EpochSampler, *, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        # DistributedSampler's own __init__ wants a dataset and the process group; the fields it keeps are set here
        self.sampler, self.num_replicas, self.rank = sampler, num_replicas, rank
        self.epoch, self.seed, self.shuffle, self.drop_last = 0, sampler.seed, False, False
        self.num_samples = -(-len(sampler) // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draws = list(self.sampler)
        draws += draws[: -len(draws) % self.num_replicas]
        return iter(draws[self.rank :: self.num_replicas])


class ProteinDataset(Dataset):
    """Cache entries -> `make_example` features. Items are indexed by int or by (index, example seed)."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        ids: list[str],
        cfg: DataConfig,
        *,
        train: bool,
        seed: int,
        memory_cache_mb: float = 256.0,
    ) -> None:
        if not ids:
            raise ValueError(f"no entries to load from {cache_dir}")
        self.cache_dir, self.ids, self.cfg = Path(cache_dir), list(ids), cfg
        self.train, self.seed = train, seed
        self.epoch = 0  # only used for plain int indices
        self.bad_entries: dict[str, str] = {}  # id -> reason, in this process
        self._memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._memory_limit = int(memory_cache_mb * 2**20)
        self._memory_bytes = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, example_seed(self.seed, self.epoch, key, key))
        for step in range(len(self.ids)):
            entry_id = self.ids[(index + step) % len(self.ids)]
            if entry_id in self.bad_entries:
                continue
            try:
                return make_example(self.load(entry_id), self.cfg, seed=seed, train=self.train)
            except ProtfoldInputError as exc:
                self._mark_bad(entry_id, exc)
        raise RuntimeError(f"no usable cache entry among {len(self.ids)} in {self.cache_dir} (see the warnings)")

    def load(self, entry_id: str) -> dict[str, Any]:
        """The raw cache entry, from this process's in-memory LRU cache when it was read before."""
        entry = self._memory.get(entry_id)
        if entry is not None:
            self._memory.move_to_end(entry_id)
            return entry
        entry = cache.read_entry(cache.entry_path(self.cache_dir, entry_id))
        size = sum(v.nbytes for v in entry.values() if isinstance(v, np.ndarray))
        if size <= self._memory_limit // 4:
            self._memory[entry_id] = entry
            self._memory_bytes += size
            while self._memory_bytes > self._memory_limit:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= sum(v.nbytes for v in old.values() if isinstance(v, np.ndarray))
        return entry

    def _mark_bad(self, entry_id: str, exc: ProtfoldInputError) -> None:
        self.bad_entries[entry_id] = exc.reason
        logger.warning(
            "skipping cache entry %s (%s); %d bad entr%s so far in this process",
            entry_id, exc, len(self.bad_entries), "y" if len(self.bad_entries) == 1 else "ies",
        )


class ProteinDataModule(pl.LightningDataModule):
    """Training and validation loaders over a prepared cache.

    split_file: JSON with "train" and "validation" id lists (optionally "test"), the format of
    data/samples/splits.json; None: every cache entry is a training entry and there is no validation.
    Ids not in the cache are reported once and left out. The DataConfig fields are init arguments so
    LightningCLI exposes them (`--data.crop_size 256`).
    """

    def __init__(
        self,
        cache_dir: str,
        split_file: str | None = None,
        *,
        crop_size: int = 256,
        crop_mode: Literal["contiguous", "spatial", "mixed"] = "mixed",
        spatial_crop_prob: float = 0.5,
        max_msa_clusters: int = 128,
        max_extra_msa: int = 1024,
        masked_msa_prob: float = 0.15,
        masked_msa_uniform: float = 0.1,
        masked_msa_profile: float = 0.1,
        masked_msa_same: float = 0.1,
        batch_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        memory_cache_mb: float = 256.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = DataConfig(
            crop_size=crop_size, crop_mode=crop_mode, spatial_crop_prob=spatial_crop_prob,
            max_msa_clusters=max_msa_clusters, max_extra_msa=max_extra_msa, masked_msa_prob=masked_msa_prob,
            masked_msa_uniform=masked_msa_uniform, masked_msa_profile=masked_msa_profile,
            masked_msa_same=masked_msa_same,
        )
        if batch_size < 1 or num_workers < 0 or seed < 0 or (samples_per_epoch is not None and samples_per_epoch < 1):
            raise ValueError("batch_size and samples_per_epoch must be >= 1, num_workers and seed >= 0")
        self.cache_dir, self.split_file = Path(cache_dir), split_file
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.samples_per_epoch, self.memory_cache_mb = samples_per_epoch, memory_cache_mb
        self.splits: dict[str, list[str]] | None = None
        self._resume_position: dict[str, int] | None = None  # from load_state_dict, used by train_dataloader

    # ----- the training data position, saved in checkpoints -----
    def state_dict(self) -> dict[str, Any]:
        """The training data position: `epoch` and `batches` of it trained on, as the fit loop counts them.

        The epoch is the one whose batches ran (the fit loop has already counted it as processed when a
        checkpoint is written at the training-epoch end); an epoch whose last batch ran is saved as the
        start of the next one."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return {}
        fit = trainer.fit_loop
        epoch = max(fit.epoch_progress.current.started - 1, 0)
        progress = fit.epoch_loop.batch_progress
        batches = progress.current.processed
        if progress.is_last_batch or (trainer.num_training_batches != float("inf") and batches >= trainer.num_training_batches):
            epoch, batches = epoch + 1, 0
        return {
            "train_position": {
                "epoch": int(epoch), "batches": int(batches), "batch_size": self.batch_size,
                "samples_per_epoch": self.samples_per_epoch, "seed": self.seed,
                "world_size": int(getattr(trainer, "world_size", 1)), "global_batch": self._global_batch(trainer),
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        if not position:
            return
        same = all(position.get(key) == value for key, value in (
            ("batch_size", self.batch_size), ("samples_per_epoch", self.samples_per_epoch), ("seed", self.seed)))
        if not same and position["batches"] > 0:
            logger.warning(
                "the checkpoint was written %d batch(es) into epoch %d with another batch_size, samples_per_epoch "
                "or seed; the resumed epoch draws its examples from the start", position["batches"], position["epoch"])
            position = {**position, "batches": 0}
        self._check_world_size(position)
        self._resume_position = {"epoch": int(position["epoch"]), "batches": int(position["batches"]),
                                 "world_size": int(position.get("world_size", 1))}

    def _global_batch(self, trainer: pl.Trainer | None) -> int:
        """Examples per optimizer step: world size x batch_size x the module's micro-batches per step."""
        world = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return world * self.batch_size * int(getattr(module, "accumulate", 1))

    def _check_world_size(self, position: dict[str, Any]) -> None:
        """A checkpoint resumes on another number of processes when each optimizer step still takes the same
        examples: the same global batch (world size x batch_size x accumulate_grad_batches). Every rank draws from
        one list per epoch (EpochSampler) that the distributed sampler splits, so step k then trains on the same
        draws whatever the split. Otherwise the run would train on other batches than the checkpoint's run:
        a one-line error naming both world sizes and what to set."""
        trainer = self._trainer_or_none()
        saved_world, saved_batch = position.get("world_size", 1), position.get("global_batch")
        world = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
        if saved_world == world or saved_batch is None:
            return
        if position["batches"] > 0:
            raise ProtfoldInputError(
                getattr(trainer, "ckpt_path", None) or "checkpoint",
                f"written {position['batches']} batch(es) into epoch {position['epoch']} by a run of world size "
                f"{saved_world}, resumed at world size {world}: Lightning restores the epoch's batch count per rank, "
                "so resume inside an epoch at the same world size, or at another one from a checkpoint written at an "
                "epoch's end")
        batch = self._global_batch(trainer)
        if batch != saved_batch:
            raise ProtfoldInputError(
                getattr(trainer, "ckpt_path", None) or "checkpoint",
                f"written by a run of world size {saved_world} (global batch {saved_batch}), resumed at world size "
                f"{world} (global batch {batch} = {world} x data.batch_size {self.batch_size} x "
                f"model.accumulate_grad_batches {batch // (world * self.batch_size)}); set data.batch_size and "
                f"model.accumulate_grad_batches so the global batch is {saved_batch}, or start a new run from its "
                "weights with --model.init_from")
        logger.info("resuming a run of world size %d at world size %d with the same global batch %d",
                    saved_world, world, batch)

    def _trainer_or_none(self) -> pl.Trainer | None:
        return getattr(self, "trainer", None)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self._read_splits()

    def _read_splits(self) -> dict[str, list[str]]:
        if not self.cache_dir.is_dir():
            raise ProtfoldInputError(self.cache_dir, "cache directory does not exist: run `protfold prepare` first")
        available = set(cache.list_entries(self.cache_dir))
        if self.split_file is None:
            return {"train": sorted(available), "validation": [], "test": []}
        try:
            raw = json.loads(Path(self.split_file).read_text())
            splits = {name: [str(i) for i in raw.get(name, [])] for name in ("train", "validation", "test")}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise ProtfoldInputError(self.split_file, f"cannot read split file ({exc})") from None
        for name, ids in splits.items():
            missing = [i for i in ids if i not in available]
            if missing:
                shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
                logger.warning("%d %s id(s) of %s are not in the cache %s: %s", len(missing), name, self.split_file, self.cache_dir, shown)
            splits[name] = [i for i in ids if i in available]
        return splits

    def _dataset(self, name: str, train: bool) -> ProteinDataset:
        self.setup()
        return ProteinDataset(
            self.cache_dir, self.splits[name], self.cfg, train=train, seed=self.seed, memory_cache_mb=self.memory_cache_mb
        )

    def _loader(self, dataset: ProteinDataset, sampler: EpochSampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", train=True)
        sampler = EpochSampler(len(dataset), num_samples=self.samples_per_epoch, seed=self.seed, train=True)
        trainer = self._trainer_or_none()
        share = _rank_share(trainer)
        if self._resume_position is not None:
            position, self._resume_position = self._resume_position, None
            # draws of the epoch already trained on, by every rank (the world size is the checkpoint's, equal to
            # this run's when batches > 0: `_check_world_size`)
            skip = position["batches"] * self.batch_size * position["world_size"]
            if skip:
                logger.info("resuming the training data %d batch(es) into epoch %d", position["batches"], position["epoch"])
                # Lightning checks only the loaders for a state_dict; this one's position comes from here
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch",
                                        category=PossibleUserWarning)
            sampler.resume_at(position["epoch"], skip)
        if share is not None:
            return self._loader(dataset, RankShare(sampler, **share))
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._eval_loader("test" if self.splits["test"] else "validation")

    def _eval_loader(self, name: str) -> DataLoader | list:
        self.setup()
        if not self.splits[name]:
            return []
        dataset = self._dataset(name, train=False)
        return self._loader(dataset, EpochSampler(len(dataset), seed=self.seed, train=False))


def _rank_share(trainer: pl.Trainer | None) -> dict[str, int] | None:
    """`RankShare`'s arguments when the strategy splits data over several ranks (its sampler arguments: the
    data-parallel ranks under a sharded strategy), else None."""
    if trainer is None or int(getattr(trainer, "world_size", 1)) < 2:
        return None
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    replicas, rank = int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
    return {"num_replicas": replicas, "rank": rank} if replicas > 1 else None
