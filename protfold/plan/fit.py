"""Fit the cost model's coefficients to measured bench records (`results.json` under benchmarks/gpu/).

Points: kind "train", status "ok" records of the `af2` preset with fp32 optimizer state and EMA; records of the same mode, shape and precision
are merged (median peak and time). Per preset with at least three distinct bf16 shapes: non-negative least
squares of the relative error over all subsets of the terms (exact for four terms). A preset with fewer
shapes gets one scale on its parent's fit (`PARENTS`, the preset it extends). fp32 against bf16: one factor
each for peak and time, the median ratio over the shapes measured in both. Presets without a measured step
are listed without coefficients and are never chosen by `auto`.

    python3 scripts/fit_cost_model.py            # rewrites protfold/resources/cost_model.json
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from protfold.config import memory_preset_names, model_preset
from protfold.plan.cost import GIB, PEAK_TERMS, RECYCLE_COST, TIME_TERMS, Shape, peak_terms, resident_bytes, time_terms

__all__ = ["PARENTS", "fit_table", "leave_one_out", "load_points", "model_errors"]

# a preset measured at fewer than MIN_SHAPES shapes: one scale on the preset it extends
PARENTS = {"offload": "recompute", "chunked": "recompute", "compiled": "compiled_flex",
           "compiled_inblock": "compiled_flex", "triangle": "recompute"}
MIN_SHAPES = 3
DIGITS = 6


def load_points(root: Path) -> list[dict[str, Any]]:
    """Merged measured points {mode, shape, n_params, peak_bytes, time_s, n, sources} of every results.json."""
    groups: dict[tuple, list[tuple[dict, str]]] = {}
    for path in sorted(Path(root).rglob("results.json")):
        try:
            records = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
        for r in records if isinstance(records, list) else []:
            if r.get("kind") != "train" or r.get("status") != "ok" or r.get("preset") != "af2":
                continue
            if r.get("optim_state", "fp32") != "fp32" or r.get("ema_storage", "fp32") != "fp32":
                continue  # the modes' cost is fitted with fp32 Adam and EMA (what the model's resident bytes count)
            key = (r["mode"], r["crop"], r["rows"], r["extra_rows"], r["recycles"], r["precision"], r["n_params"])
            groups.setdefault(key, []).append((r, str(path.relative_to(root).parent)))
    points = []
    for (mode, crop, rows, extra, recycles, precision, n_params), found in sorted(groups.items()):
        points.append({
            "mode": mode, "shape": Shape(crop, rows, extra, recycles, precision), "n_params": n_params,
            "peak_bytes": statistics.median(r["peak_bytes"] for r, _ in found),
            "time_s": statistics.median(r["step_time_s"] for r, _ in found),
            "n": len(found), "sources": sorted({src for _, src in found}),
        })
    return points


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_{c >= 0} sum(((x c - y) / y)^2), by trying every subset of columns (few columns)."""
    a, b = x / y[:, None], np.ones_like(y)
    best, best_err = np.zeros(x.shape[1]), float("inf")
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            c, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (c < 0).any():
                continue
            err = float(np.square(a[:, cols] @ c - b).sum())
            if err < best_err - 1e-12:
                full = np.zeros(x.shape[1])
                full[list(cols)] = c
                best, best_err = full, err
    return best


def _rows(points: list[dict], what: str) -> tuple[np.ndarray, np.ndarray]:
    cfg = model_preset("af2")
    names, terms = (PEAK_TERMS, peak_terms) if what == "peak" else (TIME_TERMS, time_terms)
    x = np.array([[terms(cfg, p["shape"])[k] for k in names] for p in points])
    if what == "peak":
        y = np.array([(p["peak_bytes"] - resident_bytes(p["n_params"])) / GIB for p in points])
    else:
        y = np.array([p["time_s"] / (1 + RECYCLE_COST * p["shape"].recycles) for p in points])
    return x, y


