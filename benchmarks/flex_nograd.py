"""The af2 Evoformer stack's no-grad forward with FlexAttention: the blocks run eagerly and each attention calls the
separately compiled kernel (`primitives._flex_compiled`).

Written to test one explanation of session 5's slow no-grad `compiled_flex` (2.66 s against `compiled`'s 0.45 s at
crop 256): that dynamo's default shape handling, which recompiles the kernel with symbolic sizes once a second
shape arrives, made slow kernels. Session 6 refuted it: the compiled kernel is fast either way (0.31 s, static 0.38
s); the bench had run FlexAttention unfused (benchmarks/NOTES.md, "Session 6"). The variants, each from fresh
compile caches:
  naive:        the plain kernel (what `compiled` runs without grad)
  flex:         the kernel as protfold compiles it (default dynamic handling)
  flex_static:  the kernel compiled with dynamic=False, one static kernel per shape
On CUDA (`--device cpu` is a smoke run of the script). Usage (writes results.json there, prints a table):
  python benchmarks/flex_nograd.py --crops 256,512 --rows 128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

from protfold.config import MemoryConfig, ModelConfig, model_preset
from protfold.env import environment
from protfold.model import primitives
from protfold.model.evoformer import EvoformerStack
from protfold.model.memory import reset_compiled

VARIANTS = {"naive": ("naive", None), "flex": ("flex", None), "flex_static": ("flex", False)}


def measure(stack: EvoformerStack, cfg: ModelConfig, variant: str, crop: int, rows: int, steps: int,
            dev: torch.device) -> dict:
    attention, dynamic = VARIANTS[variant]
    reset_compiled()
    primitives._flex_compiled = torch.compile(flex_attention, dynamic=dynamic)
    mem = MemoryConfig(attention=attention)
    for sub in stack.modules():
        if hasattr(sub, "mem"):
            sub.mem = mem
    gen = torch.Generator(device=dev).manual_seed(0)
    m = torch.randn(1, rows, crop, cfg.c_m, device=dev, generator=gen)
    z = torch.randn(1, crop, crop, cfg.c_z, device=dev, generator=gen)
    masks = ((torch.rand(1, rows, crop, device=dev, generator=gen) > 0.05).float(),
             (torch.rand(1, crop, crop, device=dev, generator=gen) > 0.05).float())
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for i in range(steps + 2):  # two warm-up passes: compiling, then every shape seen twice
            if i == 2 and cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            out = stack(m, z, *masks)
            sync()
            times.append(time.perf_counter() - start)
    ref = out[0].float()
    return {"variant": variant, "crop": crop, "rows": rows, "step_s": sorted(times[2:])[len(times[2:]) // 2],
            "first_s": times[0], "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0, "out": ref}


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer is wanted, got {text!r}")
    return int(text)


def _positive_ints(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=_positive_ints, default="256,512", help="comma-separated crops")
    parser.add_argument("--rows", type=_positive_int, default=128)
    parser.add_argument("--blocks", type=_positive_int, default=48)
    parser.add_argument("--steps", type=_positive_int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of this "
                        "script (the kernel is compiled for the CPU, so its times say nothing about the GPU)")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda without a CUDA device")
    cfg = model_preset("af2", n_evoformer_blocks=args.blocks)
    torch.manual_seed(0)
    stack = EvoformerStack(cfg, mem=MemoryConfig()).to(dev).eval()
    with torch.no_grad():  # AF2's zero-initialised output projections would make every block an identity
        for p in stack.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    env = environment(dev, None)  # the command as run
    records = []
    print(f"# flex no-grad | card: {env['card']} | torch {env['torch']} | {env['date']}\n# command: {env['command']}")
    print(f"{'variant':<12} {'crop':>5} {'step s':>8} {'first s':>8} {'peak GiB':>9} {'max diff':>9}")
    for crop in args.crops:
        base = None
        for variant in VARIANTS:
            rec = measure(stack, cfg, variant, crop, args.rows, args.steps, dev)
            out = rec.pop("out")
            base = out if base is None else base
            rec["max_abs_diff_vs_naive"] = float((out - base).abs().max())
            records.append({**rec, **env})
            print(f"{variant:<12} {crop:>5} {rec['step_s']:>8.3f} {rec['first_s']:>8.1f} "
                  f"{rec['peak_bytes'] / 2**30:>9.2f} {rec['max_abs_diff_vs_naive']:>9.1e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
