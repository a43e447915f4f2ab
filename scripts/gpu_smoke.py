"""GPU smoke test + first numbers: the `af2` preset's training step (forward, loss, backward, Adam) in bf16.

Usage: python3 scripts/gpu_smoke.py [--crop 256] [--rows 128] [--extra 1024] [--modes none,low] [--recycles 1]
Prints one line per mode: peak memory (torch.cuda.max_memory_allocated), median step time (CUDA-synchronised
wall clock over the timed steps after one warm-up step), and the loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protfold.bench.synthetic import synthetic_batch  # noqa: E402
from protfold.config import LossConfig, load_memory_preset, model_preset  # noqa: E402
from protfold.losses import alphafold_loss  # noqa: E402
from protfold.model.alphafold import AlphaFold, parameter_count  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="af2")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--extra", type=int, default=1024)
    p.add_argument("--modes", default="none,low")
    p.add_argument("--recycles", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = model_preset(args.preset)
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in synthetic_batch(args.crop, args.rows, args.extra).items()}
    records = []
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        model = AlphaFold(cfg=cfg, mem=load_memory_preset(mode)).to(dev).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-6)
        times, loss_value = [], float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            for step in range(args.steps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(batch, n_recycles=args.recycles)
                    loss, _ = alphafold_loss(out, batch, LossConfig(), use_clamped_fape=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if step > 0:
                    times.append(time.perf_counter() - t0)
                loss_value = float(loss)
                del out, loss
            status = "ok"
        except torch.OutOfMemoryError:
            status = "oom"
        rec = {"mode": mode, "crop": args.crop, "rows": args.rows, "extra": args.extra, "recycles": args.recycles,
               "status": status, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "step_s": statistics.median(times) if times else None, "loss": loss_value,
               "params": parameter_count(model), "card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": str(date.today()), "command": " ".join(sys.argv)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del model, opt
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
