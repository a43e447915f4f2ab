"""`protfold bench` on the CPU with the tiny preset: outputs, exactness of every mode, saved bytes, budget search.

Sizes are odd where they can be (5 MSA rows, 7 extra rows) so transposition bugs show; one torch thread keeps
timings steady on a busy machine.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch

from protfold.bench.budget import budget_search
from protfold.bench.measure import cpu_profiler_peak, parse_bytes, relative_diff
from protfold.bench.report import REQUIRED
from protfold.bench.runner import main
from protfold.bench.synthetic import synthetic_batch

MODES = ("none", "recompute", "chunked", "triangle", "low", "long")
COMMON = ["--model", "tiny", "--device", "cpu", "--rows", "5", "--extra-rows", "7", "--steps", "1",
          "--warmup", "1", "--threads", "1"]
EXACT = 1e-5  # fp32: every mode computes the same function


def run_main(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[int, str, Path]:
    """All five presets plus one YAML with chunks small enough to split these shapes (so chunking really runs)."""
    out = tmp_path_factory.mktemp("bench")
    small = out / "low_small.yaml"
    small.write_text("model:\n  memory:\n    blocks_per_checkpoint: 1\n    recompute_inside_block: true\n"
                     "    msa_chunk: 3\n    pair_chunk: 9\n    low_memory_triangle: true\n")
    code, text = run_main([*COMMON, "--modes", ",".join([*MODES, str(small)]), "--crops", "16,24",
                           "--out", str(out)])
    return code, text, out


def records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_sweep_prints_table_and_writes_outputs(sweep) -> None:
    code, text, out = sweep
    assert code == 0
    header = next(line for line in text.splitlines() if line.startswith("mode"))
    for column in ("peak", "saved", "step s", "inf peak", "inf s", "loss_diff", "grad_diff", "status"):
        assert column in header
    assert "card: cpu" in text and torch.__version__ in text and "--crops 16,24" in text
    recs = records(out)
    assert len(recs) == 2 * (len(MODES) + 1)
    assert {r["mode"] for r in recs} == {*MODES, "low_small"}
    for r in recs:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert r["status"] == "ok" and r["infer_status"] == "ok", r
        assert r["card"] == "cpu" and r["torch"] == torch.__version__ and "protfold bench" in r["command"]
        assert r["date"] and r["device"] == "cpu" and r["preset"] == "tiny"
        assert (r["rows"], r["extra_rows"]) == (5, 7)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(recs) and set(REQUIRED) <= set(rows[0])
    png = (out / "memory_time.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_every_mode_matches_none(sweep) -> None:
    for r in records(sweep[2]):
        assert r["reference"] == "none"
        assert r["loss_diff"] < EXACT and r["grad_diff"] < EXACT, (r["mode"], r["crop"], r["loss_diff"], r["grad_diff"])
        assert torch.isfinite(torch.tensor(r["loss"]))


def test_peaks_are_positive_and_include_the_resident_state(sweep) -> None:
    for r in records(sweep[2]):
        assert r["peak_bytes"] > r["peak_above_start_bytes"] > 0
        assert r["infer_peak_bytes"] > 0 and r["step_time_s"] > 0 and r["infer_time_s"] > 0


def test_recompute_and_low_save_fewer_activations(sweep) -> None:
    by = {(r["mode"], r["crop"]): r["saved_bytes"] for r in records(sweep[2])}
    for crop in (16, 24):
        assert by[("none", crop)] > 0
        for mode in ("recompute", "low", "low_small"):
            assert by[(mode, crop)] < by[("none", crop)], (mode, crop, by)
    assert by[("none", 24)] > by[("none", 16)]


def test_budget_search_on_cpu_gives_a_crop_per_mode(tmp_path) -> None:
    code, text = run_main([*COMMON, "--modes", "none,low", "--crops", "16", "--no-infer", "--budget", "6MB",
                           "--out", str(tmp_path)])
    assert code == 0 and "max_crop" in text
    recs = records(tmp_path)
    budget = {r["mode"]: r for r in recs if r["kind"] == "budget"}
    assert set(budget) == {"none", "low"}
    for mode, b in budget.items():
        assert b["budget_bytes"] == 6_000_000 and b["probes"], b
        assert 16 <= b["max_crop"] <= b["budget_cap"] == 64
        fitting = [c for c, peak, seconds in b["probes"] if peak is not None and peak <= 6_000_000]
        assert all(seconds > 0 for _, _, seconds in b["probes"])
        assert all(c <= b["max_crop"] for c in fitting)
        first = b["probes"][0]  # the table names each probe with its own measurement
        assert f"probes (crop: peak, setup + one step): {first[0]}: " in text and f"{first[2]:.1f} s" in text
        run = next(r for r in recs if r["kind"] == "train" and r["mode"] == mode)
        assert run["max_crop"] == b["max_crop"]


def test_budget_search_steps_then_bisects() -> None:
    found = budget_search(lambda crop: crop <= 300, known={256: True}, cap=4096)
    assert found["probes"][0] == 384 and found["first_failing_crop"] - found["max_crop"] <= 32
    assert found["max_crop"] <= 300 < found["first_failing_crop"]
    capped = budget_search(lambda crop: True, known={16: True}, cap=100)
    assert capped["max_crop"] == 100 and capped["capped"]
    nothing = budget_search(lambda crop: False, known={64: False}, cap=1000)
    assert nothing["max_crop"] == 0


@pytest.mark.parametrize("flag", ["--evoformer-only", "--inference-block"])
def test_evoformer_only_and_inference_block(tmp_path, flag: str) -> None:
    code, text = run_main([*COMMON, flag, "--modes", "none,low", "--crops", "13", "--out", str(tmp_path)])
    assert code == 0
    recs = records(tmp_path)
    kind = "evoformer" if flag == "--evoformer-only" else "inference_block"
    assert [r["mode"] for r in recs] == ["none", "low"] and all(r["kind"] == kind for r in recs)
    for r in recs:
        assert r["status"] == "ok" and r["peak_bytes"] > 0 and r["loss_diff"] < EXACT
    if kind == "evoformer":
        assert recs[1]["grad_diff"] < EXACT and recs[1]["saved_bytes"] < recs[0]["saved_bytes"]


def test_helpers() -> None:
    assert parse_bytes("80GB") == 80_000_000_000 and parse_bytes("1.5GiB") == 3 * 2**29
    with pytest.raises(ValueError):
        parse_bytes("lots")
    a = torch.tensor([1.0, -2.0])
    assert relative_diff(a, a) == 0.0 and relative_diff(a * 1.5, a) == pytest.approx(0.5)
    assert relative_diff(None, a) == pytest.approx(1.0)
    _, peak = cpu_profiler_peak(lambda: torch.ones(1000, 250).sum())
    assert peak >= 1_000_000
    batch = synthetic_batch(9, 3, 4)
    assert batch["msa_feat"].shape[1:3] == (3, 9) and batch["extra_msa_feat"].shape[1:3] == (4, 9)
    assert torch.isfinite(batch["all_atom_positions"]).all() and batch["seq_mask"].sum() == 9


def test_oom_is_recorded_and_others_compare_to_the_lowest_peak(tmp_path, monkeypatch) -> None:
    from protfold.bench import workloads

    real = workloads._Trainer.reference_step

    def none_runs_out(self, seed):
        if self.loss_fn.__self__.mem.blocks_per_checkpoint is None:  # mode none (the job's memory settings)
            raise torch.OutOfMemoryError("simulated")
        return real(self, seed)

    monkeypatch.setattr(workloads._Trainer, "reference_step", none_runs_out)
    code, text = run_main([*COMMON, "--modes", "none,recompute,low", "--crops", "12", "--no-infer",
                           "--out", str(tmp_path)])
    assert code == 0 and "oom" in text
    recs = {r["mode"]: r for r in records(tmp_path)}
    assert recs["none"]["status"] == "oom" and recs["none"]["peak_bytes"] is None
    ref = min(("recompute", "low"), key=lambda m: recs[m]["peak_bytes"])
    for mode in ("recompute", "low"):
        assert recs[mode]["status"] == "ok" and recs[mode]["reference"] == f"{ref} (none: oom)"
        assert recs[mode]["grad_diff"] < EXACT
    assert recs[ref]["loss_diff"] == 0.0


def test_runs_made_survive_a_kill_in_a_later_run(tmp_path, monkeypatch) -> None:
    """A bench killed mid-point (a device lease's end) keeps every run it finished in results.json."""
    from protfold.bench import runner

    real = runner.run_mode

    def killed_at_low(point, mem, net, s, batch):
        if mem.low_memory_triangle:  # the second mode: the lease ends here
            raise KeyboardInterrupt
        return real(point, mem, net, s, batch)

    monkeypatch.setattr(runner, "run_mode", killed_at_low)
    with pytest.raises(KeyboardInterrupt):
        run_main([*COMMON, "--modes", "recompute,low", "--crops", "12", "--no-infer", "--out", str(tmp_path)])
    (rec,) = records(tmp_path)
    assert rec["mode"] == "recompute" and rec["status"] == "ok" and rec["peak_bytes"] > 0
    assert rec["run_wall_s"] > 0


def test_a_failing_mode_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch) -> None:
    """A mode that raises (not out of memory: e.g. a kernel that fails to compile) gets status "error" and its
    message; the modes after it still run and compare."""
    from protfold.bench import runner

    real = runner.run_mode

    def recompute_breaks(point, mem, net, s, batch):
        if mem.blocks_per_checkpoint and not mem.low_memory_triangle:  # mode recompute
            raise RuntimeError("simulated compile failure\nsecond line")
        return real(point, mem, net, s, batch)

    monkeypatch.setattr(runner, "run_mode", recompute_breaks)
    code, text = run_main([*COMMON, "--modes", "none,recompute,low", "--crops", "12", "--no-infer",
                           "--out", str(tmp_path)])
    recs = {r["mode"]: r for r in records(tmp_path)}
    assert code == 0 and "error" in text
    assert recs["recompute"]["status"] == "error"
    assert recs["recompute"]["error"] == "RuntimeError: simulated compile failure"
    assert recs["low"]["status"] == "ok" and recs["low"]["grad_diff"] < EXACT


