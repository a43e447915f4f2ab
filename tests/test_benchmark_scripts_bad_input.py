"""The GPU benchmark scripts refuse bad arguments in one line before touching a device (no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, args, message", [
    ("openfold_block.py", ["--shims", "{tmp}"], "no of_step.py there"),
    ("openfold_block.py", ["--shims", "{tmp}", "--lengths", "0"], "no of_step.py there"),
    ("profile_block.py", ["--n", "0", "--out", "{tmp}"], "--n must be >= 1"),
    ("auto_check.py", ["--out", "{tmp}", "--steps", "0"], "--steps must be >= 1"),
    ("auto_check.py", ["--out", "{tmp}", "--records", "{tmp}", "--crops", "256"], "missing: 256"),
    ("auto_check.py", ["--out", "{tmp}", "--card_gib", "-5"], "--card_gib must be > 0"),
    ("attention_kernels.py", ["--out", "{tmp}", "--steps", "0", "--device", "cpu"], "--steps must be >= 1"),
    ("attention_kernels.py", ["--out", "{tmp}", "--lengths", "64", "0", "--device", "cpu"], "--lengths must be >= 1"),
    ("long_predict.py", ["--out", "{tmp}", "--n_res", "0"], "--n_res must be >= 1"),
    ("long_predict.py", ["--out", "{tmp}", "--recycles", "-1"], "--recycles >= 0"),
])
def test_bad_arguments_fail_in_one_line(script, args, message, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("flex_time, verdict_rc", [(1.30, 0), (1.80, 1)])
def test_auto_check_judges_recorded_runs_without_a_gpu(flex_time, verdict_rc, tmp_path):
    """--records: auto's pick at crop 256 (compiled_flex on a 139 GiB card) against the measured modes."""
    records = tmp_path / "records"
    (records / "crop_256").mkdir(parents=True)
    runs = [{"mode": "compiled_flex", "status": "ok", "peak_bytes": 4 * 2**30, "step_time_s": flex_time},
            {"mode": "compiled", "status": "ok", "peak_bytes": 7 * 2**30, "step_time_s": 1.55}]
    (records / "crop_256" / "results.json").write_text(json.dumps(runs))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "auto_check.py"), "--out", str(tmp_path / "out"),
                             "--records", str(records), "--crops", "256", "--card_gib", "139.29"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == verdict_rc, result.stderr
    (row,) = json.loads((tmp_path / "out" / "auto_check.json").read_text())
    assert row["pick"] == "compiled_flex" and row["pick_fits"]
    assert row["fastest_measured"] == ("compiled_flex" if verdict_rc == 0 else "compiled")


def test_auto_check_refuses_a_malformed_record_in_one_line(tmp_path):
    records = tmp_path / "records"
    (records / "crop_256").mkdir(parents=True)
    (records / "crop_256" / "results.json").write_text(json.dumps([{"mode": "compiled_flex"}]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "auto_check.py"), "--out", str(tmp_path / "out"),
                             "--records", str(records), "--crops", "256", "--card_gib", "139.29"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "results.json: not a bench results.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_attention_kernels_runs_on_the_cpu_and_writes_its_record(tmp_path):
    """A smoke test of the GPU script on the CPU (naive kernel, one length): the table and the JSON with its
    environment (card, torch, command, date) and one record per module."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_kernels.py"), "--device", "cpu",
                             "--lengths", "16", "--kernels", "naive", "--rows", "4", "--steps", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "attention_kernels.json").read_text())
    assert {"card", "torch", "command", "date"} <= set(data["env"])
    assert [(r["module"], r["kernel"]) for r in data["records"]] == [("triangle", "naive"), ("msa_row", "naive")]
    assert all(r["train"]["ms"] > 0 and r["no_grad"]["ms"] > 0 for r in data["records"])
    assert "| triangle | 16 | 16 | naive |" in (tmp_path / "attention_kernels.md").read_text()


@pytest.mark.parametrize("script, args", [
    ("attention_kernels.py", ["--device", "cpu", "--lengths", "16"]),
    ("long_predict.py", ["--n_res", "8", "--preset", "tiny_ptm"]),
])
def test_an_output_path_that_is_a_file_fails_in_one_line(script, args, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(taken / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot make the output folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert taken.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [taken]
