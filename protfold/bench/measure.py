"""Measuring one step: peak device memory, bytes saved for backward, step time; plus the run's environment.

Peaks. CUDA: `torch.cuda.reset_peak_memory_stats` before and `max_memory_allocated` after, so the absolute
peak includes weights, gradients, optimizer state and the batch (what OpenFold's baseline reports); the peak
minus `memory_allocated()` before the measured region is the step's own share. CPU: the allocator has no
peak counter, so the profiler's memory events give the peak *above the start* of the region; the absolute
CPU figure is that plus the bytes of the tensors alive at the start (weights, gradients, optimizer state,
batch), counted by `resident_bytes`.

Time. CUDA events around each step (synchronised), otherwise `time.perf_counter`; warm-up steps are run
first and not counted; the median of the timed steps is reported.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from protfold.model.memory import saved_activation_bytes

__all__ = [
    "Peak",
    "cpu_profiler_peak",
    "free_memory",
    "median",
    "parse_bytes",
    "peak_of",
    "relative_diff",
    "resident_bytes",
    "saved_bytes",
    "timed_peak",
]

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '16GiB' -> 16 * 2**30, '500MB', '123' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read a byte count from {text!r} (e.g. 80GB, 16GiB, 500MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass
class Peak:
    """Peak memory of a measured region: absolute (incl. what was alive before) and above the start."""

    absolute: int
    above_start: int


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's native start/stop lines), only around start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def cpu_profiler_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), peak bytes above the start) from the CPU profiler's allocation timeline.

    The "[memory]" events carry +bytes for an allocation and -bytes for a free; sorted by time, their
    running sum is the live memory above the start, and its maximum is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak


def _storages(tensors: Iterable[Any], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes() > 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def resident_bytes(module: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                   batch: dict | Iterable[Tensor] | None) -> int:
    """Bytes of parameters, buffers, gradients, optimizer state and batch tensors (each storage once)."""
    seen: set[int] = set()
    total = 0
    if module is not None:
        total += _storages(module.parameters(), seen)
        total += _storages(module.buffers(), seen)
        total += _storages((p.grad for p in module.parameters()), seen)
    if optimizer is not None:
        total += _storages((v for state in optimizer.state.values() for v in state.values()), seen)
    if batch is not None:
        total += _storages(batch.values() if isinstance(batch, dict) else batch, seen)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_peak(step: Callable[[], Any], device: torch.device, *, steps: int, warmup: int,
               resident: Callable[[], int]) -> tuple[list[float], Peak]:
    """Run `warmup` untimed then `steps` timed calls of `step`; return (seconds per timed step, peak).

    CUDA: the peak is max_memory_allocated over the timed steps. CPU: one more call of `step` under the
    profiler (kept out of the timings, which the profiler would slow down) gives the peak above its start,
    and `resident()` (bytes alive at that start) is added for the absolute figure.
    """
    for _ in range(warmup):
        step()
    times: list[float] = []
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated(device)
        return times, Peak(absolute=peak, above_start=peak - before)
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, peak_of(step, device, resident=resident)


def peak_of(step: Callable[[], Any], device: torch.device, *, resident: Callable[[], int]) -> Peak:
    """Peak memory of one call of `step` (CUDA allocator counters, or the CPU profiler + `resident()`)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return Peak(absolute=peak, above_start=peak - before)
    gc.collect()
    base = resident()
    _, above = cpu_profiler_peak(step)
    return Peak(absolute=base + above, above_start=above)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), bytes of activations autograd keeps for backward while fn runs), via memory.saved_activation_bytes."""
    box: list[Any] = []
    total = saved_activation_bytes(lambda: box.append(fn()))
    return box[0], total


def relative_diff(value: Tensor | None, ref: Tensor | None) -> float:
    """max|value - ref| / (max|ref| + 1e-12); a missing tensor counts as zeros; NaN anywhere -> inf."""
    if value is None and ref is None:
        return 0.0
    if value is None:
        value = torch.zeros_like(ref)  # type: ignore[arg-type]
    if ref is None:
        ref = torch.zeros_like(value)
    value, ref = value.detach().double().cpu(), ref.detach().double().cpu()
    if not (torch.isfinite(value).all() and torch.isfinite(ref).all()):
        return float("inf")
    return float((value - ref).abs().max() / (ref.abs().max() + 1e-12)) if ref.numel() else 0.0


def free_memory(device: torch.device) -> None:
    """Collect garbage and give cached CUDA blocks back (after an out-of-memory error or between runs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(exc: Exception, what: str, device: torch.device) -> str:
    """The first line of `exc` (at most 300 characters), reported on stderr as "`what` failed"; device memory
    freed. For failures that are recorded (status "error") while the bench goes on."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    print(f"# {what} failed: {message}", file=sys.stderr)
    free_memory(device)
    return message
