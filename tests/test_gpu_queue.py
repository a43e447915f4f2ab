"""scripts/gpu_queue.sh's CPU pinning, on this machine's real CPU set with a stand-in `nvidia-smi`: each GPU's
worker gets its own whole physical cores that `taskset` accepts, and too few cores leave workers unpinned
instead of failing their jobs. And the driver's job log: each job's real exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_queue.sh"

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")


def _env(tmp_path: Path, n_gpu: int) -> dict[str, str]:
    """The environment with a stand-in `nvidia-smi` that lists `n_gpu` GPUs."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: stand-in'\n" for i in range(n_gpu)))
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}


def _pin(tmp_path: Path, gpu: int, n_gpu: int) -> str:
    done = subprocess.run(["bash", str(SCRIPT), "pin", str(gpu)], env=_env(tmp_path, n_gpu), capture_output=True,
                          text=True, check=True)
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


def _repo_state(repo: Path) -> dict[str, int]:
    """Every file under the checkout (ignored ones included) with its modification time."""
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in repo.rglob("*")
            if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts}


def test_job_log_records_each_jobs_exit_status(tmp_path) -> None:
    """The driver, on one stand-in GPU, runs a job that succeeds and one that fails. Sessions 4 to 6 logged rc=0
    for every job, failed ones included: `$(date ...)` in the same line reset `$?` before it was read."""
    queue = tmp_path / "queue.tsv"
    queue.write_text("# a comment line\nfine\ttrue\nbroken\tfalse\n")
    out = tmp_path / "results"
    env = {**_env(tmp_path, 1), "GPU_QUEUE_DIR": str(out)}
    repo = SCRIPT.parents[1]
    before = _repo_state(repo)
    subprocess.run(["bash", str(SCRIPT), "run", str(queue)], env=env, cwd=repo, capture_output=True,
                   text=True, timeout=600, check=True)
    assert _repo_state(repo) == before, "the driver wrote into the checkout"
    assert (out / "cache" / "1aki_A.npz").is_file()
    ends = [line.split(" ", 2)[2] for line in (out / "jobs.log").read_text().splitlines() if " end " in line]
    assert ends == ["end fine rc=0", "end broken rc=1"], ends
    assert (out / "done").is_file()
