"""Operations dispatched by one af2 training step, counted on the meta device (no data, no GPU, seconds).

    python3 scripts/op_count.py --crop 2048 --memory low [--set attention_chunk_mb=512] [--blocks 48 --extra-blocks 4]
        [--rows 128 --extra 1024 --recycles 0]

On a GPU each counted op is (about) one kernel launch plus its Python and dispatcher overhead, and the steps of
the memory modes that chunk are bound by that overhead, not by arithmetic. This counts every ATen op of the
forward (with `--recycles` no-grad passes), the loss and the backward (checkpoint recomputes included), except
view-like ops that launch no kernel. It does not count the host copies of `checkpoint_storage: cpu` (they run
in saved-tensor hooks that the meta device cannot follow, so the storage is kept on the device here), and it
runs without autocast (the meta device has none): a bf16 step adds the casts of autocast, about 20% more ops
(checked on the CPU), so per-op times derived from bf16 GPU steps and these counts are about 20% high.
Measured per-op times on the GPU turn counts into time predictions (docs/benchmarks.md, "How to measure").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import protfold.model.memory as memory
from protfold.bench.synthetic import synthetic_batch
from protfold.config import LossConfig, MemoryConfig, load_memory_preset, model_preset
from protfold.losses import alphafold_loss
from protfold.model.alphafold import AlphaFold

VIEWS = {"view", "detach", "t", "permute", "unsqueeze", "expand", "_unsafe_view", "slice", "select", "transpose",
         "as_strided", "split", "unbind", "squeeze", "alias", "split_with_sizes", "_reshape_alias", "reshape",
         "chunk", "narrow", "lift_fresh", "unfold", "diagonal", "movedim", "expand_as", "view_as"}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops by name, view-like ops left out."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.__name__.split(".")[0] not in VIEWS:
            self.by_name[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _meta_safe_islands() -> None:
    """fp32_island disables autocast for the tensor's device type, which the meta device does not have."""
    plain = memory.fp32_island

    def island(x: torch.Tensor) -> Any:
        return contextlib.nullcontext() if x.device.type == "meta" else plain(x)

    for module in list(sys.modules.values()):
        if getattr(module, "fp32_island", None) is plain:
            module.fp32_island = island


def _value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def count(*, crop: int, memory_name: str, sets: dict[str, Any], blocks: int, extra_blocks: int, rows: int,
          extra: int, recycles: int) -> tuple[int, collections.Counter[str]]:
    _meta_safe_islands()
    mem = dataclasses.replace(load_memory_preset(memory_name), **{**sets, "checkpoint_storage": "fp32"})
    cfg = model_preset("af2", n_evoformer_blocks=blocks, n_extra_msa_blocks=extra_blocks, max_crop=max(crop, 4096))
    meta = torch.device("meta")
    with meta:
        model = AlphaFold(cfg=cfg)
    batch = {k: v.to(meta) if isinstance(v, torch.Tensor) else v
             for k, v in synthetic_batch(crop, rows, extra, seed=0).items()}
    counter = OpCounter()
    with counter:
        out = model(batch, n_recycles=recycles, memory=mem)
        alphafold_loss(out, batch, LossConfig(), use_clamped_fape=True)[0].backward()
    return sum(counter.by_name.values()), counter.by_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--memory", default="low", help="a memory preset name or YAML path")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="MemoryConfig overrides")
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--extra-blocks", type=int, default=4)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--extra", type=int, default=1024)
    p.add_argument("--recycles", type=int, default=0)
    p.add_argument("--top", type=int, default=8, help="print the most frequent ops")
    args = p.parse_args(argv)
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        p.error(f"--set wants FIELD=VALUE, got {bad}")
    sets = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    fields = {f.name for f in dataclasses.fields(MemoryConfig)}
    if set(sets) - fields:
        p.error(f"--set: unknown MemoryConfig field(s) {sorted(set(sets) - fields)}; fields: {sorted(fields)}")
    start = time.perf_counter()
    try:
        total, by_name = count(crop=args.crop, memory_name=args.memory, sets=sets, blocks=args.blocks,
                               extra_blocks=args.extra_blocks, rows=args.rows, extra=args.extra,
                               recycles=args.recycles)
    except ValueError as err:  # a memory preset or YAML that does not load, or an invalid combination
        p.error(str(err))
    print(f"crop {args.crop} rows {args.rows} extra {args.extra} recycles {args.recycles} blocks {args.blocks}+"
          f"{args.extra_blocks} memory {args.memory} {sets or ''}: {total} ops ({time.perf_counter() - start:.0f} s)")
    print("  most frequent:", ", ".join(f"{name} {n}" for name, n in by_name.most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
