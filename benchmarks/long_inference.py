"""Long-sequence inference on one GPU (issue 17): the parts of an af2 forward, each alone, no grad, bf16 autocast,
random af2-size weights, memory planned by `plan_inference` for the card's free memory; then the whole forward
and the longest sequence that fits, computed from the parts.

    python benchmarks/long_inference.py --part block --lengths 4096 8192 12288 --out benchmarks/long_inference
    python benchmarks/long_inference.py --part extra --lengths 4096 8192 12288 --out benchmarks/long_inference
    python benchmarks/long_inference.py --part structure --lengths 4096 8192 12288 --out benchmarks/long_inference
    python benchmarks/long_inference.py --part heads --lengths 4096 8192 12288 --out benchmarks/long_inference
    python benchmarks/long_inference.py --part compare4096 --out benchmarks/long_inference
    python benchmarks/long_inference.py --part summary --out benchmarks/long_inference   # CPU is enough

Parts: `block` one Evoformer block (128 MSA rows); `extra` one extra-MSA block (1,024 rows; the stack's 4 blocks
update z in place, so the stack's peak is one block's and its time 4x one block's: computed, and said so);
`structure` the 8-layer structure module; `heads` the heads (`af2_ptm`: pLDDT, masked MSA, experimentally
resolved, PAE and pTM in row chunks). Each records peak (`torch.cuda.max_memory_allocated`, inputs included:
z [N, N, 128] in fp32, as the model's embedders make it, or in bf16 where the plan stores it so because fp32 z
does not fit the card: `pair_storage`, recorded in `pair_dtype`) and time (one call, after one warm-up call at 256
residues) in `<out>/<part>.json`. A length whose time, extrapolated (a N^3 fit) from the lengths measured
before it, exceeds `--max_s` is skipped and reported as skipped, so each command stays within ~9 minutes.
`compare4096`: one block at 4,096 with z in bf16 (as OpenFold's figures), planned for the block's own shapes
for the card and for a 6.5 GiB budget, beside OpenFold's figures from ../shared/docs/OPENFOLD_BASELINE.md
(`benchmarks/openfold_block.py` measures OpenFold's block in the same call); `--attention` names the kernel.
`summary`: the whole forward per pass = 48 blocks + 4 extra blocks + structure + heads (time summed, peak the
largest part's), x 4 passes for 3 recycles; and the longest N fitting 80 GB and 139 GiB from a fit
peak(N) = a N^2 + b N + c of each part's peaks; a skipped length's time from time(N) = a N^3 + b N^2. Writes `<out>/summary.json` and `<out>/summary.md`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from protfold.config import ATTENTION_KERNELS, model_preset
from protfold.model import triangle_exec
from protfold.model.evoformer import EvoformerBlock
from protfold.model.heads import AuxiliaryHeads
from protfold.model.inference_plan import available_host_bytes, plan_inference
from protfold.model.plan import MemoryPlan, resolve
from protfold.model.structure import StructureModule

GiB = 2**30
OPENFOLD_4096 = {"time_s": 8.8, "peak_gib": 13.5}  # ../shared/docs/OPENFOLD_BASELINE.md (H200, one block, bf16)
S, E = 128, 1024
ATTENTION: str | None = None  # --attention: the kernel instead of the plan's


def _inputs(part: str, n: int, cfg, dev, pair_dtype) -> tuple:
    z = torch.randn(1, n, n, cfg.c_z, device=dev, dtype=pair_dtype)
    mask = torch.ones(1, n, device=dev)
    if part in ("block", "extra"):
        rows, c = (S, cfg.c_m) if part == "block" else (E, cfg.c_e)
        m = torch.randn(1, rows, n, c, device=dev, dtype=torch.float32 if part == "block" else torch.bfloat16)
        return m, z, torch.ones(1, rows, n, device=dev), mask[..., :, None] * mask[..., None, :]
    if part == "structure":
        return torch.randn(1, n, cfg.c_s, device=dev, dtype=torch.bfloat16), z, torch.randint(0, 20, (1, n), device=dev), mask
    return torch.randn(1, S, n, cfg.c_m, device=dev), z, torch.randn(1, n, cfg.c_s, device=dev), mask


def stored_pair_dtype(mem, pair_dtype: torch.dtype) -> torch.dtype:
    """The dtype z is made in for a plan: bf16 where the plan stores it so (`pair_storage`, chosen when fp32 z does
    not fit the budget on the device), else `pair_dtype`."""
    return torch.bfloat16 if mem.pair_storage == "bf16" else pair_dtype


def _module(part: str, cfg):
    if part in ("block", "extra"):
        return EvoformerBlock.from_config(cfg, extra=part == "extra")
    if part == "structure":
        return StructureModule(cfg=cfg)
    return AuxiliaryHeads(cfg=cfg)


def _call(part: str, module, args, plan: MemoryPlan) -> None:
    if part in ("block", "extra"):
        module(*args, plan=plan, inplace=True)
    elif part == "structure":
        s, z, aatype, mask = args
        module(s, z, aatype, mask, plan=plan)
    else:
        m, z, s, mask = args
        module(m, z, s_evoformer=s, s_structure=s, seq_mask=mask, plan=plan)


@torch.no_grad()
def measure(part: str, n: int, *, pair_dtype=torch.float32, budget: int | None = None, n_extra: int = E) -> dict:
    """One call of `part` at n residues, planned for `budget` (default: the card's free memory) at the whole
    model's shapes (n_extra=E) or, for a block measured alone, at its own (n_extra=0: no extra MSA stream)."""
    dev = torch.device("cuda")
    cfg = model_preset("af2_ptm")
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(dev)[0]
    mem, predicted, text = plan_inference(n, S, n_extra, budget or free, cfg, torch.bfloat16, pair_dtype,
                                          attention=ATTENTION or "naive")
    # printed before the run, so that a run killed for memory (device or host) leaves its plan in the log
    print(f"# {part} at {n}: {text}; host available {available_host_bytes() / GiB:.1f} GiB", flush=True)
    module = _module(part, cfg).to(dev).eval()
    plan = resolve(mem, grad=False, device=dev)
    pair_dtype = stored_pair_dtype(mem, pair_dtype)
    args = _inputs(part, n, cfg, dev, pair_dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _call(part, module, args, plan)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev)
    del module, args
    return {"part": part, "n_res": n, "time_s": round(seconds, 3), "peak_gib": round(peak / GiB, 3),
            "planned_peak_gib": round(predicted / GiB, 3), "plan": text, "pair_dtype": str(pair_dtype),
            # where the triangle edge was: pageable once a pinned allocation failed in this process (slower copies)
            "host_edge": None if not mem.offload_triangle_edge else "pageable" if triangle_exec._pin_failed
            else "pinned"}


def run_part(part: str, lengths: list[int], max_s: float, out: Path) -> list[dict]:
    measure(part, 256)  # warm-up: cuBLAS handles and kernels loaded outside the timed calls
    records: list[dict] = []
    for n in sorted(lengths):
        done = [r for r in records if "time_s" in r]
        if done:
            last = done[-1]
            guess = last["time_s"] * (n / last["n_res"]) ** 3
            if guess > max_s:
                records.append({"part": part, "n_res": n, "skipped": f"extrapolated {guess:.0f} s > --max_s {max_s:.0f}"})
                print(json.dumps(records[-1]), flush=True)
                continue
        records.append(measure(part, n))
        print(json.dumps(records[-1]), flush=True)
        (out / f"{part}.json").write_text(json.dumps(records, indent=1))
    return records


def compare4096(out: Path) -> None:
    measure("block", 256, pair_dtype=torch.bfloat16, n_extra=0)  # warm-up (and, for flex, the first compile)
    rows = []
    for label, budget in (("card", None), ("6.5 GiB", int(6.5 * GiB))):
        rows.append(dict(measure("block", 4096, pair_dtype=torch.bfloat16, budget=budget, n_extra=0), budget=label,
                         attention=ATTENTION or "plan"))
        print(json.dumps(rows[-1]), flush=True)
    name = f"compare4096_{ATTENTION or 'plan'}"
    (out / f"{name}.json").write_text(json.dumps({"protfold": rows, "openfold_baseline_doc": OPENFOLD_4096}, indent=1))
    lines = [f"| one af2 block, 4,096 residues, 128 MSA rows, no grad, bf16 (z bf16), attention "
             f"{ATTENTION or 'as planned'} | time | peak |", "| --- | --- | --- |"]
    lines += [f"| protfold, planned for {r['budget']} | {r['time_s']:.2f} s | {r['peak_gib']:.2f} GiB |" for r in rows]
    lines.append(f"| OpenFold (from ../shared/docs/OPENFOLD_BASELINE.md) | {OPENFOLD_4096['time_s']} s | "
                 f"{OPENFOLD_4096['peak_gib']} GiB |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fit(records: list[dict], key: str) -> np.ndarray:
    """Coefficients of key(N) = a N^2 + b N + c (fewer terms with fewer lengths), least squares."""
    pts = [(r["n_res"], r[key]) for r in records if key in r]
    n = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    cols = [n**2, n, np.ones_like(n)][: max(1, min(3, len(pts)))]
    coef = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)[0]
    return np.concatenate([coef, np.zeros(3 - len(coef))])


def _fit_time(records: list[dict]) -> np.ndarray:
    """(a, b) of time(N) = a N^3 + b N^2 (the triangle updates and attention are cubic), least squares; with one
    length, b = 0."""
    pts = [(r["n_res"], r["time_s"]) for r in records if "time_s" in r]
    n = np.array([p[0] for p in pts], dtype=float)
    cols = [n**3, n**2][: min(2, len(pts))]
    coef = np.linalg.lstsq(np.stack(cols, 1), np.array([p[1] for p in pts]), rcond=None)[0]
    return np.concatenate([coef, np.zeros(2 - len(coef))])


def summary(out: Path) -> None:
    parts = {p: json.loads((out / f"{p}.json").read_text()) for p in ("block", "extra", "structure", "heads")
             if (out / f"{p}.json").is_file()}
    if len(parts) < 4:
        raise SystemExit(f"summary needs block, extra, structure and heads in {out}; found {sorted(parts)}")
    times = {p: _fit_time(rs) for p, rs in parts.items()}
    peaks = {p: _fit(rs, "peak_gib") for p, rs in parts.items()}
    counts = {"block": 48, "extra": 4, "structure": 1, "heads": 1}

    def whole(n: int) -> tuple[float, float, dict]:
        measured = {p: next((r for r in parts[p] if r["n_res"] == n and "time_s" in r), None) for p in parts}
        t = {p: (r["time_s"] if r else float(times[p] @ [n**3, n**2])) for p, r in measured.items()}
        pk = {p: (r["peak_gib"] if r else float(np.polyval(peaks[p], n))) for p, r in measured.items()}
        src = {p: "measured" if r else "extrapolated" for p, r in measured.items()}
        return sum(counts[p] * t[p] for p in t), max(pk.values()), src

    lengths = sorted({r["n_res"] for rs in parts.values() for r in rs})
    rows = []
    for n in lengths:
        t, pk, src = whole(n)
        rows.append({"n_res": n, "pass_s": round(t, 1), "with_3_recycles_s": round(4 * t, 1), "peak_gib": round(pk, 2),
                     "parts": src})

    def largest(limit_gib: float) -> int:
        lo, hi = 256, 65536
        while hi - lo > 64:
            mid = (lo + hi) // 2
            fits = max(float(np.polyval(peaks[p], mid)) for p in peaks) <= limit_gib
            lo, hi = (mid, hi) if fits else (lo, mid)
        return lo

    fit = {"80 GB": largest(80e9 / GiB), "139 GiB": largest(139.0)}
    result = {"computed": "whole forward = 48 x block + 4 x extra block + structure + heads per pass (time summed, "
                          "peak the largest part's); not measured as one run", "rows": rows,
              "largest_n_res": fit, "parts": parts}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    # z's dtype per record: the peak fits below run through fp32-z and bf16-z records alike where the plans differ
    lines = ["| N_res | part | time | peak | z | plan |", "| --- | --- | --- | --- | --- | --- |"]
    for p, rs in parts.items():
        for r in rs:
            lines.append(f"| {r['n_res']} | {p} | {r.get('time_s', '-')} s | {r.get('peak_gib', '-')} GiB | "
                         f"{r.get('pair_dtype', '-')} | {r.get('plan', r.get('skipped', ''))} |")
    lines += ["", "Whole af2 forward, **computed** from the parts (not run as one):", "",
              "| N_res | one pass | 4 passes (3 recycles) | peak | parts |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['n_res']} | {r['pass_s']} s | {r['with_3_recycles_s']} s | {r['peak_gib']} GiB | "
              f"{', '.join(f'{k} {v}' for k, v in r['parts'].items())} |" for r in rows]
    lines += ["", f"Largest N_res by the same sum (peak fit a N^2 + b N + c per part): {fit['80 GB']} on 80 GB, "
              f"{fit['139 GiB']} on 139 GiB."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", required=True, choices=("block", "extra", "structure", "heads", "compare4096", "summary"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 12288])
    ap.add_argument("--max_s", type=float, default=300.0, help="skip a length whose extrapolated time exceeds this")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/long_inference"))
    ap.add_argument("--attention", choices=ATTENTION_KERNELS, default=None,
                    help="attention kernel instead of the plan's (flex and triton keep no [H, N, N] logits)")
    args = ap.parse_args()
    global ATTENTION
    ATTENTION = args.attention
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        summary(args.out)
    elif args.part == "compare4096":
        compare4096(args.out)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("long_inference.py: this part needs a CUDA device")
        run_part(args.part, args.lengths, args.max_s, args.out)


if __name__ == "__main__":
    main()
