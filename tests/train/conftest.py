"""Fixtures of the training-workflow tests: a small split over the prepared sample cache, the common
command-line settings of a tiny CPU run, and helpers to drive `protfold.cli.main` in-process.

Runs are tiny on purpose (preset `tiny`, crop 24, 4 MSA rows, a few steps), on one torch thread like every
test (tests/conftest.py says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# Entries that have MSAs (so MSA rows are real) and are short; the validation entry is small too.
TRAIN_IDS = ["1psm_A", "2crb_A", "3zee_A"]
VAL_IDS = ["1aki_A"]


@pytest.fixture(scope="session")
def sample_cache(prepared_samples) -> Path:
    """The session's prepared sample cache (tests/conftest.py), checked to be usable."""
    assert prepared_samples.returncode == 0, prepared_samples.stderr[-2000:]
    for entry in TRAIN_IDS + VAL_IDS:
        assert (prepared_samples.cache_dir / f"{entry}.npz").is_file(), entry
    return prepared_samples.cache_dir


@pytest.fixture(scope="session")
def small_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("split") / "split.json"
    path.write_text(json.dumps({"train": TRAIN_IDS, "validation": VAL_IDS}))
    return path


@dataclass(frozen=True)
class RunKit:
    """Builds the argv of tiny CPU runs and reads what they wrote."""

    cache: Path
    split: Path

    def fit_args(self, root: Path, *, steps: int, samples_per_epoch: int = 4, val_every: int | None = None,
                 extra: tuple[str, ...] = ()) -> list[str]:
        """`protfold fit` arguments of a tiny run under `root` (CSV logs there, validation every
        `val_every` steps or never)."""
        args = [
            "fit", "--seed_everything", "0",
            "--model.preset", "tiny", "--model.optim.warmup_steps", "2", "--model.optim.ema_decay", "0.9",
            "--data.cache_dir", str(self.cache), "--data.split_file", str(self.split),
            "--data.crop_size", "24", "--data.max_msa_clusters", "4", "--data.max_extra_msa", "8",
            "--data.num_workers", "0", "--data.samples_per_epoch", str(samples_per_epoch),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(root), "--trainer.log_every_n_steps", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
        ]
        if val_every is None:
            args += ["--trainer.limit_val_batches", "0"]
        else:
            args += ["--trainer.val_check_interval", str(val_every), "--trainer.check_val_every_n_epoch", "null"]
        return args + list(extra)

    @staticmethod
    def fit(argv: list[str]) -> None:
        from protfold.cli import main

        assert main(argv) == 0

    @staticmethod
    def version_dirs(root: Path) -> list[Path]:
        """The CSV-logger run folders under `root`, in version order."""
        found = list((root / "protfold").glob("version_*"))
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    @staticmethod
    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)

    @staticmethod
    def train_losses(root: Path) -> dict[int, float]:
        """step -> logged train/loss, over every version folder of `root` (a resumed run adds one)."""
        import csv

        losses: dict[int, float] = {}
        for folder in RunKit.version_dirs(root):
            with open(folder / "metrics.csv", newline="") as handle:
                for row in csv.DictReader(handle):
                    value = row.get("train/loss") or row.get("train/loss_step")
                    if value:
                        step = int(row["step"])
                        assert step not in losses, f"step {step} logged twice"
                        losses[step] = float(value)
        return losses


@pytest.fixture(scope="session")
def run_kit(sample_cache: Path, small_split: Path) -> RunKit:
    return RunKit(sample_cache, small_split)


@pytest.fixture(scope="session")
def pretrained(run_kit: RunKit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 4-step tiny run, used by the fine-tuning and prediction tests.

    It is trained *without* the experimentally resolved head, with 3 Evoformer blocks (tiny has 2) and 25
    pLDDT bins (tiny has 50), so fine-tuning it with the tiny preset and configs/finetune.yaml gives
    missing, unexpected and shape-mismatched parameters.
    """
    root = tmp_path_factory.mktemp("pretrained")
    overrides = "{experimentally_resolved: false, n_evoformer_blocks: 3, plddt_bins: 25}"
    run_kit.fit(run_kit.fit_args(root, steps=4, extra=("--model.model_overrides", overrides)))
    ckpt = run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


@pytest.fixture
def cwd_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repository root (configs name data paths relative to it)."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture
def fit_start(monkeypatch):
    """Records the module's state when fit starts (before the first step)."""
    seen: dict = {}

    def on_fit_start(self):
        seen["report"] = self.finetune_report
        seen["ema"] = {k: v.clone() for k, v in self.ema.shadow.items()}
        seen["weights"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        seen["trainable"] = {k for k, p in self.model.named_parameters() if p.requires_grad}
        seen["hparams"] = dict(self.hparams)

    from protfold.train.module import ProtfoldModule

    monkeypatch.setattr(ProtfoldModule, "on_fit_start", on_fit_start, raising=False)
    return seen
