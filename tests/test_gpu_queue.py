"""scripts/gpu_queue.sh's CPU pinning, on this machine's real CPU set with a stand-in `nvidia-smi`: each GPU's
worker gets its own whole physical cores that `taskset` accepts, and too few cores leave workers unpinned
instead of failing their jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_queue.sh"

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")


def _pin(tmp_path: Path, gpu: int, n_gpu: int) -> str:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: stand-in'\n" for i in range(n_gpu)))
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT), "pin", str(gpu)], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def _cores(cpus: set[int]) -> set[str]:
    out = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        out.add(path.read_text().strip() if path.exists() else str(cpu))
    return out


def test_each_gpu_gets_its_own_cores_or_none(tmp_path) -> None:
    allowed = os.sched_getaffinity(0)
    n_cores = len(_cores(allowed))
    n_gpu = 2 if n_cores >= 4 else 1
    shares = [_pin(tmp_path, gpu, n_gpu) for gpu in range(n_gpu)]
    if n_cores // n_gpu < 2:
        assert shares == [""] * n_gpu
        return
    sets = []
    for share in shares:
        prefix, flag, cpus = share.split()
        assert (prefix, flag) == ("taskset", "-c")
        sets.append({int(c) for c in cpus.split(",")})
    assert all(s and s <= allowed for s in sets)
    if n_gpu > 1:  # disjoint CPUs, and no physical core split between the two workers
        assert not sets[0] & sets[1]
        assert not _cores(sets[0]) & _cores(sets[1])


def test_too_few_cores_leave_workers_unpinned(tmp_path) -> None:
    n_cores = len(_cores(os.sched_getaffinity(0)))
    assert _pin(tmp_path, 0, n_gpu=n_cores) == ""  # one core per GPU: no share of two cores
