"""The suite itself: a test must not leave torch's process-wide settings changed for the tests after it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import torch._dynamo


def test_dynamo_settings_still_readable():
    cfg = torch._dynamo.config
    assert isinstance(cfg.recompile_limit, int) and cfg.recompile_limit > 2
    assert cfg.fail_on_recompile_limit_hit is False
'''


def test_flex_limit_test_leaves_dynamo_config_intact(tmp_path):
    """The flex-limit test patches dynamo's recompile limit; the next test must still read that setting (with
    pytest 9, monkeypatch's undo deleted it from torch's config module, so a later compiled fit failed)."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(REPO),
         str(REPO / "tests/model/test_primitives.py") + "::test_eager_flex_fails_loudly_at_its_limit", str(probe)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout, result.stdout[-2000:]
