"""scripts/optim_memory.sh: its parts, and the table it makes of bench records (no GPU needed for `table`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "optim_memory.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # python3 of this environment first
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_unknown_part_fails_in_one_line(tmp_path):
    result = _run(str(tmp_path / "out"), "everything")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "unknown part 'everything'" in result.stderr


def test_table_part_tabulates_the_records(tmp_path):
    rec = {"crop": 256, "rows": 128, "extra_rows": 1024, "mode": "low", "status": "ok", "card": "X", "torch": "2",
           "date": "d"}
    runs = {"initial_fp32_fp32": [dict(rec, optim_state="fp32", ema_storage="fp32", peak_bytes=3 * 2**30,
                                       step_time_s=2.0)],
            "initial_8bit_bf16": [dict(rec, optim_state="8bit", ema_storage="bf16", peak_bytes=2 * 2**30,
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
