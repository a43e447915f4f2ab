"""`--peak-sites`: the allocations alive at a step's peak, from the CUDA allocator's history, grouped by the
protfold lines that made them. The summary is checked here on hand-made traces (the format torch records:
innermost frame first, requested sizes, no Python frames for backward on autograd's thread);
tests/gpu/test_peak_sites_gpu.py checks a recorded one against the allocator's own statistics."""

from __future__ import annotations

import pytest

from protfold.bench.peak_sites import BACKWARD, peak_sites, site_of
from protfold.bench.report import format_table

PKG = "/repo/protfold/"
TRI, EVO, PRIM = PKG + "model/triangle.py", PKG + "model/evoformer.py", PKG + "model/primitives.py"
BENCH = {"filename": PKG + "bench/workloads.py", "line": 140, "name": "step"}


def alloc(addr: int, size: int, *frames: dict) -> dict:
    return {"action": "alloc", "addr": addr, "size": size + 300, "requested_size": size, "frames": list(frames)}


def free(addr: int, action: str = "free_requested") -> dict:
    return {"action": action, "addr": addr, "size": 0, "frames": []}


def frame(path: str, line: int, name: str = "forward") -> dict:
    return {"filename": path, "line": line, "name": name}


def test_site_names_the_innermost_protfold_line_and_its_caller_in_another_file() -> None:
    inner = [frame("/x/torch/nn/functional.py", 9, "linear"), frame(PRIM, 98, "_naive_attention"),
             frame(PRIM, 210, "forward"), frame(TRI, 285), BENCH]
    assert site_of(inner, PKG) == "model/primitives.py:98 _naive_attention < model/triangle.py:285 forward"
    assert site_of([frame(TRI, 12), BENCH], PKG) == "model/triangle.py:12 forward"  # no caller elsewhere
    kernel = [frame("/tmp/torchinductor_root/ab/cabc.py", 77, "call"), BENCH]
    assert site_of(kernel, PKG) == "cabc.py:77 call"  # no protfold frame: the innermost, with its line
    assert site_of([], PKG) == BACKWARD


def test_peak_holds_the_blocks_alive_at_the_largest_total() -> None:
    events = [
        free(999),  # a block from before the trace: ignored
        alloc(1, 100, frame(TRI, 10), BENCH),
        alloc(2, 50, frame(EVO, 20), BENCH),
        free(1), free(1, "free_completed"),  # both halves of one free count once
        alloc(3, 200),  # backward on autograd's thread: no frames
        alloc(4, 30, frame(TRI, 11), BENCH),  # the peak: 50 + 200 + 30 requested bytes
        free(3, "free_completed"),
        alloc(5, 10, frame(TRI, 10), BENCH),  # 90 afterwards: not the peak
    ]
    got = peak_sites(events, package=PKG)
    assert got["peak_bytes"] == 280 and got["events"] == len(events)
    assert got["sites"] == [[BACKWARD, 200, 1], ["model/evoformer.py:20 forward", 50, 1],
                            ["model/triangle.py:11 forward", 30, 1]]


def test_an_address_allocated_again_without_a_free_replaces_the_old_block() -> None:
    got = peak_sites([alloc(1, 100, frame(TRI, 1)), alloc(1, 40, frame(TRI, 2)), alloc(2, 70, frame(TRI, 3))],
                     package=PKG)
    assert got["peak_bytes"] == 110  # not 210: the first block's bytes do not linger
    assert got["sites"] == [["model/triangle.py:3 forward", 70, 1], ["model/triangle.py:2 forward", 40, 1]]


def test_sites_beyond_top_are_summed_as_other() -> None:
    events = [alloc(i, 10 * (i + 1), frame(TRI, i)) for i in range(5)]
    got = peak_sites(events, top=2, package=PKG)
    assert got["peak_bytes"] == 150
    assert got["sites"] == [["model/triangle.py:4 forward", 50, 1], ["model/triangle.py:3 forward", 40, 1],
                            ["other", 60, 3]]


def test_table_prints_the_sites_of_a_run() -> None:
    record = {"kind": "train", "preset": "af2", "mode": "long", "precision": "bf16", "crop": 1024, "rows": 128,
              "extra_rows": 1024, "status": "ok", "reference": "none",
              "peak_sites": {"peak_bytes": 3 * 2**30, "truncated": True, "events": 7,
                             "sites": [["model/triangle.py:11 forward", 2 * 2**30, 4], ["other", 2**30, 9]]}}
    text = format_table([record], {"card": "test", "torch": "x", "date": "d", "command": "c"})
    assert "# peak sites, long bf16 crop 1024: 3.00 GiB requested in the step and alive at its peak " \
           "(history truncated: the step's end only)" in text
    assert "2.00 GiB       4 blocks  model/triangle.py:11 forward" in text


def test_a_failed_recording_is_printed_not_fatal() -> None:
    record = {"kind": "train", "preset": "af2", "mode": "long", "precision": "bf16", "crop": 64, "rows": 8,
              "extra_rows": 8, "status": "ok", "reference": "none", "peak_sites": {"error": "OutOfMemoryError: x"}}
    text = format_table([record], {"card": "test", "torch": "x", "date": "d", "command": "c"})
    assert "# peak sites, long bf16 crop 64: not recorded (OutOfMemoryError: x)" in text


@pytest.mark.parametrize("extra, message", [([], "--peak-sites needs CUDA"),
                                            (["--budget", "1GB", "--budget-only"], "--budget-only has no sweep runs")])
def test_peak_sites_usage_errors(extra: list[str], message: str) -> None:
    from protfold.bench.runner import main
    with pytest.raises(SystemExit, match=message):
        main(["--model", "tiny", "--device", "cpu", "--crops", "16", "--peak-sites", *extra])


def test_a_recording_that_fails_is_recorded_as_an_error() -> None:
    import torch

    from protfold.bench.workloads import _peak_sites
    got = _peak_sites(lambda: None, torch.device("cpu"))  # no allocator history on the CPU: record_peak_sites raises
    assert got == {"error": "ValueError: peak sites need the CUDA allocator's history; device cpu has none"}
