"""Profile one af2 training step (bf16, no recycle) per memory mode on CUDA: wall time, kernel time and kernel
launches, and the top ops by kernel time. Usage: python3 scripts/gpu_profile_step.py CROP MODE[,MODE...]
(memory preset names or YAML paths). 128 MSA rows, 1024 extra rows, synthetic inputs."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from protfold.bench.synthetic import synthetic_batch
from protfold.config import LossConfig, load_memory_preset, model_preset
from protfold.losses import alphafold_loss
from protfold.model.alphafold import AlphaFold


def main() -> None:
    dev = torch.device("cuda")
    crop, modes = int(sys.argv[1]), sys.argv[2].split(",")
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in synthetic_batch(crop, 128, 1024).items()}
    cfg = model_preset("af2")

    def step(model: AlphaFold) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch, n_recycles=0)
            loss, _ = alphafold_loss(out, batch, LossConfig(), use_clamped_fape=True)
        loss.backward()

    for mode in modes:
        torch.manual_seed(0)
        model = AlphaFold(cfg=cfg, mem=load_memory_preset(mode)).to(dev).train()
        step(model)
        torch.cuda.synchronize()
        t = time.perf_counter()
        step(model)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(model)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        kernel_s = sum(e.self_device_time_total for e in ka) / 1e6
        launches = sum(e.count for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"=== {mode}: wall {wall:.2f}s  kernel time {kernel_s:.2f}s  kernels {launches}")
        print(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
