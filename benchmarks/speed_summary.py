"""The table and OUT/summary.json of `benchmarks/speed_gpu.sh OUT`: bench modes and fits beside OpenFold's step.

OpenFold's figure is the one measured in the same call (OUT/openfold.json) when there is one, else the figure of
../shared/docs/OPENFOLD_BASELINE.md (one H200, 2026-12-04), labelled as not from this run.
    python3 benchmarks/speed_summary.py OUT
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

GIB = 2**30
# ../shared/docs/OPENFOLD_BASELINE.md, "Newest" table: OpenFold at initial shapes, no templates, one H200
BASELINE = {"step_s": 2.46, "peak_gib": 5.15, "source": "OPENFOLD_BASELINE.md (H200, 2026-12-04), not this run"}


def _perf(root: Path) -> dict | None:
    found = sorted(root.glob("protfold/version_*/perf.json"))
    return json.loads(found[-1].read_text()) if found else None


def _openfold(out: Path) -> dict:
    path = out / "openfold.json"
    if path.is_file():
        res = json.loads(path.read_text())
        return {"step_s": res["median_s"], "peak_gib": res["peak_gib"], "source": "this run"}
    return BASELINE


def main(out: Path) -> dict:
    of = _openfold(out)
    rows: list[dict] = []
    runs = [run for bench in sorted(out.glob("bench*/results.json")) for run in json.loads(bench.read_text())]
    for run in runs:
        if run.get("kind") != "train":
            continue
        ok = run.get("status") == "ok"
        lean = "" if run.get("optim_state", "fp32") == "fp32" and run.get("ema_storage", "fp32") == "fp32" else \
            f" ({run.get('optim_state')} Adam, {run.get('ema_storage')} EMA)"
        rows.append({"what": f"bench {run['mode']}{lean}", "status": run.get("status"),
                     "step_s": run["step_time_s"] if ok else None,
                     "peak_gib": run["peak_bytes"] / GIB if ok and run.get("peak_bytes") else None,
                     "triangle_kernel": (run.get("memory") or {}).get("triangle_kernel", "torch")})
    fits = {}
    for name in ("fit1", "fit2"):
        perf = _perf(out / name)
        if perf is None:
            rows.append({"what": name, "status": "missing"})
            continue
        times = perf["step_s"]
        compile_ = perf.get("compile", {})
        fits[name] = {"steps": perf["steps"], "step_s": times, "recycles": perf.get("recycles"),
                      "median_step_s_after_first": perf["median_step_s_after_first"],
                      "median_step_s_after_10": statistics.median(times[10:]) if len(times) > 10 else None,
                      "first_step_s": times[0] if times else None, "peak_gib": perf.get("peak_gib_rank0"),
                      "compile": compile_, "device": perf.get("device"), "torch": perf.get("torch"),
                      "date": perf.get("date")}
        rows.append({"what": f"{name} ({perf['steps']} steps)", "status": "ok",
                     "step_s": perf["median_step_s_after_first"], "peak_gib": perf.get("peak_gib_rank0"),
                     "graphs": compile_.get("graphs"), "compile_s": compile_.get("seconds"),
                     "cache_hits": compile_.get("fx_graph_cache_hits")})
    rows.append({"what": "OpenFold", "status": "ok", "step_s": of["step_s"], "peak_gib": of["peak_gib"],
                 "source": of["source"]})
    print(f"\n{'':34} {'step s':>8} {'x OF':>6} {'peak GiB':>9} {'x OF':>6} {'graphs':>7} {'compile s':>10}")
    for row in rows:
        step, peak = row.get("step_s"), row.get("peak_gib")
        cells = [f"{step:8.2f}" if step else f"{row.get('status'):>8}",
                 f"{step / of['step_s']:6.2f}" if step else " " * 6,
                 f"{peak:9.2f}" if peak else " " * 9, f"{peak / of['peak_gib']:6.2f}" if peak else " " * 6,
                 f"{row['graphs']:7d}" if row.get("graphs") is not None else " " * 7,
                 f"{row['compile_s']:10.1f}" if row.get("compile_s") is not None else ""]
        print(f"{row['what'][:34]:34} " + " ".join(cells))
    print(f"OpenFold: {of['source']}")
    for name, fit in fits.items():
        times = ", ".join(f"{t:.2f}" for t in fit["step_s"])
        print(f"{name} step times (s): {times}")
    summary = {"gpu": (out / "gpu.txt").read_text() if (out / "gpu.txt").is_file() else None,
               "openfold": of, "rows": rows, "fits": fits}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main(Path(sys.argv[1]))
