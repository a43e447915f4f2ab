"""Where one no-grad in-place af2 Evoformer block spends its GPU time, by update (issue 17): the block of
`long_inference.py --part compare4096` (128 MSA rows, bf16 autocast, z in bf16 by default, planned for the block's
own shapes), one call under torch.profiler after one unprofiled call at the same length (kernels and cuBLAS
heuristics warm). Prints and writes `<out>/profile_<n>_<budget>.json`: per update (`run_block`'s profiler ranges)
the kernel time on the device, the host time of the range and the number of ops that launched kernels, and the ops
(aten names) with the most kernel time in each.

    python benchmarks/profile_block.py --n 4096 --out OUT                  # planned for the card (about 1 minute)
    python benchmarks/profile_block.py --n 4096 --budget_gib 6.5 --out OUT
    python benchmarks/profile_block.py --n 256 --device cpu --out /tmp/p   # a smoke test of the script (no GPU)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_inference import S, _inputs, stored_pair_dtype  # noqa: E402

from protfold.config import ATTENTION_KERNELS, model_preset  # noqa: E402
from protfold.model.evoformer import EvoformerBlock  # noqa: E402
from protfold.model.inference_plan import plan_inference  # noqa: E402
from protfold.model.plan import resolve  # noqa: E402

GiB = 2**30


def by_update(prof: profile) -> dict[str, dict]:
    """Kernel time of the ops inside each `update:<name>` range (each kernel counted once, with the op that
    launched it), the range's host time, and the 6 ops with the most kernel time."""
    events = prof.events()
    ranges = sorted((e.time_range.start, e.time_range.end, e.name.split(":", 1)[1]) for e in events
                    if e.name.startswith("update:"))
    out: dict[str, dict] = {name: {"device_s": 0.0, "host_s": (end - start) / 1e6, "ops_with_kernels": 0,
                                   "top_ops": collections.Counter()} for start, end, name in ranges}
    for e in events:
        dev_us = getattr(e, "self_device_time_total", 0) or 0
        if dev_us <= 0 or e.name.startswith("update:"):
            continue
        name = next((n for s, t, n in ranges if s <= e.time_range.start <= t), "outside updates")
        rec = out.setdefault(name, {"device_s": 0.0, "host_s": 0.0, "ops_with_kernels": 0,
                                    "top_ops": collections.Counter()})
        rec["device_s"] += dev_us / 1e6
        rec["ops_with_kernels"] += 1
        rec["top_ops"][e.name] += dev_us / 1e6
    for rec in out.values():
        rec["top_ops"] = {k: round(v, 4) for k, v in rec["top_ops"].most_common(6)}
        rec["device_s"], rec["host_s"] = round(rec["device_s"], 4), round(rec["host_s"], 4)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--budget_gib", type=float, default=None, help="plan for this budget (default: free memory)")
    ap.add_argument("--pair_dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--attention", choices=ATTENTION_KERNELS, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.n < 1 or (args.budget_gib is not None and args.budget_gib <= 0):
        raise SystemExit(f"profile_block.py: --n must be >= 1 and --budget_gib > 0; got {args.n}, {args.budget_gib}")
    dev = torch.device(args.device)
    cfg = model_preset("af2_ptm")
    pair_dtype = getattr(torch, args.pair_dtype)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 64 * GiB
    budget = int(args.budget_gib * GiB) if args.budget_gib else free
    mem, predicted, text = plan_inference(args.n, S, 0, budget, cfg, torch.bfloat16, pair_dtype,
                                          attention=args.attention or "naive")
    pair_dtype = stored_pair_dtype(mem, pair_dtype)
    plan = resolve(mem, grad=False, device=dev)
    block = EvoformerBlock.from_config(cfg).to(dev).eval()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])

    def call() -> float:
        args_ = _inputs("block", args.n, cfg, dev, pair_dtype)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            block(*args_, plan=plan, inplace=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = call()
    with profile(activities=activities) as prof:
        profiled = call()
    result = {"n_res": args.n, "plan": text, "attention": plan.attention, "pair_dtype": args.pair_dtype,
              "unprofiled_call_s": round(warm, 3), "profiled_call_s": round(profiled, 3), "updates": by_update(prof)}
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"{args.budget_gib:g}GiB" if args.budget_gib else "card"
    path = args.out / f"profile_{args.n}_{label}_{plan.attention}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
