"""Fit the cost model behind `--model.memory auto` and `protfold bench --plan` to the committed bench records.

    python3 scripts/fit_cost_model.py [--records benchmarks/gpu] [--out protfold/resources/cost_model.json]

Writes the coefficient table (tests/plan/test_cost.py checks that refitting reproduces it) and prints the
model's error on every measured point, with the per-quantity max and median relative error (docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from protfold.plan.cost import COST_TABLE
from protfold.plan.fit import fit_table, leave_one_out, load_points, model_errors

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, default=ROOT / "benchmarks" / "gpu")
    parser.add_argument("--out", type=Path, default=COST_TABLE)
    args = parser.parse_args(argv)
    if not load_points(args.records):  # before anything is written: an empty fit would replace the shipped table
        raise SystemExit(f"fit_cost_model.py: {args.records}: no af2 training records (results.json) to fit")
    table = fit_table(args.records)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    rows = model_errors(args.records, table)
    print("| mode | crop / rows / extra, recycles, precision | peak measured / predicted (GiB) | time measured / "
          "predicted (s) |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['mode']}` | {r['crop']} / {r['rows']} / {r['extra_rows']}, {r['recycles']}, {r['precision']} | "
              f"{r['peak_gib']:.2f} / {r['pred_peak_gib']:.2f} ({r['peak_err']:+.0%}) | "
              f"{r['time_s']:.2f} / {r['pred_time_s']:.2f} ({r['time_err']:+.0%}) |")
    for key in ("peak_err", "time_err"):
        errs = [abs(r[key]) for r in rows]
        print(f"# {key}: max {max(errs):.1%}, median {statistics.median(errs):.1%} over {len(errs)} points")
    held = leave_one_out(args.records)
    for r in held:
        print(f"# held out: {r['mode']} crop {r['crop']} / {r['rows']}: peak {r['peak_err']:+.0%}, "
              f"time {r['time_err']:+.0%}")
    for key in ("peak_err", "time_err"):
        errs = [abs(r[key]) for r in held]
        print(f"# held-out {key}: max {max(errs):.1%}, median {statistics.median(errs):.1%} over {len(errs)} points")
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
