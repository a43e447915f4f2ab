"""What is measured for one memory mode: the full training step, the Evoformer stack alone, one block's inference.

Each `run_*` function runs its module with the given `MemoryConfig`, from the shared weights, and returns a
`ModeResult`: the record fields it measured plus what the runner needs to compare modes (loss, gradients or
outputs, kept on the CPU). Out-of-memory errors are caught per phase (training, inference) and reported as
status "oom"; the caller frees memory afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from protfold.bench.measure import Peak, failure, free_memory, median, peak_of, resident_bytes, saved_bytes, timed_peak
from protfold.bench.peak_sites import record_peak_sites
from protfold.config import LossConfig, MemoryConfig, ModelConfig, OptimConfig
from protfold.model.alphafold import AlphaFold
from protfold.model.evoformer import EvoformerBlock, EvoformerStack
from protfold.model.memory import reset_compiled
from protfold.model.plan import resolve
from protfold.train.ema import EMA
from protfold.train.step import adam, clip_and_step, freeze_unused_heads, training_loss

__all__ = ["KINDS", "ModeResult", "Network", "Point", "Settings", "probe_peak", "run_mode"]

KINDS = ("train", "evoformer", "inference_block")


@dataclass(frozen=True)
class Point:
    """One shape / precision point of the sweep."""

    kind: str  # one of KINDS
    preset: str
    precision: str  # "fp32" | "bf16"
    crop: int
    rows: int
    extra_rows: int
    recycles: int = 0


@dataclass(frozen=True)
class Settings:
    device: torch.device
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    infer: bool = True
    infer_steps: int | None = None  # timed inference calls (default: `steps`)
    block_owns_inputs: bool = False  # inference block: hand m, z over (inplace=True), as a block inside a stack
    peak_sites: bool = False  # CUDA: one more training step with the allocator history, summarised by site
    optim: OptimConfig = OptimConfig()  # optimizer state kind and EMA storage of training steps (as in fit)


@dataclass
class ModeResult:
    fields: dict[str, Any]
    loss: Tensor | None = None
    grads: dict[str, Tensor] = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list)


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bf16: torch.autocast(device type, bfloat16); fp32: autocast off."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _module(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "train":
        model = AlphaFold(cfg=cfg)
        freeze_unused_heads(model, LossConfig())  # the parameters `protfold fit` trains at the bench's loss weights
        return model
    if kind == "evoformer":
        return EvoformerStack(cfg)
    return EvoformerBlock.from_config(cfg)


@dataclass
class Network:
    """The measured module, built once per preset (fixed seed) and kept on the device, and its initial weights
    (on the CPU). Every mode starts from `reset(mem)`: the same weights; its memory settings are passed on each
    call."""

    kind: str
    cfg: ModelConfig
    module: nn.Module
    state: dict[str, Tensor]
    last_run: tuple[Any, ...] | None = None  # `reset`'s key of the previous run

    @classmethod
    def build(cls, kind: str, cfg: ModelConfig, *, seed: int, device: torch.device) -> Network:
        torch.manual_seed(seed)
        module = _module(kind, cfg)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls(kind=kind, cfg=cfg, module=module.to(device), state=state)

    def reset(self, mem: MemoryConfig, key: tuple[Any, ...] | None = None) -> nn.Module:
        """Restore the initial weights. A compiled mode starts from fresh compile caches (`reset_compiled`): its
        first step compiles for its own settings only. Except when the previous run had the same `key` (not
        None): the same memory settings at the same point, differing at most in what the compiled blocks never
        see (the optimizer's state kind, the EMA's storage, both outside the graphs). Its graphs are the ones
        this run would compile, so it keeps them and skips the compile.
        """
        if mem.compile_blocks and (key is None or key != self.last_run):
            reset_compiled()
        self.last_run = key
        self.module.load_state_dict(self.state)
        self.module.zero_grad(set_to_none=True)
        return self.module


def _evo_inputs(cfg: ModelConfig, point: Point, device: torch.device, dtype: torch.dtype, grad: bool,
                seed: int) -> dict[str, Tensor]:
    """Random m [1, S, N, c_m], z [1, N, N, c_z] (drawn on the device) and all-ones masks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s, n = point.rows, point.crop
    m = torch.randn(1, s, n, cfg.c_m, device=device, generator=gen).to(dtype).requires_grad_(grad)
    z = torch.randn(1, n, n, cfg.c_z, device=device, generator=gen).to(dtype).requires_grad_(grad)
    return {"m": m, "z": z, "msa_mask": torch.ones(1, s, n, device=device, dtype=dtype),
            "pair_mask": torch.ones(1, n, n, device=device, dtype=dtype)}


