"""`protfold bench --budget`: the largest crop whose training step fits a memory budget, per mode, found by
stepping up from the crops already measured and bisecting down (`budget_search`), each probe one real step."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from protfold.bench import report
from protfold.bench.measure import failure, free_memory, parse_bytes
from protfold.bench.synthetic import synthetic_batch, to_device
from protfold.bench.workloads import Network, Point, Settings, probe_peak
from protfold.config import MemoryConfig

__all__ = ["BUDGET_RESOLUTION", "BUDGET_STEP", "budget_search", "run_budget"]

BUDGET_STEP, BUDGET_RESOLUTION = 128, 32


def budget_search(fits: Callable[[int], bool], *, known: dict[int, bool], cap: int, step: int = BUDGET_STEP,
                  resolution: int = BUDGET_RESOLUTION, deadline: float | None = None,
                  start: int | None = None) -> dict[str, Any]:
    """The largest crop with fits(crop): upward in `step`s from the largest known fitting crop until one fails
    (or `cap`), then bisection down to `resolution`. `known` holds already measured crops; `start`, when not
    known, is probed first (the search then continues from it)."""
    probes: list[int] = []
    complete = True

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def probe(crop: int) -> bool:
        probes.append(crop)
        return fits(crop)

    known = dict(known)
    if start is not None and start not in known:
        known[min(start, cap)] = probe(min(start, cap))
    lo = max((c for c, ok in known.items() if ok), default=0)
    hi = min((c for c, ok in known.items() if not ok and c > lo), default=None)
    crop = lo + step
    while hi is None and lo < cap:
        if out_of_time():
            complete = False
            break
        crop = min(crop, cap)
        if probe(crop):
            lo, crop = crop, crop + step
        else:
            hi = crop
    while hi is not None and hi - lo > resolution:
        mid = lo + max(resolution, (hi - lo) // 2 // resolution * resolution)
        if mid >= hi:
            break
        if out_of_time():
            complete = False
            break
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return {"max_crop": lo, "first_failing_crop": hi, "capped": hi is None and lo >= cap, "complete": complete,
            "probes": probes}


def run_budget(args: argparse.Namespace, point: Point, modes: dict[str, MemoryConfig], net: Network, s: Settings,
               records: list[dict[str, Any]], env: dict[str, str], *, start: int | None) -> list[dict[str, Any]]:
    """One `budget` record per mode: the largest crop whose training step fits `args.budget` (`budget_search`
    over real steps at `point`'s other shapes), starting from the crops `records` already measured."""
    budget = parse_bytes(args.budget)
    bar = tqdm(desc=f"budget {args.budget} probes", unit="probe", file=sys.stderr, dynamic_ncols=True)
    same = [r for r in records if r.get("kind") == point.kind and r["preset"] == point.preset
            and r["precision"] == point.precision and r["rows"] == point.rows
            and r["extra_rows"] == point.extra_rows]
    largest = max((r["crop"] for r in same), default=point.crop)
    max_crop = net.cfg.max_crop
    cap = args.budget_cap or (max_crop if s.device.type == "cuda" else min(max_crop, 4 * largest))
    out = []
    for name, mem in modes.items():
        known = {r["crop"]: r["peak_bytes"] is not None and r["peak_bytes"] <= budget
                 for r in same if r["mode"] == name and r["status"] in ("ok", "oom")}
        probed: dict[int, tuple[int | None, float]] = {}

        def fits(crop: int, mem: MemoryConfig = mem, probed: dict = probed, name: str = name) -> bool:
            bar.set_postfix_str(f"{name} crop {crop}")
            bar.update()
            at = Point(**{**point.__dict__, "crop": crop})
            batch = to_device(synthetic_batch(crop, at.rows, at.extra_rows, seed=s.seed), s.device) \
                if at.kind == "train" else None
            started = time.monotonic()
            peak = probe_peak(at, mem, net, s, batch)
            probed[crop] = (peak, round(time.monotonic() - started, 3))
            del batch
            free_memory(s.device)
            return peak is not None and peak <= budget

        deadline = time.monotonic() + args.budget_time if args.budget_time else None
        status, error = "ok", None
        try:
            found = budget_search(fits, known=known, cap=cap, deadline=deadline,
                                  start=start)
        except Exception as exc:  # noqa: BLE001 - a probe failed other than by running out of memory
            status, error = "error", failure(exc, f"budget search for {name}", s.device)
            found = {"max_crop": max((c for c, (pk, _) in probed.items() if pk is not None and pk <= budget),
                                     default=0),
                     "first_failing_crop": None, "capped": False, "complete": False, "probes": list(probed)}
        # [crop, peak bytes or None (OOM), seconds for the probe: setup plus one training step]
        found["probes"] = [[c, *probed[c]] for c in found["probes"]]
        rec = {"kind": "budget", "preset": point.preset, "mode": name, "precision": point.precision,
               "crop": found["max_crop"], "rows": point.rows, "extra_rows": point.extra_rows,
               "recycles": point.recycles, "status": status, "budget_bytes": budget, "budget_kind": point.kind,
               "optim_state": s.optim.state, "ema_storage": s.optim.ema_storage,
               "budget_cap": cap, **found, **env, **({"error": error} if error else {})}
        for r in same:
            if r["mode"] == name:
                r["max_crop"] = found["max_crop"]
        out.append(rec)
        if args.out:
            report.write_outputs(args.out, [*records, *out], plot=False)
    bar.close()
    return out