def test_a_failing_budget_probe_is_recorded(tmp_path, monkeypatch) -> None:
    """A budget probe that raises (not out of memory) ends that mode's search with status "error", its message
    and the probes made so far; the table says so and the other modes still search."""
    from protfold.bench import budget

    real = budget.probe_peak

    def low_breaks_above_16(point, mem, net, s, batch=None):
        if mem.low_memory_triangle and point.crop > 16:
            raise RuntimeError("simulated failure")
        return real(point, mem, net, s, batch)

    monkeypatch.setattr(budget, "probe_peak", low_breaks_above_16)
    code, text = run_main([*COMMON, "--modes", "recompute,low", "--crops", "16", "--no-infer", "--budget", "1GB",
                           "--budget-only", "--budget-cap", "48", "--out", str(tmp_path)])
    budget = {r["mode"]: r for r in records(tmp_path) if r["kind"] == "budget"}
    assert code == 0
    assert budget["low"]["status"] == "error" and budget["low"]["error"] == "RuntimeError: simulated failure"
    assert budget["low"]["max_crop"] == 16 and [p[0] for p in budget["low"]["probes"]] == [16]
    assert "a probe failed: RuntimeError: simulated failure" in text
    assert budget["recompute"]["status"] == "ok" and budget["recompute"]["max_crop"] == 48


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_leaves_nothing_alive(monkeypatch, where) -> None:
    """A run that runs out of memory must free everything it allocated, or every later mode of the sweep
    starts with its leftovers (this once turned `none`'s OOM into OOMs of every mode after it on the GPU).
    The OOM is injected in the second Evoformer block of the gradient pass, in forward or in backward."""
    from protfold.bench.workloads import Network, Point, Settings, run_mode
    from protfold.config import load_memory_preset, model_preset
    from protfold.model import evoformer
    from protfold.model.memory import _LiveBytes

    def oom(*_: object) -> None:
        raise torch.OutOfMemoryError("injected")

    plain, calls = evoformer.EvoformerBlock.forward, {"n": 0}

    def failing(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                if where == "forward":
                    oom()
                out[1].register_hook(oom)
        return out

    cpu = torch.device("cpu")
    net = Network.build("train", model_preset("tiny"), seed=0, device=cpu)
    settings = Settings(device=cpu, steps=1, warmup=1, infer=False)
    point = Point(kind="train", preset="tiny", precision="fp32", crop=24, rows=5, extra_rows=7, recycles=1)
    batch = synthetic_batch(24, 5, 7, seed=0)

    def live_after(**patch: object) -> tuple[str, int]:
        for name, value in patch.items():
            monkeypatch.setattr(evoformer.EvoformerBlock, name, value)
        tracker = _LiveBytes(set())
        with tracker:
            result = run_mode(point, load_memory_preset("none"), net, settings, batch)
        monkeypatch.undo()
        return result.fields["status"], tracker.current

    clean_status, clean = live_after()
    status, left = live_after(forward=failing)
    assert clean_status == "ok" and status == "oom" and calls["n"] >= 2
    # the clean run keeps its loss and gradients (CPU copies) in its result; the failed one keeps nothing
    assert left <= clean, f"{left - clean} bytes still alive after the OOM"


def test_inference_block_owning_its_inputs(tmp_path) -> None:
    """--block-owns-inputs: the block may overwrite m, z (as inside a stack), so the chunked modes make no copy
    of z and peak lower than the same mode keeping the caller's z; outputs still equal `none`'s."""
    peaks = {}
    for owns in (False, True):
        out = tmp_path / str(owns)
        flags = ["--block-owns-inputs"] if owns else []
        code, _ = run_main([*COMMON, "--inference-block", *flags, "--modes", "none,low,low_host", "--crops", "40",
                            "--out", str(out)])
        assert code == 0
        recs = records(out)
        assert all(r["status"] == "ok" and r["loss_diff"] < EXACT and r["block_owns_inputs"] is owns for r in recs)
        peaks[owns] = {r["mode"]: r["peak_bytes"] for r in recs}
    assert peaks[True]["low"] < peaks[False]["low"], peaks
    with pytest.raises(SystemExit, match="inference-block"):
        run_main([*COMMON, "--block-owns-inputs", "--crops", "8"])


def test_experiment_modes_load_and_are_not_presets() -> None:
    """Each experiment mode under benchmarks/modes/ is a valid MemoryConfig that no shipped preset already is."""
    from protfold.bench.runner import load_mode
    from protfold.config import load_memory_preset, memory_preset_names

    files = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "modes").glob("*.yaml"))
    assert len(files) >= 3
    presets = {load_memory_preset(name) for name in memory_preset_names()}
    for path in files:
        assert load_mode(str(path)) not in presets, path.name