def _oom_guard(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", fn()) or ("oom", None); the exception (and the frames holding tensors) is dropped on return."""
    try:
        return "ok", fn()
    except torch.OutOfMemoryError:
        return "oom", None


class _Trainer:
    """A training-style step on `module`: forward + loss + backward (+ the clipped Adam update of
    `protfold fit`, `protfold.train.step`, when `optimize`)."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[], Tensor], leaves: list[Tensor], *,
                 optimize: bool, optim: OptimConfig = OptimConfig()) -> None:
        self.module, self.loss_fn, self.leaves = module, loss_fn, leaves
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = None
        self.ema: EMA | None = None
        self.optim = optim
        self._hooks_before = [set(getattr(p, "_post_accumulate_grad_hooks", None) or ()) for p in self.params]
        if optimize:
            try:
                self.opt = adam(self.params, optim)
                self.ema = EMA(module, decay=optim.ema_decay, storage=optim.ema_storage)  # in the peak, as in fit
                self._prime()
            except BaseException:  # out of memory while priming, say: the hooks go with the failed trainer
                self.release()
                raise

    def _prime(self) -> None:
        """Allocate Adam's state with an all-zero gradient (an exact no-op update), so every measured step,
        the first one included, sees the steady-state memory of weights + optimizer state."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt.step()  # type: ignore[union-attr]
        self.module.zero_grad(set_to_none=True)

    def release(self) -> None:
        """Remove the gradient hooks the optimizer put on the parameters. Host offload (torchao's
        CPUOffloadOptimizer) registers one per large parameter and drops the handle: on the network every mode
        shares, the hook would outlive the run, keep the old optimizer's host copies alive and copy every later
        run's gradients to the host, in that run's step time."""
        for p, before in zip(self.params, self._hooks_before):
            hooks = getattr(p, "_post_accumulate_grad_hooks", None)
            for key in [k for k in hooks or () if k not in before]:
                del hooks[key]

    def _finish(self) -> None:
        if self.opt is not None:
            clip_and_step(self.opt, self.params, self.optim.grad_clip)
            self.ema.update()  # type: ignore[union-attr]
        self.module.zero_grad(set_to_none=True)
        for t in self.leaves:
            t.grad = None

    def step(self) -> None:
        self.loss_fn().backward()
        self._finish()

    def reference_step(self, seed: int) -> tuple[Tensor, dict[str, Tensor], int]:
        """A seeded step (dropout masks identical across modes) that also counts saved activation bytes and
        returns (loss, gradients before clipping, saved bytes), copied to the CPU."""
        torch.manual_seed(seed)
        loss, n_saved = saved_bytes(self.loss_fn)
        loss.backward()
        grads = {name: p.grad.detach().to("cpu", copy=True) for name, p in self.module.named_parameters()
                 if p.grad is not None}
        value = loss.detach().to("cpu", copy=True)
        del loss
        self._finish()
        return value, grads, n_saved


def _train_phase(trainer: _Trainer, s: Settings, resident: Callable[[], int]) -> dict[str, Any]:
    loss, grads, n_saved = trainer.reference_step(s.seed)  # counts as the first warm-up step
    times, peak = timed_peak(trainer.step, s.device, steps=s.steps, warmup=max(s.warmup - 1, 0), resident=resident)
    return {"loss": loss, "grads": grads, "saved": n_saved, "times": times, "peak": peak}


def _infer_phase(forward: Callable[[], Any], s: Settings, resident: Callable[[], int], *,
                 keep: bool) -> dict[str, Any]:
    """A first (untimed, seeded) call whose outputs are copied to the CPU when `keep`, then timed calls that
    drop their outputs at once (so no step's peak holds the previous step's outputs)."""
    torch.manual_seed(s.seed)
    with torch.no_grad():
        out = forward()
        kept = [o.detach().float().cpu() for o in out] if keep else []
        del out

    def step() -> None:
        with torch.no_grad():
            forward()

    n = s.steps if s.infer_steps is None else s.infer_steps
    times, peak = timed_peak(step, s.device, steps=max(n, 1), warmup=max(s.warmup - 1, 0),
                             resident=resident)
    return {"times": times, "peak": peak, "out": kept}


def _peak_fields(prefix: str, peak: Peak | None, times: list[float] | None) -> dict[str, Any]:
    return {
        f"{prefix}peak_bytes": peak.absolute if peak else None,
        f"{prefix}peak_above_start_bytes": peak.above_start if peak else None,
        f"{prefix}time_s" if prefix else "step_time_s": median(times) if times else None,
        f"{prefix}times_s" if prefix else "step_times_s": times,
    }


class _Job:
    """One mode at one point: the reset module, its inputs (on the device), and the forward and loss calls."""

    def __init__(self, point: Point, mem: MemoryConfig, net: Network, s: Settings, batch: dict | None) -> None:
        self.point, self.s, self.mem = point, s, mem
        self.module = net.reset(mem, key=(point, mem))
        self.block = point.kind == "inference_block"
        dtype = torch.bfloat16 if point.precision == "bf16" and self.block else torch.float32
        self.inputs = batch if point.kind == "train" else _evo_inputs(
            net.cfg, point, s.device, dtype, grad=point.kind == "evoformer", seed=s.seed + 1)
        self.leaves = [t for t in self.inputs.values() if isinstance(t, Tensor) and t.requires_grad]

    def forward(self) -> Any:
        with autocast(self.s.device, self.point.precision):
            if self.point.kind == "train":
                return self.module(self.inputs, n_recycles=self.point.recycles, memory=self.mem)
            owns = {"inplace": self.s.block_owns_inputs} if self.block else {}
            plan = resolve(self.mem, grad=torch.is_grad_enabled(), device=self.s.device)
            return self.module(self.inputs["m"], self.inputs["z"], self.inputs["msa_mask"], self.inputs["pair_mask"],
                               plan=plan, **owns)

    def loss(self) -> Tensor:
        """kind "train": `protfold fit`'s step (`training_loss`) with the default loss weights, FAPE clamped and
        `point.recycles` recycling passes; otherwise the mean square of the outputs."""
        if self.point.kind == "train":
            with autocast(self.s.device, self.point.precision):
                return training_loss(self.module, self.inputs, n_recycles=self.point.recycles, loss_cfg=LossConfig(),
                                     clamped_fape=True, memory=self.mem)[0]
        out = self.forward()
        with autocast(self.s.device, self.point.precision):
            return sum(o.float().square().mean() for o in out)

    def trainer(self) -> _Trainer:
        self.module.train()
        return _Trainer(self.module, self.loss, self.leaves, optimize=self.point.kind == "train", optim=self.s.optim)

    def to_inference(self) -> None:
        self.module.eval()
        self.module.zero_grad(set_to_none=True)
        for t in self.leaves:
            t.requires_grad_(False)
            t.grad = None

    def resident(self, opt: torch.optim.Optimizer | None = None) -> int:
        return resident_bytes(self.module, opt, self.inputs)

    def close(self) -> None:
        self.module.zero_grad(set_to_none=True)
        del self.module, self.inputs, self.leaves
        free_memory(self.s.device)


def _run_train_phase(job: _Job) -> dict[str, Any]:
    trainer = job.trainer()
    try:
        trained = _train_phase(trainer, job.s, lambda: job.resident(trainer.opt))
        if job.s.peak_sites:  # after the timed steps, so the history's cost is in no timing
            trained["peak_sites"] = _peak_sites(trainer.step, job.s.device)
    finally:
        trainer.release()
    return trained


def _peak_sites(step: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """The recorded step's summary, or {"error": ...} when it fails: the measured step stands either way."""
    try:
        return record_peak_sites(step, device)
    except Exception as exc:  # noqa: BLE001 - out of memory included: the record keeps the timed steps' figures
        return {"error": failure(exc, "recording the peak sites", device)}


def _train_fields(job: _Job, result: ModeResult) -> None:
    status, trained = _oom_guard(lambda: _run_train_phase(job))  # the trainer (and Adam state) dies with it
    free_memory(job.s.device)
    result.fields.update(status=status, saved_bytes=trained["saved"] if trained else None)
    result.fields.update(_peak_fields("", trained["peak"] if trained else None, trained and trained["times"]))
    if trained:
        result.loss, result.grads = trained["loss"], trained["grads"]
        result.fields["loss"] = float(trained["loss"])
        if "peak_sites" in trained:
            result.fields["peak_sites"] = trained["peak_sites"]


def _infer_fields(job: _Job, result: ModeResult) -> None:
    job.to_inference()
    status, inferred = _oom_guard(lambda: _infer_phase(job.forward, job.s, job.resident, keep=job.block))
    fields = _peak_fields("infer_", inferred["peak"] if inferred else None, inferred and inferred["times"])
    result.fields.update(infer_status=status, **fields)
    if job.block:  # for this kind the measured step *is* the inference call
        result.fields.update(status=status, saved_bytes=0, loss=None)
        result.fields.update(_peak_fields("", inferred["peak"] if inferred else None, inferred and inferred["times"]))
        result.outputs = inferred["out"] if inferred else []


def run_mode(point: Point, mem: MemoryConfig, net: Network, s: Settings, batch: dict | None = None) -> ModeResult:
    """Measure one mode at one point: the training phase (not for "inference_block"), then inference (unless
    `s.infer` is off). `batch` (already on the device) is needed for kind "train"."""
    job = _Job(point, mem, net, s, batch)
    result = ModeResult(fields={"n_params": sum(p.numel() for p in job.module.parameters()),
                                "status": "skipped", "infer_status": "skipped"})
    if not job.block:
        _train_fields(job, result)
    if s.infer or job.block:
        _infer_fields(job, result)
    job.close()
    return result


def probe_peak(point: Point, mem: MemoryConfig, net: Network, s: Settings, batch: dict | None = None) -> int | None:
    """Absolute peak bytes of one measured step (training, or the no-grad call for "inference_block"), with
    Adam's state already allocated; None when it runs out of memory. Used by the budget search."""
    job = _Job(point, mem, net, s, batch)

    def measure() -> Peak:
        if job.block:
            job.to_inference()

            def call() -> None:
                with torch.no_grad():
                    job.forward()

            return peak_of(call, s.device, resident=job.resident)
        trainer = job.trainer()
        try:
            return peak_of(trainer.step, s.device, resident=lambda: job.resident(trainer.opt))
        finally:
            trainer.release()

    status, peak = _oom_guard(measure)
    job.close()
    return peak.absolute if status == "ok" else None
