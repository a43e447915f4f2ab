"""The GPU benchmark scripts refuse bad arguments in one line before touching a device (no traceback)."""

from __future__ import annotations

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
])
def test_bad_arguments_fail_in_one_line(script, args, message, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written
