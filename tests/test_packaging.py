"""A plain (non-editable) install carries what the package reads at run time: the residue constants and the
memory presets, so `load_memory_preset("low")` and `--model.memory low` work away from a source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
import protfold, protfold.config as c
from protfold.train.lightning_cli import preset_paths
assert "site" in protfold.__file__, protfold.__file__
mem = c.load_memory_preset("low")
assert mem.low_memory_triangle and mem.blocks_per_checkpoint == 1, mem
assert set(c.memory_preset_names()) >= {"none", "low", "long", "compiled_flex"}
path = preset_paths(["--model.memory", "low"])[1]
assert path.startswith(str(c.MEMORY_PRESET_DIR)) and c.load_memory_preset(path) == mem, path
print("OK", protfold.__file__)
"""


def test_wheel_ships_memory_presets(tmp_path):
    """Build a wheel from a copy of the sources (no build isolation: the venv's setuptools), unpack it and import
    protfold from there, with the working directory outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "protfold", src / "protfold", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = wheels.glob("protfold-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    run = tmp_path / "elsewhere"
    run.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); exec({PROBE!r})"],
        capture_output=True, text=True, timeout=600, cwd=run, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"OK {site}" in result.stdout, result.stdout
