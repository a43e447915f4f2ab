"""`protfold bench --plan`: every memory preset's predicted peak and step time for given shapes and card size,
and which one `--model.memory auto` would pick, from the fitted cost model (`protfold.plan`); nothing runs.

    protfold bench --plan --model af2 --crops 256,512 --rows 128 --extra-rows 1024 --card_gib 80 [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from protfold.config import PRESET_NAMES, model_preset
from protfold.plan.auto import (
    SAFETY_FRACTION,
    SAFETY_GIB,
    PlanRow,
    card_budget,
    choose,
    nothing_fits_message,
    plan,
    usable_bytes,
)
from protfold.plan.cost import GIB, OPTIM_STATE_BYTES, Shape, count_parameters

__all__ = ["main", "plan_records"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protfold bench --plan", description=__doc__.splitlines()[0])
    p.add_argument("--plan", action="store_true", required=True)
    p.add_argument("--model", default="af2", choices=PRESET_NAMES, help="model preset")
    p.add_argument("--crops", default="256", help="crop sizes, comma separated")
    p.add_argument("--rows", type=int, default=128, help="MSA cluster rows")
    p.add_argument("--extra-rows", "--extra_rows", dest="extra_rows", type=int, default=1024, help="extra MSA rows")
    p.add_argument("--recycles", type=float, default=0, help="no-grad passes before the grad pass (a mean is fine)")
    p.add_argument("--precisions", default="bf16", help="bf16 and/or fp32, comma separated")
    p.add_argument("--card_gib", "--card-gib", dest="card_gib", type=float, default=None,
                   help="the card's free memory in GiB (default: this machine's first CUDA card); the budget is it "
                   f"less {SAFETY_FRACTION:.0%} and {SAFETY_GIB:g} GiB")
    p.add_argument("--optim_state", "--optim-state", dest="optim_state", default="fp32", choices=list(OPTIM_STATE_BYTES),
                   help="optimizer state storage (bytes per parameter in the resident memory)")
    p.add_argument("--ema", action="store_true", help="count the fp32 EMA copy of the weights (protfold fit keeps one)")
    p.add_argument("--out", type=Path, default=None, help="write plan.csv and plan.json here")
    return p


def _budget(card_gib: float | None) -> tuple[float, str]:
    if card_gib is not None:
        if not card_gib > 0:
            raise SystemExit(f"protfold bench: --card_gib {card_gib:g}: a card's size in GiB must be > 0")
        return usable_bytes(card_gib * GIB), f"card {card_gib:g} GiB"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("protfold bench --plan: no CUDA device here: give the card's size with --card_gib GIB")
    return card_budget(0)


def plan_records(rows: list[PlanRow], shape: Shape, preset: str, budget: float) -> list[dict[str, Any]]:
    best = choose(rows)
    return [{"preset": preset, "crop": shape.crop, "rows": shape.rows, "extra_rows": shape.extra_rows,
             "recycles": shape.recycles, "precision": shape.precision, "mode": r.mode,
             "predicted_peak_gib": None if r.pred.peak_bytes is None else round(r.pred.peak_gib, 3),
             "needed_gib": None if r.needed_bytes is None else round(r.needed_bytes / GIB, 3),
             "predicted_time_s": None if r.pred.time_s is None else round(r.pred.time_s, 3),
             "fits": r.fits, "auto": best is not None and r.mode == best.mode, "budget_gib": round(budget / GIB, 3),
             "note": r.pred.note} for r in rows]


def _format(records: list[dict[str, Any]]) -> str:
    lines = [f"{'mode':<17} {'peak GiB':>9} {'+margin':>8} {'time s':>8}  fits"]
    for r in records:
        if r["predicted_peak_gib"] is None:
            lines.append(f"{r['mode']:<17} {'-':>9} {'-':>8} {'-':>8}  -     ({r['note']})")
            continue
        mark = "  <- auto" if r["auto"] else ""
        lines.append(f"{r['mode']:<17} {r['predicted_peak_gib']:>9.2f} {r['needed_gib']:>8.2f} "
                     f"{r['predicted_time_s']:>8.2f}  {'yes' if r['fits'] else 'no':<4}{mark}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        crops = [int(c) for c in args.crops.split(",") if c]
    except ValueError:
        raise SystemExit(f"protfold bench --plan: --crops wants comma-separated integers, got {args.crops!r}") from None
    precisions = [p for p in args.precisions.split(",") if p]
    if set(precisions) - {"bf16", "fp32"}:
        raise SystemExit(f"protfold bench --plan: --precisions takes bf16 and/or fp32, got {args.precisions!r}")
    budget, note = _budget(args.card_gib)
    cfg = model_preset(args.model)
    n_params = count_parameters(cfg)
    kwargs = {"optim_state": args.optim_state, "ema": args.ema}
    records: list[dict[str, Any]] = []
    for precision in precisions:
        for crop in crops:
            shape = Shape(crop, args.rows, args.extra_rows, args.recycles, precision)
            rows = plan(cfg, shape, n_params=n_params, budget_bytes=budget, **kwargs)
            found = plan_records(rows, shape, args.model, budget)
            print(f"# {args.model} ({n_params:,} parameters), crop {crop} / {args.rows} / {args.extra_rows}, "
                  f"{args.recycles:g} recycles, {precision}; budget {budget / GIB:.2f} GiB ({note})")
            print(_format(found))
            if choose(rows) is None:
                print(nothing_fits_message(rows, cfg, shape, n_params=n_params, budget_bytes=budget, **kwargs))
            records += found
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.json").write_text(json.dumps(records, indent=1) + "\n")
        with open(args.out / "plan.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        print(f"# wrote {args.out / 'plan.json'}, plan.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def resolve_auto_modes(argv: list[str]) -> list[str]:
    """`protfold bench --modes ...,auto,...`: `auto` replaced by the preset `--model.memory auto` would pick at the
    sweep's one point (one preset, crop, rows, extra rows, precision), for `--card_gib` or the card's free
    memory; the plain `none` on a CPU without `--card_gib`. Prints the choice in one line; argv otherwise as given."""
    from protfold.plan.auto import NothingFits, resolve

    p = argparse.ArgumentParser(add_help=False)
    for flag, default in (("--modes", ""), ("--model", "tiny"), ("--crops", "32,64"), ("--rows", "128"),
                          ("--extra-rows", "1024"), ("--precisions", "fp32"), ("--device", None)):
        p.add_argument(flag, default=default)
    p.add_argument("--recycles", type=int, default=0)
    p.add_argument("--card_gib", "--card-gib", dest="card_gib", type=float, default=None)
    args, _ = p.parse_known_args(argv)
    modes = args.modes.split(",")
    if "auto" not in modes:
        return argv
    values = [args.model, args.crops, args.rows, args.extra_rows, args.precisions]
    if any("," in v for v in values):
        raise SystemExit("protfold bench: --modes auto is resolved for one point: give one --model, --crops, --rows, "
                         "--extra-rows and --precisions")
    try:
        cfg = model_preset(args.model)
        shape = Shape(int(args.crops), int(args.rows), int(args.extra_rows), args.recycles, args.precisions)
    except ValueError as err:
        raise SystemExit(f"protfold bench --modes auto: {err}") from None
    import torch

    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    budget, note = (None, "no --card_gib and not on CUDA")
    if args.card_gib is not None:
        budget, note = _budget(args.card_gib)
    elif on_cuda:
        budget, note = card_budget(0)
    try:
        name, line = resolve(cfg, shape, n_params=count_parameters(cfg), budget_bytes=budget, budget_note=note)
    except NothingFits as err:
        raise SystemExit(f"protfold bench: {err}") from None
    print(f"# {line}")
    chosen = ",".join(dict.fromkeys(name if m == "auto" else m for m in modes))
    out, skip = [], False
    for i, arg in enumerate(argv):  # drop --card_gib (the sweep's parser does not know it), rewrite --modes
        if skip:
            skip = False
        elif arg in ("--card_gib", "--card-gib"):
            skip = True
        elif arg.startswith(("--card_gib=", "--card-gib=")):
            continue
        elif arg.startswith("--modes="):
            out.append(f"--modes={chosen}")
        elif i > 0 and argv[i - 1] == "--modes":
            out.append(chosen)
        else:
            out.append(arg)
    return out
