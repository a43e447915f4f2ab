"""Does `--model.memory auto` pick, on a real card, a preset that fits and is the fastest of those that fit?

At each crop (af2, bf16, 128 rows / 1024 extra, no recycle) the plan is made for the card's free memory (or
--card_gib), then `protfold bench` measures auto's pick and every fitting preset the model predicts within
RATIO times the pick's time: with the model's largest time error e on the measured points (23%), a preset
predicted more than (1 + e) / (1 - e) = 1.6 times slower cannot be measured faster unless the model is off by
more than it ever was, so those are not run (they would cost minutes each). Writes OUT/crop_N/ (bench
records) and OUT/auto_check.json, prints one line per crop.

    python3 benchmarks/auto_check.py --out /tmp/auto_check [--crops 256,512,768] [--card_gib GIB] [--steps N]
    python3 benchmarks/auto_check.py --out /tmp/verdict --records RECORDS --crops 384,512 --card_gib 139.1

The second form judges bench records measured before (a call stopped before writing auto_check.json) with the
cost model as it is now, on any machine.

Each crop's bench run compiles every compiled mode it measures (about a minute each on an H200): three crops
take about 8 minutes; one device call can run them one crop at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from protfold.bench.runner import main as bench
from protfold.config import model_preset
from protfold.plan.auto import SAFETY_FRACTION, SAFETY_GIB, card_budget, choose, plan
from protfold.plan.cost import GIB, Shape, count_parameters

RATIO = 1.6
NOISE = 0.05


def check(crop: int, budget: float, out: Path, time_limit: float, steps: int = 1, records: Path | None = None
          ) -> dict:
    """Plan at `crop`, measure (or, with `records`, read that folder's crop_N/results.json) and judge the pick."""
    cfg = model_preset("af2")
    rows = plan(cfg, Shape(crop, 128, 1024, 0, "bf16"), n_params=count_parameters(cfg), budget_bytes=budget)
    pick = choose(rows)
    if pick is None:
        return {"crop": crop, "pick": None, "verdict": "nothing fits"}
    # the pick first, so a time limit never skips it
    run = [pick.mode] + [r.mode for r in rows if r.fits and r.mode != pick.mode
                         and r.pred.time_s <= RATIO * pick.pred.time_s]
    folder = (records or out) / f"crop_{crop}"
    if records is None:
        bench(["--model", "af2", "--device", "cuda", "--precisions", "bf16", "--crops", str(crop), "--rows", "128",
               "--extra-rows", "1024", "--recycles", "0", "--steps", str(steps), "--warmup", "1", "--no-infer",
               "--time-limit", str(time_limit), "--modes", ",".join(run), "--out", str(folder)])
    measured = _read_records(folder / "results.json")
    if pick.mode not in measured:
        return {"crop": crop, "pick": pick.mode, "verdict": f"the pick was not measured in {folder}"}
    chosen = measured[pick.mode]
    ok = {m: r for m, r in measured.items() if r["status"] == "ok"}
    fastest = min(ok, key=lambda m: ok[m]["step_time_s"]) if ok else None
    fits = chosen["status"] == "ok" and chosen["peak_bytes"] <= budget
    return {
        # judged from records: what ran is what they hold; what was planned but not run is unknown
        "crop": crop, "budget_gib": budget / GIB, "pick": pick.mode,
        "measured_modes": list(measured) if records else run,
        "not_run": None if records else [r.mode for r in rows if r.fits and r.mode not in run],
        "not_finished": None if records else [m for m in run if m not in measured],
        "predicted": {r.mode: {"peak_gib": r.pred.peak_gib, "time_s": r.pred.time_s} for r in rows if r.fits},
        "measured": {m: {"status": r["status"], "peak_gib": r["peak_bytes"] and r["peak_bytes"] / GIB,
                         "time_s": r["step_time_s"]} for m, r in measured.items()},
        "pick_fits": fits, "fastest_measured": fastest, "pick_is_fastest": fastest == pick.mode,
        "pick_time_over_fastest": chosen["step_time_s"] / ok[fastest]["step_time_s"] if fits and fastest else None,
    }


def _read_records(path: Path) -> dict[str, dict]:
    """{mode: bench record} of a results.json, or a one-line SystemExit naming the file and what is wrong."""
    try:
        rows = json.loads(path.read_text())
        measured = {r["mode"]: r for r in rows}
        for r in measured.values():
            if r["status"] == "ok" and not (r["peak_bytes"] and r["step_time_s"]):
                raise ValueError(f"mode {r['mode']} is ok but has no peak_bytes or step_time_s")
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise SystemExit(f"auto_check: {path}: not a bench results.json ({type(err).__name__}: {err})") from None
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crops", default="256,512,768")
    parser.add_argument("--card_gib", type=float, default=None, help="pretend card (default: the real free memory)")
    parser.add_argument("--time_limit", type=float, default=420.0, help="seconds for all crops' bench runs")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per mode (the median is compared)")
    parser.add_argument("--records", type=Path, default=None,
                        help="judge the bench records in RECORDS/crop_N/ instead of measuring (no GPU; needs "
                        "--card_gib, the card's free GiB when they were measured)")
    args = parser.parse_args()
    if args.card_gib is not None and args.card_gib <= 0:
        raise SystemExit(f"auto_check: --card_gib must be > 0, got {args.card_gib}")
    if args.steps < 1 or args.time_limit <= 0:
        raise SystemExit(f"auto_check: --steps must be >= 1 and --time_limit > 0; got {args.steps}, {args.time_limit}")
    if args.records is not None:
        missing = [c for c in args.crops.split(",") if not (args.records / f"crop_{c}" / "results.json").is_file()]
        if missing or not args.card_gib:
            raise SystemExit(f"auto_check: --records {args.records}: needs --card_gib and crop_N/results.json for "
                             f"every crop; missing: {', '.join(missing) or '--card_gib'}")
    elif not torch.cuda.is_available():
        raise SystemExit("auto_check: needs a CUDA device")
    if args.card_gib:
        budget = args.card_gib * GIB * (1 - SAFETY_FRACTION) - SAFETY_GIB * GIB
    else:
        budget, _ = card_budget(0)
    crops = [int(c) for c in args.crops.split(",")]
    results = []
    for crop in crops:  # each crop's bench run gets an equal share of the time limit
        results.append(check(crop, budget, args.out, args.time_limit / len(crops), args.steps, args.records))
        r = results[-1]
        print(f"# crop {crop}: auto picks {r['pick']}; fits (measured peak within {budget / GIB:.2f} GiB): "
              f"{r.get('pick_fits')}; fastest measured {r.get('fastest_measured')} of {r.get('measured_modes')} "
              f"(pick's time / fastest: {r.get('pick_time_over_fastest')}); not finished: {r.get('not_finished')}; "
              f"not run (predicted > {RATIO}x slower): {r.get('not_run')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_check.json").write_text(json.dumps(results, indent=1) + "\n")
    # a pick within NOISE of the fastest counts as the fastest
    return 0 if all(r.get("pick_fits") and (r.get("pick_time_over_fastest") or 9) <= 1 + NOISE for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
