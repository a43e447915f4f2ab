"""OpenFold's Evoformer block at long lengths, no grad, as in ../shared/docs/OPENFOLD_BASELINE.md's inference
table: one af2-size block in pure bf16 (weights and inputs), eval mode, `chunk_size=4`, `inplace_safe=True`
(its in-place low-memory triangle updates), 128 MSA rows; peak = `torch.cuda.max_memory_allocated` (inputs
included), time of one call after one warm-up call at 256 residues. For the same-call comparison with
`benchmarks/long_inference.py --part compare4096`.

    PYTHONPATH=.bench python benchmarks/openfold_block.py --shims .bench/openfold_bench --lengths 4096 \
        --out OUT/openfold_block.json

Needs OpenFold's `openfold` package (commit ce0029e, see ../shared/bench/openfold/README.md) on PYTHONPATH and
the folder of that README's `of_step.py` (`--shims`), whose import shims it reuses (Bio / modelcif stubs, the
scipy-free initialiser); nothing of OpenFold's runs outside the timed block call.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

GiB = 2**30


def build_block(device: torch.device):
    from openfold.config import model_config
    from openfold.model.evoformer import EvoformerStack

    stack_cfg = model_config("model_1", train=False, low_prec=True).model.evoformer_stack
    stack_cfg.no_blocks = 1
    stack = EvoformerStack(**stack_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in stack.parameters():  # no zero-initialised layer: every update contributes
            p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.02))
    return stack.blocks[0].to(device=device, dtype=torch.bfloat16).eval(), stack_cfg


@torch.no_grad()
def measure(block, cfg, n: int, rows: int, chunk: int, device: torch.device) -> dict:
    m = torch.randn(1, rows, n, cfg.c_m, device=device, dtype=torch.bfloat16)
    z = torch.randn(1, n, n, cfg.c_z, device=device, dtype=torch.bfloat16)
    msa_mask = torch.ones(1, rows, n, device=device, dtype=torch.bfloat16)
    pair_mask = torch.ones(1, n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    block(m, z, msa_mask, pair_mask, chunk_size=chunk, inplace_safe=True, _mask_trans=True)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    return {"n_res": n, "rows": rows, "chunk_size": chunk, "time_s": round(seconds, 3),
            "peak_gib": peak and round(peak, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shims", type=Path, required=True, help="folder holding ../shared/bench/openfold/of_step.py")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not (args.shims / "of_step.py").is_file():
        raise SystemExit(f"openfold_block.py: {args.shims}: no of_step.py there (--shims names the folder of "
                         "../shared/bench/openfold/of_step.py)")
    if min(args.lengths) < 1 or args.rows < 1 or args.chunk < 1:
        raise SystemExit("openfold_block.py: --lengths, --rows and --chunk must be >= 1")
    try:
        importlib.import_module("openfold")
    except ImportError as err:
        raise SystemExit(f"openfold_block.py: OpenFold's package is not importable ({err}); put the folder holding "
                         "openfold/ on PYTHONPATH") from None
    sys.path.insert(0, str(args.shims))
    of_step = importlib.import_module("of_step")
    of_step._stub_modules()
    of_step.setup_attn_core(None, allow_stub=True)  # the Evoformer block does not call it
    of_step.patch_truncnorm()
    device = torch.device(args.device)
    block, cfg = build_block(device)
    measure(block, cfg, 256, args.rows, args.chunk, device)  # warm-up
    records = []
    for n in args.lengths:
        records.append(measure(block, cfg, n, args.rows, args.chunk, device))
        print(json.dumps(records[-1]), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"openfold": "ce0029e", "torch": torch.__version__,
                                            "card": torch.cuda.get_device_name(device) if device.type == "cuda"
                                            else "cpu", "records": records}, indent=1))


if __name__ == "__main__":
    main()
