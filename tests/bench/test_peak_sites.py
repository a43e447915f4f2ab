"""`--peak-sites`: the allocations alive at a step's peak, from the CUDA allocator's history, grouped by the
protfold line that made them. The summary is checked here on hand-made traces (the format torch records:
innermost frame first); tests/gpu/test_peak_sites_gpu.py checks a recorded one against the allocator's peak."""

from __future__ import annotations

import pytest

from protfold.bench.peak_sites import peak_sites, site_of
from protfold.bench.report import format_table

MODEL = "/repo/protfold/model/triangle.py"
BENCH = {"filename": "/repo/protfold/bench/workloads.py", "line": 140, "name": "step"}
ENGINE = {"filename": "/usr/lib/torch/autograd/graph.py", "line": 829, "name": "_engine_run_backward"}


def alloc(addr: int, size: int, *frames: dict) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def free(addr: int, action: str = "free_requested") -> dict:
    return {"action": action, "addr": addr, "size": 0, "frames": []}


def frame(path: str, line: int, name: str = "forward") -> dict:
    return {"filename": path, "line": line, "name": name}


def test_site_is_the_innermost_protfold_frame_outside_the_bench() -> None:
    assert site_of([frame("/x/torch/nn/functional.py", 9, "linear"), frame(MODEL, 12), BENCH]) \
        == "model/triangle.py:12 forward"
    assert site_of([ENGINE, BENCH]) == "_engine_run_backward (graph.py)"  # gradient buffers: autograd's engine
    assert site_of([]) == "no Python frame"


def test_peak_holds_the_blocks_alive_at_the_largest_total() -> None:
    events = [
        free(999),  # a block from before the trace: ignored
        alloc(1, 100, frame(MODEL, 10), BENCH),
        alloc(2, 50, frame("/repo/protfold/model/evoformer.py", 20), BENCH),
        free(1), free(1, "free_completed"),  # both halves of one free count once
        alloc(3, 200, ENGINE, BENCH),
        alloc(4, 30, frame(MODEL, 11), BENCH),  # the peak: 50 + 200 + 30
        free(3, "free_completed"),
        alloc(5, 10, frame(MODEL, 10), BENCH),  # 90 afterwards: not the peak
    ]
    got = peak_sites(events)
    assert got["peak_bytes"] == 280 and got["events"] == len(events)
    assert got["sites"] == [["_engine_run_backward (graph.py)", 200, 1], ["model/evoformer.py:20 forward", 50, 1],
                            ["model/triangle.py:11 forward", 30, 1]]


def test_sites_beyond_top_are_summed_as_other() -> None:
    events = [alloc(i, 10 * (i + 1), frame(MODEL, i)) for i in range(5)]
    got = peak_sites(events, top=2)
    assert got["peak_bytes"] == 150
    assert got["sites"] == [["model/triangle.py:4 forward", 50, 1], ["model/triangle.py:3 forward", 40, 1],
                            ["other", 60, 3]]


def test_table_prints_the_sites_of_a_run() -> None:
    record = {"kind": "train", "preset": "af2", "mode": "long", "precision": "bf16", "crop": 1024, "rows": 128,
              "extra_rows": 1024, "status": "ok", "reference": "none",
              "peak_sites": {"peak_bytes": 3 * 2**30, "truncated": True, "events": 7,
                             "sites": [["model/triangle.py:11 forward", 2 * 2**30, 4], ["other", 2**30, 9]]}}
    text = format_table([record], {"card": "test", "torch": "x", "date": "d", "command": "c"})
    assert "# peak sites, long bf16 crop 1024: 3.00 GiB allocated in the step and alive at its peak " \
           "(history truncated: the step's end only)" in text
    assert "2.00 GiB       4 blocks  model/triangle.py:11 forward" in text


def test_peak_sites_needs_cuda() -> None:
    from protfold.bench.runner import main
    with pytest.raises(SystemExit, match="--peak-sites needs CUDA"):
        main(["--model", "tiny", "--device", "cpu", "--crops", "16", "--peak-sites"])
