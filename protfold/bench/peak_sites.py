"""Where a CUDA step's peak memory lives: the allocations made during one recorded step and still alive at its
peak, grouped by the protfold lines that made them.

The record is torch's allocator history (`torch.cuda.memory._record_memory_history`, the data that
pytorch.org/memory_viz shows). Only the summary is kept: a step at a long crop makes millions of events.
- Sizes are the requested bytes of each allocation, so the figure compares with the allocator's
  `requested_bytes` statistics, a little below `max_memory_allocated` (which counts rounded blocks).
- Allocations made before the recording (weights, Adam state, the batch) are not in it, and frees of such blocks
  during the step are not counted: the figure is the peak above the step's start as long as the step frees
  nothing it did not allocate (true of the bench's training step, which sets gradients to None beforehand).
- Backward kernels on CUDA allocate from autograd's own thread, which has no Python frames; those allocations
  (gradients, backward intermediates) are grouped as "backward (autograd thread)". Recomputed checkpoints run
  Python on that thread, so their allocations keep their protfold lines.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

__all__ = ["BACKWARD", "peak_sites", "record_peak_sites", "site_of"]

BACKWARD = "backward (autograd thread)"
_PACKAGE = str(Path(__file__).resolve().parents[1]) + "/"  # .../protfold/


def _own(filename: str, package: str) -> bool:
    return filename.startswith(package) and not filename.startswith(package + "bench/")


def _where(frame: Mapping[str, Any], package: str) -> str:
    name = str(frame.get("filename", "?"))
    short = name[len(package):] if name.startswith(package) else PurePosixPath(name).name
    return f"{short}:{frame.get('line', 0)} {frame.get('name', '?')}"


def site_of(frames: Sequence[Mapping[str, Any]], package: str = _PACKAGE) -> str:
    """The innermost protfold frame outside the bench, with its nearest protfold caller in another file, so a
    shared helper names who called it ("model/primitives.py:98 _naive_attention < model/triangle.py:285
    forward"). Without a protfold frame: the innermost frame of any file (an inductor kernel's `call` line, say);
    without any frame: BACKWARD. `package` is the protfold directory with a trailing slash."""
    own = [f for f in frames if _own(str(f.get("filename", "")), package)]  # torch records the innermost first
    if own:
        first = own[0]
        caller = next((f for f in own[1:] if f.get("filename") != first.get("filename")), None)
        return _where(first, package) + (f" < {_where(caller, package)}" if caller else "")
    return _where(frames[0], package) if frames else BACKWARD


def peak_sites(events: Iterable[Mapping[str, Any]], *, top: int = 12, package: str = _PACKAGE) -> dict[str, Any]:
    """The allocations alive at the peak of `events` (one device's allocator trace, oldest first).

    An allocation counts from its "alloc" until its "free_requested" (or "free_completed", whichever comes
    first), at its requested size. Frees of blocks allocated before the trace began are ignored. Returns
    {"peak_bytes", "sites": [[site, bytes, count], ...] largest first (at most `top`, the rest summed as
    "other"), "events"}.
    """
    events = list(events)

    def size(e: Mapping[str, Any]) -> int:
        return int(e.get("requested_size", e["size"]))

    live: dict[int, int] = {}
    total = best = best_at = 0
    for i, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            total += size(e) - live.get(e["addr"], 0)  # an address still live (a missed free) is replaced
            live[e["addr"]] = size(e)
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
        entry = by_site[site_of(e.get("frames") or [], package)]
        entry[0] += size(e)
        entry[1] += 1
    ranked = sorted(([site, n, count] for site, (n, count) in by_site.items()), key=lambda r: -r[1])
    if len(ranked) > top:
        rest = ranked[top:]
        ranked = [*ranked[:top], ["other", sum(r[1] for r in rest), sum(r[2] for r in rest)]]
    return {"peak_bytes": best, "sites": ranked, "events": len(events)}


def record_peak_sites(step: Callable[[], Any], device: torch.device, *, max_entries: int = 8_000_000,
                      top: int = 12) -> dict[str, Any]:
    """Run `step` once with the allocator history on (Python stacks of allocations only) and summarise it with
    `peak_sites`. "truncated" is set when the history reached `max_entries`: its oldest events were dropped,
    so the summary covers only the step's end. The history costs host memory and time, not device memory."""
    if device.type != "cuda":
        raise ValueError(f"peak sites need the CUDA allocator's history; device {device} has none")
    known = inspect.signature(torch.cuda.memory._record_memory_history).parameters
    extra: dict[str, Any] = {}
    if "clear_history" in known:
        extra["clear_history"] = True
    if "skip_actions" in known:  # segments are not read (free_completed is kept: a free without it is unproven)
        extra["skip_actions"] = ["segment_alloc", "segment_free"]
    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=max_entries, **extra)
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
