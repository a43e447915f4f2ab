"""The LightningModule: owns the network, the losses, the optimiser recipe and the EMA. Nothing else."""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from protfold import metrics
from protfold.config import LossConfig, MemoryConfig, ModelConfig, OptimConfig, model_preset
from protfold.errors import ProtfoldInputError
from protfold.losses import alphafold_loss
from protfold.model.alphafold import AlphaFold
from protfold.train import sharding
from protfold.train.checkpoints import read_checkpoint
from protfold.train.ema import EMA
from protfold.train.oom import leanest_failed_message, next_leaner, preset_name
from protfold.train.optimizers import (
    check_state_available,
    decode_optimizer_states,
    discard_grads,
    encode_optimizer_states,
    wait_for_grads,
)
from protfold.train.step import adam, clip_and_step, freeze_unused_heads, training_loss
from protfold.weights import as_preset, read_external_weights

log = logging.getLogger(__name__)


class NonFiniteStepsError(RuntimeError):
    """Raised after too many consecutive optimiser steps with non-finite loss or gradients."""


def warmup_step_decay(optim: OptimConfig):
    """AF2 schedule (supplement 1.11.3): linear warm-up, then x decay_factor every decay_every steps."""

    def factor(step: int) -> float:
        if optim.warmup_steps > 0 and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        return optim.decay_factor ** (max(step - optim.warmup_steps, 0) // optim.decay_every)

    return factor


class ProtfoldModule(pl.LightningModule):
    """AlphaFold2 training recipe on Lightning (manual optimisation, so bad steps can be skipped).

    Args:
        preset: model preset name (`tiny`, `small`, `af2`; `tiny_ptm`, `small_ptm`, `af2_ptm` add the PAE head).
        model_overrides: ModelConfig fields to change on top of the preset.
        memory: memory switches used in training.
        inference_memory: switches used in validation and prediction (defaults to `memory`).
        loss, optim: loss weights and optimiser recipe.
        accumulate_grad_batches: micro-batches per optimiser step.
        max_bad_steps: stop after this many consecutive non-finite steps.
        seed: seeds the per-step draws (recycling count, FAPE clamping), identical on every rank.
        init_from: fine-tuning: a checkpoint whose weights start this run (its optimizer, step and config
            are not taken). Parameters whose names or shapes differ are reported and left as initialised.
        init_weights: which of the checkpoint's weights to load: "ema" (the averaged ones) or "raw".
        freeze_trunk: fine-tuning: train only the structure module and heads.
    """

    oom_hook = None  # tests only: called with the module before each training forward; may raise an OOM error

    def __init__(
        self,
        *,
        preset: str = "small",
        model_overrides: dict[str, Any] | None = None,
        memory: MemoryConfig = MemoryConfig(),
        inference_memory: MemoryConfig | None = None,
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        accumulate_grad_batches: int = 1,
        max_bad_steps: int = 5,
        seed: int = 0,
        init_from: str | None = None,
        init_weights: str = "ema",
        freeze_trunk: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model_cfg = model_preset(preset, **(model_overrides or {}))
        self.train_memory = memory
        self.inference_memory = inference_memory or memory
        self.loss_cfg = loss
        self.optim_cfg = optim
        self.accumulate = accumulate_grad_batches
        self.max_bad_steps = max_bad_steps
        self.seed = seed
        self.model = AlphaFold(cfg=self.model_cfg)
        self.finetune_report: FinetuneReport | None = None
        if init_from:
            label = f"model.preset {preset!r}" + (" with model.model_overrides" if model_overrides else "")
            self.finetune_report = load_weights(self.model, init_from, which=init_weights, label=label)
            log.info("%s", self.finetune_report)
        if freeze_trunk:
            for name, p in self.model.named_parameters():
                if not name.startswith(("structure_module.", "heads.")):
                    p.requires_grad_(False)
        _check_loss_heads(self.model_cfg, loss)
        freeze_unused_heads(self.model, loss)
        # the average restarts from the (possibly loaded) weights, never from a stale one (OpenFold #426)
        self.ema = EMA(self.model, decay=optim.ema_decay, storage=optim.ema_storage, seed=seed)
        check_state_available(optim)
        self.oom_recoveries: list[tuple[int, str, str]] = []  # (step, old mode, new mode)
        self._in_backward = False
        self.bad_steps_in_row = 0
        self.bad_steps_total = 0
        self._ema_stack: ExitStack | None = None

    # ----- per-step random draws, identical on every rank -----
    def _step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)

    def draw_step_settings(self) -> tuple[int, bool]:
        """Recycling iterations (0..max_recycles) and whether FAPE is clamped this step."""
        gen = self._step_generator()
        n_recycles = int(torch.randint(0, self.model_cfg.max_recycles + 1, (1,), generator=gen))
        clamped = bool(torch.rand((), generator=gen) < self.loss_cfg.fape_clamp_prob)
        return n_recycles, clamped

    def dropout_seed(self, batch_idx: int) -> int:
        """The seed of this step's dropout draws, from (seed, step, the micro-batch's place in the global batch).

        The place is micro-batch x world size + rank, the order in which the distributed sampler deals a step's
        draws; so at batch_size 1, runs with the same global batch over other numbers of processes draw the
        same masks for the same examples (a checkpoint resumes exactly at another world size)."""
        world = self._trainer.world_size if self._trainer is not None else 1
        place = (batch_idx % self.accumulate) * world + self.global_rank
        seed = np.random.SeedSequence([self.seed, self.global_step, place]).generate_state(1)[0]
        return int(seed)

    @contextmanager
    def _dropout_rng(self, batch_idx: int) -> Iterator[None]:
        """Dropout draws from the global generator seeded by `dropout_seed`, restored after.

        Loaders and Lightning hooks also draw from the global generator, and a resumed run does not draw as
        often between a checkpoint and its next step as the run that wrote it did; seeding each step keeps a
        resumed run's dropout masks those of the uninterrupted run.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.dropout_seed(batch_idx))
            yield

    # ----- training -----
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        n_recycles, clamped = self.draw_step_settings()
        self.last_n_recycles = n_recycles
        while True:  # more than once only after an out-of-memory error: the same batch and draws, a leaner mode
            failed = None
            try:
                loss, terms = self._forward_backward(batch, batch_idx, n_recycles, clamped)
            except torch.OutOfMemoryError as err:
                if not self.optim_cfg.recover_oom or self.trainer.world_size > 1:
                    raise  # several processes: one rank cannot change mode alone (the others wait in all-reduce)
                failed = str(err)  # the message only: the traceback would keep the failed step's tensors alive
            if failed is None:
                break
            self._recover_from_oom(opt, batch, batch_idx, failed)
        if (batch_idx + 1) % self.accumulate == 0:
            self._finish_step(opt, loss)
        bsz = batch["aatype"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bsz)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=bsz)
        self.log("train/recycles", float(n_recycles), batch_size=bsz)
        return loss.detach()

    def _forward_backward(self, batch: dict[str, Tensor], batch_idx: int, n_recycles: int,
                          clamped: bool) -> tuple[Tensor, dict[str, Tensor]]:
        self._in_backward = False
        if self.oom_hook is not None:  # tests: raise an out-of-memory error at a chosen mode and step
            self.oom_hook(self)
        with self._dropout_rng(batch_idx):
            loss, terms = training_loss(self.model, batch, n_recycles=n_recycles, loss_cfg=self.loss_cfg,
                                        clamped_fape=clamped, memory=self.train_memory)
            self._in_backward = True
            self.manual_backward(loss / self.accumulate)
        return loss, terms

    def set_train_memory(self, memory: MemoryConfig) -> None:
        """Replace the memory configuration of training steps (the one place it changes during a run)."""
        self.train_memory = memory

    def _recover_from_oom(self, opt, batch: dict[str, Tensor], batch_idx: int, message: str) -> None:
        """Free what the failed try held, move to the next leaner memory preset, or stop if there is none.

        The optimiser has not stepped (the error came from forward or backward), the step's draws are
        made again from the same seeds, so the retry computes what the leaner mode would have. Gradients of
        earlier micro-batches of an accumulation window cannot be told apart from the failed backward's."""
        if self._in_backward and batch_idx % self.accumulate != 0:
            raise RuntimeError(f"out of memory in the backward pass of micro-batch {batch_idx % self.accumulate + 1}"
                               f" of {self.accumulate} at step {self.global_step}: the earlier micro-batches' "
                               "gradients cannot be kept apart from it; lower accumulate_grad_batches or use a "
                               "leaner --model.memory") from None
        discard_grads(opt)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        old = preset_name(self.train_memory) or "custom"
        nxt = next_leaner(self.train_memory)
        if nxt is None:
            raise RuntimeError(leanest_failed_message(self, batch, old, message)) from None
        log.warning("out of memory at step %d: memory mode %s -> %s, retrying the same batch", self.global_step, old,
                    nxt[0])
        self.set_train_memory(nxt[1])
        self.oom_recoveries.append((self.global_step, old, nxt[0]))

    def _finish_step(self, opt, loss: Tensor) -> None:
        if self._step_is_finite(loss):
            if getattr(self.trainer.precision_plugin, "scaler", None) is None:  # fp32, bf16: nothing to unscale
                # the bench's update too; Lightning's clip_gradients refuses fused Adam under any AMP plugin
                clip_and_step(opt, [p for p in self.model.parameters() if p.requires_grad], self.optim_cfg.grad_clip)
            else:  # fp16 with a gradient scaler: Lightning unscales before clipping
                wait_for_grads(opt)
                self.clip_gradients(opt, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
            self.lr_schedulers().step()
            self.ema.update()
            self.bad_steps_in_row = 0
        else:
            self.bad_steps_in_row += 1
            self.bad_steps_total += 1
            log.warning("skipped a step with non-finite loss or gradients (%d in a row)", self.bad_steps_in_row)
            if self.bad_steps_in_row >= self.max_bad_steps:
                raise NonFiniteStepsError(
                    f"{self.bad_steps_in_row} consecutive steps had non-finite loss or gradients; lower the "
                    "learning rate, check the input data, or use precision 32 to find the first bad operation"
                )
        opt.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", float(self.bad_steps_total))

    def _step_is_finite(self, loss: Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).all()
        for p in self.model.parameters():
            if p.grad is not None:  # this rank's shard under a sharded strategy; the all-reduce covers the rest
                ok = ok & torch.isfinite(sharding.local_grad(p.grad)).all()
        flag = ok.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0.5)

    def configure_model(self) -> None:
        """Under `ShardedStrategy` (protfold.train.sharding): shard the network and its EMA over the ranks, before
        the optimiser is built, so Adam's moments are sharded too. Other strategies: nothing to do."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, sharding.ShardedStrategy) or sharding.is_sharded(self.model):
            return
        sharding.shard_model(self.model, self.device_mesh["data_parallel"],
                             compiled_blocks=self.train_memory.compile_blocks, cpu_offload=strategy.cpu_offload,
                             reshard_after_forward=strategy.reshard_after_forward)
        sharding.shard_ema(self.ema, self.model)

    def configure_optimizers(self):
        opt = adam((p for p in self.model.parameters() if p.requires_grad), self.optim_cfg, device=self.device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_step_decay(self.optim_cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- evaluation with EMA weights -----
    def _enter_ema(self) -> None:
        self._ema_stack = ExitStack()
        self._ema_stack.enter_context(self.ema.swapped_in())

    def _exit_ema(self) -> None:
        if self._ema_stack is not None:
            self._ema_stack.close()
            self._ema_stack = None

    on_validation_epoch_start = _enter_ema
    on_validation_epoch_end = _exit_ema
    on_test_epoch_start = _enter_ema
    on_test_epoch_end = _exit_ema

    def on_predict_epoch_start(self) -> None:
        self._enter_ema()

    def on_predict_epoch_end(self) -> None:
        self._exit_ema()

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        outputs = self.model(batch, n_recycles=self.model_cfg.eval_recycles, memory=self.inference_memory)
        loss, _ = alphafold_loss(outputs, batch, self.loss_cfg, use_clamped_fape=True)
        scores = structure_scores(outputs, batch)
        bsz = batch["aatype"].shape[0]
        self.log(f"{stage}/loss", loss, batch_size=bsz, sync_dist=True)
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "lddt_ca", batch_size=bsz, sync_dist=True)
        return scores

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.model(batch, n_recycles=self.model_cfg.eval_recycles, memory=self.inference_memory)

    # ----- checkpoint extras: EMA and the random state -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = sharding.full_ema_state(self.ema.state_dict())
        checkpoint["torch_rng"] = torch.get_rng_state()
        if self.device.type == "cuda":  # this rank's device only: reading all of them would open a context on each
            checkpoint["torch_cuda_rng"] = torch.cuda.get_rng_state(self.device)
        checkpoint["bad_steps_total"] = self.bad_steps_total
        encode_optimizer_states(checkpoint)
        if self.oom_recoveries:  # a resumed run continues in the mode the recovery reached
            checkpoint["train_memory"] = asdict(self.train_memory)
        checkpoint["model_config"] = asdict(self.model_cfg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("model_config")
        if saved is not None and saved != asdict(self.model_cfg):
            diff = sorted(k for k in saved if saved[k] != asdict(self.model_cfg).get(k))
            raise ValueError(
                f"checkpoint was trained with another model configuration (differs in {diff[:6]}); resume with "
                f"the same preset ({self.hparams.preset!r} now), or fine-tune from it with --model.init_from"
            )
        _start_next_epoch_at_first_batch(checkpoint)
        decode_optimizer_states(checkpoint)
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            if sharding.is_sharded(self.model):
                sharding.shard_ema(self.ema, self.model)
        _restore_rng_states(checkpoint)
        self.bad_steps_total = int(checkpoint.get("bad_steps_total", 0))
        if "train_memory" in checkpoint:
            self.set_train_memory(MemoryConfig(**checkpoint["train_memory"]))


def _rng_bytes(state: Tensor) -> Tensor:
    """A saved RNG state as the contiguous CPU uint8 tensor torch's setters take. `map_location` moves it with
    the rest of the checkpoint (onto the GPU when predicting there), and a state may come back as another
    dtype or a view; the bytes of the state are its values, so a value cast keeps them."""
    return state.detach().to(device="cpu", dtype=torch.uint8).contiguous()


def _restore_rng_states(checkpoint: dict[str, Any]) -> None:
    """Restore the CPU RNG state, and the CUDA one (of the current device) where CUDA is available; a
    checkpoint written on a GPU and loaded without one skips it and says so."""
    if "torch_rng" in checkpoint:
        torch.set_rng_state(_rng_bytes(checkpoint["torch_rng"]))
    cuda_state = checkpoint.get("torch_cuda_rng")
    if cuda_state is None:
        return
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(_rng_bytes(cuda_state))
    else:
        log.info("the checkpoint's CUDA RNG state is not restored: CUDA is not available here")


def _check_loss_heads(model_cfg: ModelConfig, loss: LossConfig) -> None:
    """A loss weight on a head the model lacks, or PAE bins the loss reads otherwise than the head, is a
    configuration error (a silently absent loss term would train something else than asked)."""
    if loss.pae > 0 and not model_cfg.predicted_aligned_error:
        raise ValueError(
            f"loss.pae={loss.pae} needs the predicted aligned error head: use a `_ptm` preset (tiny_ptm, small_ptm, "
            "af2_ptm) or model_overrides predicted_aligned_error: true"
        )
    if loss.pae > 0 and loss.pae_max_bin != model_cfg.pae_max_bin:
        raise ValueError(f"loss.pae_max_bin={loss.pae_max_bin} differs from the model's pae_max_bin="
                         f"{model_cfg.pae_max_bin}: the loss must bin errors as the head does")


def _start_next_epoch_at_first_batch(checkpoint: dict[str, Any]) -> None:
    """Fix the loop state of a checkpoint written after its epoch's batches had all run (at the training-epoch
    end or the end of fit, not at a validation). Lightning 2.6 restores that epoch's batch counter into the
    next epoch, which then starts at batch_idx = the old epoch's length and ends early (accumulation goes out
    of step); from a training-epoch-end checkpoint it also runs one more batch inside the finished epoch and
    the epoch counter lags by one. Such a checkpoint is marked as a finished epoch whose batch counter is
    zero; module hooks run before Lightning restores the loops, so editing the dict here is enough."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return
    for progress in (epochs["current"], epochs["total"]):
        if not progress["ready"] == progress["started"] == progress["processed"]:
            return  # saved inside the epoch (e.g. at a validation): Lightning handles it
    for progress in (epochs["current"], epochs["total"]):
        progress["completed"] = progress["processed"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False


@dataclass
class FinetuneReport:
    """What loading a checkpoint into a (possibly different) model did."""

    source: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __str__(self) -> str:
        lines = [f"fine-tuning from {self.source}: {self.loaded} tensors loaded"]
        for title, items in (("missing (kept initialised)", self.missing), ("unexpected (ignored)", self.unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        for name, ours, theirs in self.mismatched[:8]:
            lines.append(f"  shape mismatch (kept initialised): {name} model {ours} vs checkpoint {theirs}")
        return "\n".join(lines)


def load_weights(model: torch.nn.Module, path: str, *, which: str = "ema", label: str = "the model") -> FinetuneReport:
    """Copy a checkpoint's weights into `model` where names and shapes match, and report the rest.
    `label` names the model's configuration in the error for AF2 / OpenFold weights of other shapes."""
    if which not in ("ema", "raw"):
        raise ValueError(f"init_weights must be 'ema' or 'raw', got {which!r}")
    # AF2 .npz / OpenFold checkpoint: converted for this model's configuration, shapes checked (a mismatch is
    # an error naming the tensor); heads the file lacks are reported below as missing
    imported = read_external_weights(path, as_preset(model.cfg, label), allow_missing=True)
    if imported is not None:
        weights = imported.state_dict
    else:
        weights = _protfold_weights(path, which)
    if not weights:
        raise ProtfoldInputError(path, "checkpoint holds no model weights")
    own = model.state_dict()
    take = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    mismatched = [(k, tuple(own[k].shape), tuple(v.shape)) for k, v in weights.items() if k in own and own[k].shape != v.shape]
    model.load_state_dict(take, strict=False)
    return FinetuneReport(
        source=str(path), loaded=len(take), missing=sorted(k for k in own if k not in weights),
        unexpected=sorted(k for k in weights if k not in own), mismatched=mismatched,
    )


def _protfold_weights(path: str, which: str) -> dict[str, Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise ProtfoldInputError(path, f"cannot read checkpoint: {err}") from None
    if which == "ema" and "ema" in ckpt:
        return dict(ckpt["ema"]["shadow"])
    return {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}


def load_module(path: str, *, map_location: Any = None, model_config: str | None = None) -> ProtfoldModule:
    """The module of a checkpoint written by `protfold fit` or `protfold convert`, or of AF2 / OpenFold
    weights given directly: then `model_config` (a preset or a JSON file of sizes; None: read from the file)
    chooses the model, and the EMA average starts from the imported weights."""
    imported = read_external_weights(path, model_config)
    if imported is None:
        read_checkpoint(path)  # a torch file that is no protfold checkpoint: one clear line, not Lightning's error
        # the checkpoint holds every weight: a fine-tuned run's `init_from` source is not read again (it may be gone)
        return ProtfoldModule.load_from_checkpoint(path, map_location=map_location, init_from=None)
    module = ProtfoldModule(preset=imported.config.preset, model_overrides=imported.config.overrides or None)
    module.model.load_state_dict(imported.state_dict)
    module.ema.reset()
    return module


def structure_scores(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """lDDT-Cα, Cα RMSD, GDT-TS, TM-score of the final structure, on observed residues only."""
    ca = 1  # atom37 index of CA
    pred = outputs["final_atom37"][..., ca, :].float()
    true = batch["all_atom_positions"][..., ca, :].float()
    mask = batch["all_atom_mask"][..., ca] * batch["seq_mask"]
    return {
        "lddt_ca": metrics.lddt(pred, true, mask, per_residue=False).mean(),
        "rmsd_ca": metrics.rmsd(pred, true, mask).mean(),
        "gdt_ts": metrics.gdt_ts(pred, true, mask).mean(),
        "tm": metrics.tm_score(pred, true, mask).mean(),
    }


__all__ = ["FinetuneReport", "NonFiniteStepsError", "ProtfoldModule", "load_module", "load_weights", "structure_scores",
           "warmup_step_decay"]
