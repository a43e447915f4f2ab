"""Where a CUDA step's peak memory lives: the allocations made during one recorded step and still alive at its
peak, grouped by the protfold line that made them.

The record is torch's allocator history (`torch.cuda.memory._record_memory_history`, the data that
pytorch.org/memory_viz shows). Only the summary is kept: a step at a long crop makes millions of events.
Allocations made before the recording (weights, Adam state, the batch) are not in it, so the figure is the
peak *above* the step's start, as the bench's `peak_above_start_bytes`.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import torch

__all__ = ["peak_sites", "record_peak_sites", "site_of"]

_OWN = "/protfold/"
_NOT_SITES = ("/protfold/bench/",)  # the bench's own frames call the model; they are never the site


def site_of(frames: Sequence[Mapping[str, Any]]) -> str:
    """The innermost protfold frame outside the bench ("model/triangle.py:123 forward"); otherwise the innermost
    frame of any file ("_engine_run_backward (graph.py)"), which for gradient buffers is autograd's engine."""
    for frame in frames:  # torch records the innermost frame first
        name = str(frame.get("filename", ""))
        if _OWN in name and not any(part in name for part in _NOT_SITES):
            path = PurePosixPath(name)
            return f"{path.parent.name}/{path.name}:{frame.get('line', 0)} {frame.get('name', '?')}"
    if frames:
        return f"{frames[0].get('name', '?')} ({PurePosixPath(str(frames[0].get('filename', '?'))).name})"
    return "no Python frame"


def peak_sites(events: Iterable[Mapping[str, Any]], *, top: int = 12) -> dict[str, Any]:
    """The allocations alive at the peak of `events` (one device's allocator trace, oldest first).

    An allocation counts from its "alloc" until its "free_requested" (or "free_completed", whichever comes
    first). Frees of blocks allocated before the trace began are ignored. Returns {"peak_bytes",
    "sites": [[site, bytes, count], ...] largest first (at most `top`, the rest summed as "other"),
    "events"}.
    """
    events = list(events)
    live: dict[int, int] = {}
    total = best = best_at = 0
    for i, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > best:
                best, best_at = total, i + 1
        elif action in ("free_requested", "free_completed"):
            total -= live.pop(e["addr"], 0)
    alive: dict[int, Mapping[str, Any]] = {}
    for e in events[:best_at]:  # replay to the peak, keeping the events whose blocks are alive there
        if e.get("action") == "alloc":
            alive[e["addr"]] = e
        elif e.get("action") in ("free_requested", "free_completed"):
            alive.pop(e["addr"], None)
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in alive.values():
        entry = by_site[site_of(e.get("frames") or [])]
        entry[0] += e["size"]
        entry[1] += 1
    ranked = sorted(([site, size, count] for site, (size, count) in by_site.items()), key=lambda r: -r[1])
    if len(ranked) > top:
        rest = ranked[top:]
        ranked = [*ranked[:top], ["other", sum(r[1] for r in rest), sum(r[2] for r in rest)]]
    return {"peak_bytes": best, "sites": ranked, "events": len(events)}


def record_peak_sites(step: Callable[[], Any], device: torch.device, *, max_entries: int = 4_000_000,
                      top: int = 12) -> dict[str, Any]:
    """Run `step` once with the allocator history on (Python stacks) and summarise it with `peak_sites`.

    "truncated" is set when the history reached `max_entries`: its oldest events were dropped, so the summary
    covers only the step's end.
    """
    if device.type != "cuda":
        raise ValueError(f"peak sites need the CUDA allocator's history; device {device} has none")
    torch.cuda.synchronize(device)
    fresh = {"clear_history": True} if "clear_history" in inspect.signature(
        torch.cuda.memory._record_memory_history).parameters else {}
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                             max_entries=max_entries, **fresh)
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    events = snapshot["device_traces"][index]
    summary = peak_sites(events, top=top)
    summary["truncated"] = len(events) >= max_entries
    return summary
