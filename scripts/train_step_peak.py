"""Where the bytes of one training step go, on CPU: peak live bytes per phase of forward + loss + backward.

    OMP_NUM_THREADS=1 python3 scripts/train_step_peak.py [--crop 256 --rows 128 --extra 1024 --blocks 2]
        [--memory low] [--set attention_chunk_mb=128 ...] [--cpu-autocast]

The af2-width network with `--blocks` Evoformer blocks (the per-block transient does not depend on the count),
one no-grad recycle, then the grad pass, `alphafold_loss` (default LossConfig, FAPE clamped) and backward, under
bf16 autocast on the CPU. Measured with a TorchDispatchMode like `protfold.model.memory.peak_new_bytes`: bytes
of storages created by ATen ops and still alive. Not counted: weights, Adam moments, the batch (all resident
before the step) and the gradients, which are allocated before the step (backward then adds into them in
place), so the printed numbers are the step's transient above the resident state.

GPU emulation (default; `--cpu-autocast` turns it off):
- CUDA autocast runs layer_norm, softmax, log_softmax, sum, exp, log, pow, ... in fp32 (their outputs are fp32),
  CPU autocast keeps them in bf16. A TorchFunctionMode up-casts the bf16 inputs of those ops to fp32 while
  autocast is on, so the CPU sees the CUDA dtypes.
- `checkpoint_storage: cpu` copies block boundaries to host memory on a GPU; on a CPU they are the same
  tensors. The pack hook is replaced by an uncounted copy ("host memory"); unpacking makes a counted copy (the
  host-to-device copy on a GPU).
Printed per phase: the live bytes when the phase starts and the peak inside it (MiB); backward phases are
named after the forward piece whose outputs' gradient starts them (checkpoint recomputes count in backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch
import yaml
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import protfold.losses as losses
import protfold.model.memory as memory
from protfold.bench.synthetic import synthetic_batch
from protfold.config import LossConfig, MemoryConfig, OptimConfig, load_memory_preset, model_preset
from protfold.model.alphafold import AlphaFold

MiB = 2**20

# Ops that CUDA autocast runs in fp32 (torch's CUDA autocast fp32 list, the ones this model calls).
_CUDA_FP32 = {
    "layer_norm", "softmax", "log_softmax", "sum", "exp", "log", "pow", "__pow__", "__rpow__", "cumsum", "prod",
    "softplus", "rsqrt", "reciprocal", "norm", "cdist", "logsumexp", "cross_entropy", "nll_loss", "mse_loss",
    "binary_cross_entropy_with_logits",
}


class CudaAutocastDtypes(TorchFunctionMode):
    """While CPU autocast is on, run the CUDA-autocast fp32 ops on fp32 copies of their bf16 inputs."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _CUDA_FP32 and torch.is_autocast_enabled("cpu"):
            def up(x: Any) -> Any:
                return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x

            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class Tracker(memory._LiveBytes):
    """Live bytes of storages created while active (the meter of `peak_new_bytes`); peak per phase label."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__(existing)
        self.paused = False
        self.label = "start"
        self.phases: dict[str, list[int]] = {}  # label -> [live at first entry, peak]
        self.order: list[str] = []

    def set_label(self, label: str) -> None:
        self.label = label
        if label not in self.phases:
            self.phases[label] = [self.current, self.current]
            self.order.append(label)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.track(out)
        return out

    def _counted(self, n: int) -> None:
        ph = self.phases.setdefault(self.label, [self.current - n, self.current])
        ph[1] = max(ph[1], self.current)


TRACKER: Tracker | None = None
IN_BACKWARD = False


def emulate_cuda_dtypes_in_recompute() -> None:
    """The TorchFunctionMode is not active inside the autograd engine: re-enter it in checkpoint recomputes."""
    plain = memory.checkpoint

    def checkpoint(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def run(*a: Any) -> Any:
            with CudaAutocastDtypes():
                return fn(*a)

        return plain(run, *args, **kwargs)

    memory.checkpoint = checkpoint  # type: ignore[assignment]


def emulate_host_offload() -> None:
    """checkpoint_storage 'cpu' on a CPU: the packed copy is host memory (uncounted), unpack is a counted copy."""

    def pack(t: torch.Tensor) -> Any:
        if t.requires_grad:
            assert TRACKER is not None
            TRACKER.paused = True
            try:
                host = t.detach().clone()
            finally:
                TRACKER.paused = False
            return ("host", host)
        return ("ref", t)

    def unpack(packed: Any) -> torch.Tensor:
        return packed[1].clone() if packed[0] == "host" else packed[1]

    memory._pack_cpu = pack  # type: ignore[assignment]
    memory._unpack = unpack  # type: ignore[assignment]


def _grad_label(out: Any, label: str) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, label=label: (TRACKER.set_label(label), None)[1])  # type: ignore[union-attr]


def label_module(module: torch.nn.Module, name: str) -> None:
    def pre(mod: Any, args: Any) -> None:
        if TRACKER is not None and not IN_BACKWARD:
            TRACKER.set_label(("fwd " if torch.is_grad_enabled() else "no-grad recycle ") + name)

    def post(mod: Any, args: Any, out: Any) -> None:
        if TRACKER is not None and not IN_BACKWARD:
            _grad_label(out, "bwd " + name)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def label_losses() -> None:
    for name in ("backbone_fape_loss", "_sidechain_term", "torsion_angle_loss", "distogram_loss", "masked_msa_loss",
                 "plddt_loss", "experimentally_resolved_loss", "violation_loss"):
        fn = getattr(losses, name)

        def wrapped(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            if TRACKER is not None:
                TRACKER.set_label("loss " + _name)
            out = _fn(*a, **k)
            _grad_label(out, "bwd loss " + _name)
            return out

        setattr(losses, name, wrapped)


def main() -> None:
    global TRACKER, IN_BACKWARD
    p = argparse.ArgumentParser()
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--extra", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--recycles", type=int, default=1)
    p.add_argument("--memory", default="low")
    p.add_argument("--set", nargs="*", default=[], help="MemoryConfig overrides, field=value (yaml values)")
    p.add_argument("--cpu-autocast", action="store_true", help="no CUDA dtype emulation")
    args = p.parse_args()
    torch.set_num_threads(1)

    fields = dataclasses.asdict(load_memory_preset(args.memory))
    for item in args.set:
        key, value = item.split("=", 1)
        fields[key] = yaml.safe_load(value)
    mem = MemoryConfig(**fields)
    cfg = model_preset("af2", n_evoformer_blocks=args.blocks)
    torch.manual_seed(0)
    model = AlphaFold(cfg=cfg, mem=mem).train()
    for name in ("input_embedder", "recycling_embedder", "extra_msa_embedder", "extra_msa_stack", "evoformer",
                 "structure_module", "heads"):
        label_module(getattr(model, name), name)
    label_losses()
    emulate_host_offload()
    batch = synthetic_batch(args.crop, args.rows, args.extra)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=OptimConfig().lr)
    for q in params:
        q.grad = torch.zeros_like(q)
    opt.step()  # Adam state allocated; grads stay allocated: backward accumulates into them in place
    for q in params:
        q.grad.zero_()
    existing = [*params, *(q.grad for q in params), *(v for st in opt.state.values() for v in st.values()),
                *(v for v in batch.values() if isinstance(v, torch.Tensor))]
    batch_bytes = sum(v.untyped_storage().nbytes() for v in batch.values() if isinstance(v, torch.Tensor))
    TRACKER = Tracker({t.untyped_storage().data_ptr() for t in existing})
    emu = CudaAutocastDtypes() if not args.cpu_autocast else None
    if emu is not None:
        emulate_cuda_dtypes_in_recompute()
    t0 = time.perf_counter()
    with TRACKER:
        if emu is not None:
            emu.__enter__()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(batch, n_recycles=args.recycles)
                loss, _ = losses.alphafold_loss(out, batch, LossConfig(), use_clamped_fape=True)
            TRACKER.set_label("end of loss")
            IN_BACKWARD = True
            TRACKER.set_label("bwd start")
            loss.backward()
            IN_BACKWARD = False
            del out, loss
            TRACKER.set_label("after backward")
        finally:
            if emu is not None:
                emu.__exit__(None, None, None)
    wall = time.perf_counter() - t0
    n_params = sum(q.numel() for q in params)
    print(f"memory: {dataclasses.asdict(mem)}  extra: {'cpu autocast' if args.cpu_autocast else 'CUDA dtypes'}")
    print(f"af2 width, {args.blocks} Evoformer blocks ({n_params:,} params), crop {args.crop}, rows {args.rows}, "
          f"extra {args.extra}, recycles {args.recycles}; batch {batch_bytes / MiB:.0f} MiB; {wall:.0f} s")
    print(f"{'phase':42s} {'live at start':>14s} {'peak':>10s}")
    for label in TRACKER.order:
        start, peak = TRACKER.phases[label]
        print(f"{label:42s} {start / MiB:12.0f}   {peak / MiB:9.0f}")
    print(f"STEP PEAK above resident (weights, grads, Adam, batch): {TRACKER.peak / MiB:.0f} MiB "
          f"= {TRACKER.peak / 2**30:.3f} GiB")


if __name__ == "__main__":
    main()
