"""protfold's attention kernels side by side, module by module, at af2 widths (issues 15 and 17).

Modules: triangle attention (starting node: c_z 128, 4 heads of 32, the pair bias [H, N, N] shared by the N rows)
and MSA row attention with the pair bias (c_m 256, 8 heads of 32, `--rows` MSA rows sharing the bias). Kernels:
`naive`, `flex` (FlexAttention, compiled), `triton` (protfold.model.kernels.attention), and for triangle attention
`cueq` (cuEquivariance's, `memory.triangle_kernel: cueq`; skipped where it is not installed). Each (module, kernel,
length) is timed for one training step of the module (forward + backward, bf16 autocast, fp32 weights) and for a
no-grad forward: median of `--steps` calls after 2 warm-up calls (CUDA events), peak memory above the inputs and
weights (`torch.cuda.max_memory_allocated`). A kernel that runs out of memory is recorded as such. Prints a table
and writes `<out>/attention_kernels.json` with the card, torch version, command and date.

    python benchmarks/attention_kernels.py --lengths 256 384 512 768 1024 --out OUT
    python benchmarks/attention_kernels.py --lengths 2048 4096 --no_train --out OUT      # inference lengths
    python benchmarks/attention_kernels.py --device cpu --lengths 24 --kernels naive --out /tmp/a   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from protfold.config import MemoryConfig
from protfold.env import environment
from protfold.model.evoformer import MSARowAttentionWithPairBias
from protfold.model.plan import resolve
from protfold.model.triangle import TriangleAttention

GiB = 2**30
KERNELS = ("naive", "flex", "triton", "cueq")


def _memory(kernel: str) -> MemoryConfig:
    return MemoryConfig(triangle_kernel="cueq") if kernel == "cueq" else MemoryConfig(attention=kernel)


def _module(kind: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "triangle":
        mod = TriangleAttention(c_z=128, c_hidden=32, n_heads=4, starting=True)
    else:
        mod = MSARowAttentionWithPairBias(c_m=256, c_z=128, n_heads=8, c_hidden=32)
    with torch.no_grad():  # non-zero gates and output projections, as in a trained model
        for p in mod.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mod.to(device)


def _inputs(kind: str, n: int, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(1, n, n, 128, device=device, generator=gen)
    out = {"z": z, "pair_mask": (torch.rand(1, n, n, device=device, generator=gen) > 0.1).float()}
    if kind == "msa_row":
        out["m"] = torch.randn(1, rows, n, 256, device=device, generator=gen)
        out["msa_mask"] = (torch.rand(1, rows, n, device=device, generator=gen) > 0.1).float()
    return out


def _call(kind: str, mod: torch.nn.Module, x: dict[str, torch.Tensor], mem: MemoryConfig, device: torch.device):
    plan = resolve(mem, grad=torch.is_grad_enabled(), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if kind == "triangle":
            return mod(x["z"], x["pair_mask"], plan=plan)
        return mod(x["m"], x["z"], x["msa_mask"], plan=plan)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, steps: int) -> tuple[float, float | None]:
    """(median seconds, peak GiB above the start or None off CUDA) of `steps` calls after 2 warm-up calls."""
    import time

    for _ in range(2):
        fn()
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - before) / GiB if device.type == "cuda" else None
    return statistics.median(times), peak


def measure(kind: str, kernel: str, n: int, *, rows: int, steps: int, train: bool,
            device: torch.device) -> dict:
    """One record: the module's training step (forward + backward) and no-grad forward with `kernel`."""
    rec: dict = {"module": kind, "kernel": kernel, "n": n, "rows": rows if kind == "msa_row" else n}
    mod = _module(kind, device)
    x = _inputs(kind, n, rows, device)
    mem = _memory(kernel)
    if kernel == "cueq":
        from protfold.model.kernels import cueq

        if kind != "triangle" or not cueq.available(device):
            return {**rec, "skipped": "cueq: triangle attention on CUDA with cuequivariance installed only"}
    leaf = "z" if kind == "triangle" else "m"

    def step() -> None:
        inp = dict(x, **{leaf: x[leaf].detach().requires_grad_()})
        _call(kind, mod, inp, mem, device).float().square().mean().backward()

    def forward() -> None:
        with torch.no_grad():
            _call(kind, mod, x, mem, device)

    for name, fn, wanted in (("train", step, train), ("no_grad", forward, True)):
        if not wanted:
            continue
        try:
            seconds, peak = _timed(fn, device, steps)
            rec[name] = {"ms": round(seconds * 1e3, 3), "peak_gib": None if peak is None else round(peak, 3)}
        except torch.OutOfMemoryError:
            rec[name] = {"oom": True}
        finally:
            mod.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rec


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry.get("oom"):
        return "out of memory"
    peak = "" if entry["peak_gib"] is None else f", {entry['peak_gib']:.2f} GiB"
    return f"{entry['ms']:.2f} ms{peak}"


def table(records: list[dict], env: dict[str, str]) -> str:
    lines = [f"{env['card']}, torch {env['torch']}, {env['date']}", f"`{env['command']}`", "",
             "| module | N | rows | kernel | train step (fwd + bwd) | no-grad forward |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['module']} | {r['n']} | {r['rows']} | {r['kernel']} | skipped | {r['skipped']} |")
            continue
        lines.append(f"| {r['module']} | {r['n']} | {r['rows']} | {r['kernel']} | {_cell(r.get('train'))} "
                     f"| {_cell(r.get('no_grad'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 384, 512, 768, 1024])
    ap.add_argument("--modules", nargs="+", choices=("triangle", "msa_row"), default=["triangle", "msa_row"])
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--rows", type=int, default=128, help="MSA rows of the row attention (af2 training: 128)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no_train", action="store_true", help="the no-grad forward only (inference lengths)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    for name in ("lengths", "steps", "rows"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            print(f"attention_kernels: --{name} must be >= 1", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attention_kernels: no CUDA device here; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"attention_kernels: cannot make the output folder {args.out}: {err.strerror}", file=sys.stderr)
        return 2
    env = environment(device, None)
    records = []
    for n in args.lengths:
        for kind in args.modules:
            for kernel in args.kernels:
                rec = measure(kind, kernel, n, rows=args.rows, steps=args.steps, train=not args.no_train,
                              device=device)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    text = table(records, env)
    print(text)
    (args.out / "attention_kernels.json").write_text(json.dumps({"env": env, "records": records}, indent=1) + "\n")
    (args.out / "attention_kernels.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