def _coefs(names: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    return {k: round(float(v), DIGITS) for k, v in zip(names, values)}


def _precision_factors(points: list[dict]) -> dict[str, dict[str, float]]:
    by_key = {(p["mode"], p["shape"].crop, p["shape"].rows, p["shape"].extra_rows, p["shape"].recycles,
               p["shape"].precision): p for p in points}
    ratios: dict[str, list[float]] = {"peak": [], "time": []}
    for (mode, *shape, precision), p in by_key.items():
        ref = by_key.get((mode, *shape, "bf16"))
        if precision == "fp32" and ref is not None:
            ratios["peak"].append(p["peak_bytes"] / ref["peak_bytes"])
            ratios["time"].append(p["time_s"] / ref["time_s"])
    fp32 = {k: round(statistics.median(v), DIGITS) if v else 1.0 for k, v in ratios.items()}
    return {"bf16": {"peak": 1.0, "time": 1.0}, "fp32": {**fp32, "pairs": len(ratios["peak"])}}


def fit_table(root: Path) -> dict[str, Any]:
    """The coefficient table fitted to every record under `root` (deterministic: sorted files and points)."""
    points = load_points(root)
    bf16 = [p for p in points if p["shape"].precision == "bf16"]
    modes: dict[str, Any] = {}
    order = sorted(memory_preset_names(), key=lambda m: m in PARENTS)  # parents first
    for mode in order:
        own = [p for p in bf16 if p["mode"] == mode]
        shapes = {(p["shape"].crop, p["shape"].rows, p["shape"].extra_rows) for p in own}
        entry: dict[str, Any] = {"points": len(own), "shapes": len(shapes)}
        if len(shapes) >= MIN_SHAPES:
            entry["fit"] = "own"
            for what, names in (("peak", PEAK_TERMS), ("time", TIME_TERMS)):
                entry[what] = _coefs(names, _nnls_relative(*_rows(own, what)))
        elif own and PARENTS.get(mode) in modes and modes[PARENTS[mode]].get("peak"):
            parent = modes[PARENTS[mode]]
            entry["fit"] = f"scale of {PARENTS[mode]}"
            for what, names in (("peak", PEAK_TERMS), ("time", TIME_TERMS)):
                x, y = _rows(own, what)
                base = x @ np.array([parent[what][k] for k in names])
                scale = float(np.sum(base / y) / np.sum(np.square(base / y)))
                entry[what] = _coefs(names, np.array([parent[what][k] * scale for k in names]))
        else:
            entry.update(fit="none", peak=None, time=None,
                         note="no measured training step" if not own else "too few points and no parent")
        if len(shapes) and len(shapes) <= 2:
            entry["note"] = f"{len(shapes)} measured shape(s): fitted, not validated"
        modes[mode] = entry
    table = {"fitted_to": "af2 preset, kind train, status ok, bench records under benchmarks/gpu/",
             "recycle_cost": RECYCLE_COST, "precision": _precision_factors(points),
             "modes": {m: modes[m] for m in sorted(modes)}}
    # a preset's worst under-prediction of its measured peaks: `auto` raises its predictions by it (each mode's
    # errors depend only on its own coefficients, so one pass over the points serves every mode)
    errors = model_errors(root, table, points)
    for mode, entry in table["modes"].items():
        if entry["peak"] is not None:
            under = [-r["peak_err"] for r in errors if r["mode"] == mode]
            entry["peak_margin"] = round(max([0.0, *under]), DIGITS)
    return table


def model_errors(root: Path, table: dict[str, Any], points: list[dict] | None = None) -> list[dict[str, Any]]:
    """Per measured point: predicted against measured peak and time, relative errors."""
    from protfold.plan.cost import predict

    cfg, rows = model_preset("af2"), []
    for p in load_points(root) if points is None else points:
        pred = predict(p["mode"], cfg, p["shape"], n_params=p["n_params"], table=table)
        if pred.peak_bytes is None:
            continue
        rows.append({"mode": p["mode"], "crop": p["shape"].crop, "rows": p["shape"].rows,
                     "extra_rows": p["shape"].extra_rows, "recycles": p["shape"].recycles,
                     "precision": p["shape"].precision, "peak_gib": p["peak_bytes"] / GIB,
                     "pred_peak_gib": pred.peak_bytes / GIB, "time_s": p["time_s"], "pred_time_s": pred.time_s,
                     "peak_err": pred.peak_bytes / p["peak_bytes"] - 1, "time_err": pred.time_s / p["time_s"] - 1,
                     "sources": p["sources"]})
    return rows


def leave_one_out(root: Path) -> list[dict[str, Any]]:
    """Held-out errors of the presets fitted on their own points: each bf16 shape of such a preset is predicted
    by a fit of that preset's other shapes (a preset left with fewer than MIN_SHAPES shapes is skipped)."""
    bf16 = [p for p in load_points(root) if p["shape"].precision == "bf16"]
    rows = []
    for mode in sorted({p["mode"] for p in bf16}):
        own = [p for p in bf16 if p["mode"] == mode]
        if len(own) <= MIN_SHAPES:
            continue
        for held in own:
            rest = [p for p in own if p is not held]
            coefs = {what: _nnls_relative(*_rows(rest, what)) for what in ("peak", "time")}
            (xp,), (xt,) = _rows([held], "peak")[0], _rows([held], "time")[0]
            peak = resident_bytes(held["n_params"]) + float(xp @ coefs["peak"]) * GIB
            time = float(xt @ coefs["time"]) * (1 + RECYCLE_COST * held["shape"].recycles)
            rows.append({"mode": mode, "crop": held["shape"].crop, "rows": held["shape"].rows,
                         "peak_err": peak / held["peak_bytes"] - 1, "time_err": time / held["time_s"] - 1})
    return rows
