"""scripts/optim_memory.sh: its parts, and the table it makes of bench records (no GPU needed for `table`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "optim_memory.sh"


def _run(*args: str, bin_dir: Path | None = None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # python3 of this environment first
    env = {"PATH": f"{bin_dir}:{path}" if bin_dir else path}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_unknown_part_or_mode_fails_in_one_line(tmp_path):
    result = _run(str(tmp_path / "out"), "everything")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "unknown part 'everything'" in result.stderr
    result = _run(str(tmp_path / "out"), "finetune", "low")
    assert result.returncode == 2 and result.stderr.strip() == \
        "optim_memory.sh: unknown fine-tune mode 'low' (compiled_flex, long)"
    result = _run(str(tmp_path / "out"), "initial", "long")
    assert result.returncode == 2 and result.stderr.strip() == \
        "optim_memory.sh: MODE ('long') applies to the finetune part only, not 'initial'"


def _fake_bench(tmp_path: Path) -> tuple[Path, Path]:
    """A `protfold` first on PATH that appends its arguments, one call a line, to calls.txt."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "protfold").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "protfold").chmod(0o755)
    return bin_dir, calls


@pytest.mark.parametrize(("args", "expected"), [
    (("finetune",), [("finetune_compiled_flex", "compiled_flex", "300", "384"), ("finetune_long", "long", "400", "384")]),
    (("finetune", "long"), [("finetune_long", "long", "400", "384")]),
    (("initial",), [("initial_low_compiled_flex", "low,compiled_flex", "500", "256")]),
])
def test_each_bench_call_sweeps_all_six_pairs(tmp_path, args, expected):
    """One bench call per activation mode (or for both, initially), each under its own time limit, with the three
    optimizer-state kinds x the two EMA storages in that one call."""
    bin_dir, calls = _fake_bench(tmp_path)
    result = _run(str(tmp_path / "out"), *args, bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == len(expected)
    for line, (name, modes, limit, crop) in zip(lines, expected):
        argv = line.split()
        value = {flag: argv[argv.index(flag) + 1] for flag in ("--out", "--modes", "--time-limit", "--crops",
                                                               "--optim.state", "--optim.ema_storage")}
        assert value == {"--out": str(tmp_path / "out" / name), "--modes": modes, "--time-limit": limit,
                         "--crops": crop, "--optim.state": "fp32,8bit,cpu_offload", "--optim.ema_storage": "fp32,bf16"}


def test_table_part_tabulates_the_records(tmp_path):
    rec = {"crop": 256, "rows": 128, "extra_rows": 1024, "mode": "low", "status": "ok", "card": "X", "torch": "2",
           "date": "d"}
    runs = {"initial_fp32_fp32": [dict(rec, optim_state="fp32", ema_storage="fp32", peak_bytes=3 * 2**30,
                                       step_time_s=2.0)],  # a folder of the one-pair calls the script made before
            "initial_low_compiled_flex": [dict(rec, optim_state="8bit", ema_storage="bf16", peak_bytes=2 * 2**30,
                                               step_time_s=2.5),
                                          dict(rec, mode="compiled_flex", optim_state="8bit", ema_storage="bf16",
                                               status="oom", peak_bytes=None, step_time_s=None)]}
    for name, records in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(records))
    result = _run(str(tmp_path), "table")
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2:] == ["| 256/128/1024 | compiled_flex | 8bit | bf16 | oom | - |",
                         "| 256/128/1024 | low | 8bit | bf16 | 2.00 | 2.50 |",
                         "| 256/128/1024 | low | fp32 | fp32 | 3.00 | 2.00 |"]
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 3
