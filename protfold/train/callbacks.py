"""Lightning plug-ins: atomic checkpoint writes and the training-curve plot written at the end of a run."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from protfold.env import environment
from protfold.io.atomic import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target folder, fsyncs it, then renames it over the
    target: an interrupted write leaves the previous checkpoint intact and no partial file behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None) -> None:
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt always holds the newest state.

    Lightning 2.6 rewrites last.ckpt only at a step where it also wrote a top-k checkpoint, so once the
    monitored score stopped improving last.ckpt went stale, and `--ckpt_path last` resumed from that older
    step. Here every validation, training-epoch end and the end of fit also write last.ckpt (once per step).
    """

    def _save_last_if_stale(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_stale(trainer)


def _read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


class TrainingCurvePlot(pl.Callback):
    """At the end of fit, plots the logged training loss and validation scores to `<log_dir>/curves.png`."""

    PANELS = (("train/loss", "val/loss"), ("val/lddt_ca", "val/gdt_ts", "val/tm"), ("val/rmsd_ca",))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.logger is None or trainer.logger.log_dir is None:
            return
        trainer.logger.save()
        metrics_file = Path(trainer.logger.log_dir) / "metrics.csv"
        if not metrics_file.exists():
            return
        out = plot_curves(metrics_file, Path(trainer.logger.log_dir) / "curves.png")
        log.info("training curves written to %s", out)


def plot_curves(metrics_file: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_metrics(metrics_file)
    fig, axes = plt.subplots(1, len(TrainingCurvePlot.PANELS), figsize=(5 * len(TrainingCurvePlot.PANELS), 3.6))
    for ax, keys in zip(axes, TrainingCurvePlot.PANELS):
        for key in keys:
            points = series.get(key) or series.get(f"{key}_epoch") or series.get(f"{key}_step")
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key.startswith("val") else None, ms=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class StepStats(pl.Callback):
    """Per optimizer step: wall time, peak device memory and throughput, logged as `perf/*`; rank 0 writes
    their summary to `<log_dir>/perf.json` at the end of fit, and also when fit stops on an exception.

    A step is the training batches of one optimizer update (`accumulate_grad_batches` of them). Its time runs
    from the start of its first batch to the end of its last, each after a device synchronize; the loading
    and host-to-device copy of a batch happen before Lightning's batch-start hook and are not included. Peak
    memory is the CUDA allocator's high-water mark during the step (reset at its start); not recorded on CPU.
    Throughput: world size × samples per step / step time. The summary's median leaves out the first step
    (compilation, allocator warm-up).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.peaks: list[float] = []
        self.recycles: list[float] = []
        self._start = 0.0
        self._samples = 0
        self.samples_per_step = 1
        # The device the steps ran on, kept from the first batch: by `on_fit_end` Lightning has moved the module
        # back to the CPU (reading it there would record "device": "cpu" for a GPU run).
        self.device: torch.device | None = None

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        import time

        if batch_idx % getattr(pl_module, "accumulate", 1):
            return  # inside an optimizer step: keep timing from its first batch
        device = self.device = pl_module.device
        self._sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._samples = 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import time

        self._samples += int(batch["aatype"].shape[0]) if isinstance(batch, dict) and "aatype" in batch else 1
        if (batch_idx + 1) % getattr(pl_module, "accumulate", 1):
            return  # the optimizer step is not finished yet
        device = pl_module.device
        self._sync(device)
        seconds = time.perf_counter() - self._start
        self.samples_per_step = self._samples
        self.times.append(seconds)
        metrics = {"perf/step_s": seconds, "perf/samples_per_s": trainer.world_size * self._samples / seconds}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            self.peaks.append(peak)
            metrics["perf/peak_gib"] = peak
        self.recycles.append(float(getattr(pl_module, "last_n_recycles", float("nan"))))
        pl_module.log_dict(metrics, batch_size=self._samples)

    def summary(self, trainer: pl.Trainer, device: torch.device) -> dict[str, Any]:
        """The run's statistics; `device` names the card only if no step ran (the steps' own device wins)."""
        import statistics

        device = self.device or device

        timed = self.times[1:] or self.times
        median = statistics.median(timed) if timed else float("nan")
        return {
            "steps": len(self.times),
            "world_size": trainer.world_size,
            "samples_per_step_per_rank": self.samples_per_step,
            "step_s": self.times,
            "recycles": self.recycles,
            "median_step_s_after_first": median,
            "samples_per_s": trainer.world_size * self.samples_per_step / median if timed else float("nan"),
            "peak_gib_rank0": max(self.peaks) if self.peaks else None,
            # the card, torch version, command line and date, as every bench record has them
            **{k: v for k, v in environment(device, None).items() if k != "device"},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        }

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import json

        if not trainer.is_global_zero or trainer.logger is None or trainer.logger.log_dir is None:
            return
        out = Path(trainer.logger.log_dir) / "perf.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.summary(trainer, pl_module.device), indent=2) + "\n")
        log.info("step statistics written to %s", out)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer, pl_module)
