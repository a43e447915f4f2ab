"""Bench outputs: the printed table, results.json, results.csv and memory_time.png.

Every record carries the environment (device, card, torch version, command line, date); the table header
repeats it once.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protfold.io.atomic import write_text_atomic

__all__ = ["format_bytes", "format_table", "write_outputs"]

REQUIRED = ("kind", "preset", "mode", "precision", "crop", "rows", "extra_rows", "recycles", "status",
            "peak_bytes", "peak_above_start_bytes", "saved_bytes", "step_time_s", "infer_status",
            "infer_peak_bytes", "infer_time_s", "loss", "loss_diff", "grad_diff", "reference", "max_crop",
            "device", "card", "torch", "command", "date")

_COLUMNS = (("mode", "mode"), ("precision", "prec"), ("crop", "crop"), ("rows", "rows"), ("extra_rows", "extra"),
            ("peak_bytes", "peak"), ("saved_bytes", "saved"), ("step_time_s", "step s"),
            ("infer_peak_bytes", "inf peak"), ("infer_time_s", "inf s"), ("loss_diff", "loss_diff"),
            ("grad_diff", "grad_diff"), ("status", "status"))
_OPTIM_COLUMNS = (("optim_state", "optim"), ("ema_storage", "ema"))  # after "mode", when runs differ in them


def _optim_pair(rec: dict[str, Any]) -> str:
    return f"{rec.get('optim_state') or 'fp32'}/{rec.get('ema_storage') or 'fp32'}"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("bytes"):
        return format_bytes(value)
    if key.endswith("_s"):
        return f"{value:.3f}"
    if key.endswith("diff"):
        return f"{value:.1e}" if math.isfinite(value) else str(value)
    return str(value)


def _status(rec: dict[str, Any]) -> str:
    status = rec.get("status", "-")
    if rec.get("kind") != "inference_block" and rec.get("infer_status") not in (None, "ok", "skipped"):
        status += f" (infer {rec['infer_status']})"
    return status


def format_table(records: Sequence[dict[str, Any]], env: dict[str, str]) -> str:
    """The run table (one line per measured run) and, when present, the budget table (max crop per mode)."""
    lines = [f"# protfold bench | card: {env['card']} | torch {env['torch']} | {env['date']}",
             f"# command: {env['command']}"]
    runs = [r for r in records if r.get("kind") != "budget"]
    if runs:
        kinds = sorted({r["kind"] for r in runs})
        pairs = sorted({_optim_pair(r) for r in runs})
        columns = (_COLUMNS[:1] + _OPTIM_COLUMNS + _COLUMNS[1:]) if len(pairs) > 1 else _COLUMNS
        at = (lambda r: f" {_optim_pair(r)}") if len(pairs) > 1 else (lambda r: "")
        refs = sorted({f"{r['crop']}/{r['rows']}/{r['extra_rows']} {r['precision']}{at(r)}: {r['reference']}"
                       for r in runs if r.get("reference") not in (None, "none")})
        lines.append(f"# kind: {', '.join(kinds)}; preset: {', '.join(sorted({r['preset'] for r in runs}))}; "
                     + (f"optimizer state/EMA storage: {', '.join(pairs)}, each compared within itself; "
                        if len(pairs) > 1 else "")
                     + "diffs relative to mode none" + (f" (except {'; '.join(refs)})" if refs else ""))
        rows = [[h for _, h in columns]]
        for r in runs:
            cells = [_cell(k, r.get(k)) for k, _ in columns[:-1]] + [_status(r)]
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if 0 < j < len(row) - 1 else c.ljust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    for r in runs:
        lines.extend(_site_lines(r))
    budget = [r for r in records if r.get("kind") == "budget"]
    if budget:
        lines.append("")
        lines.append(f"# largest crop within {format_bytes(budget[0]['budget_bytes'])} "
                     f"({budget[0]['budget_bytes']:.3g} bytes), searched in steps of 128, bisected to 32")
        for r in budget:
            note = " (search cap)" if r.get("capped") else "" if r.get("complete") else " (lower bound: time limit)"
            if r.get("status") == "error":
                note = f" (lower bound: a probe failed: {r.get('error')})"
            note += " (no probed crop fitted)" if not r["max_crop"] else ""
            lines.append(f"  {r['mode']:<12} {r['precision']:<5} rows {r['rows']:<5} extra {r['extra_rows']:<6} "
                         f"max_crop {r['max_crop']}{note}; first over budget: {r.get('first_failing_crop') or '-'}")
            probes = [f"{crop}: {format_bytes(peak) if peak is not None else 'OOM'}, {seconds:.1f} s"
                      for crop, peak, seconds in r.get("probes") or []]
            if probes:  # each probe is one full step, so its peak and time are a measurement of their own
                lines.append(f"    probes (crop: peak, setup + one step): {'; '.join(probes)}")
    return "\n".join(lines)


def _site_lines(r: dict[str, Any], shown: int = 6) -> list[str]:
    """`--peak-sites`: the lines holding the most memory at the peak of the run's recorded step."""
    sites = r.get("peak_sites")
    if not sites:
        return []
    head = f"# peak sites, {r['mode']} {r['precision']} crop {r['crop']}: "
    if "error" in sites:
        return [head + f"not recorded ({sites['error']})"]
    cut = " (history truncated: the step's end only)" if sites.get("truncated") else ""
    head += f"{format_bytes(sites['peak_bytes'])} requested in the step and alive at its peak{cut}"
    return [head, *(f"    {format_bytes(size):>10}  {count:>6} blocks  {site}" for site, size, count in
                    sites["sites"][:shown])]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_jsonable(value))
    return "" if value is None else value


def write_outputs(out_dir: Path, records: Sequence[dict[str, Any]], *, plot: bool = True) -> None:
    """results.json (a list of records), results.csv (same records, list fields as JSON) and memory_time.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.json", json.dumps([_jsonable(r) for r in records], indent=1))
    keys = list(REQUIRED) + sorted({k for r in records for k in r} - set(REQUIRED))
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow({k: _csv_value(r.get(k)) for k in keys})
    if plot:
        plot_memory_time(records, out_dir / "memory_time.png")


def plot_memory_time(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Two panels against crop: peak memory (GiB or MiB) and step time (s), one line per mode (x precision, rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r.get("kind") != "budget" and r.get("status") == "ok"]
    series: dict[str, list[dict[str, Any]]] = {}
    multi_prec = len({r["precision"] for r in runs}) > 1
    multi_rows = len({(r["rows"], r["extra_rows"]) for r in runs}) > 1
    multi_optim = len({_optim_pair(r) for r in runs}) > 1
    for r in runs:
        label = r["mode"] + (f" {_optim_pair(r)}" if multi_optim else "") + (f" {r['precision']}" if multi_prec else "")
        label += f" {r['rows']}/{r['extra_rows']}" if multi_rows else ""
        series.setdefault(label, []).append(r)
    top = max((r["peak_bytes"] for r in runs), default=0)
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["crop"])
        crops = [r["crop"] for r in rs]
        ax_mem.plot(crops, [r["peak_bytes"] / scale for r in rs], marker="o", label=label)
        ax_time.plot(crops, [r["step_time_s"] for r in rs], marker="o", label=label)
    card = records[0]["card"] if records else "?"
    kind = runs[0]["kind"] if runs else "train"
    ax_mem.set(xlabel="crop (residues)", ylabel=f"peak memory ({unit})", title=f"peak memory, {kind} ({card})")
    ax_time.set(xlabel="crop (residues)", ylabel="time per step (s, median)", title=f"step time, {kind}")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
