"""`protfold convert` of a full-size AlphaFold2 parameter file: wall time and peak memory.

Makes a random `af2_ptm` parameter file in AlphaFold2's exact `.npz` layout (every key and shape of
`params_model_3_ptm.npz`, float32, ~372 MB) in a temporary folder, runs `protfold convert` on it in a
subprocess `--repeats` times, and reports each run's wall time and the peak resident memory of the converting
process (`os.wait4`'s ru_maxrss). A process that only imports torch and protfold.weights is measured too, as
the floor. This script itself imports only the standard library: Linux counts the memory of the process that
starts a child into the child's peak, so a parent holding torch would inflate every figure. Targets (issue 13):
under 30 s and under twice the file's size. Prints a table and writes a JSON record.

    python benchmarks/convert_speed.py [--repeats 3] [--out benchmarks/convert_speed.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in a child: writes AF2's layout of af2_ptm with N(0, 1) values one array at a time, as np.savez
# writes an .npz (uncompressed .npy members), and prints the number of parameters.
MAKE_NPZ = """
import sys, zipfile, numpy as np, torch
from protfold.config import MemoryConfig, model_preset
from protfold.model.alphafold import AlphaFold
from protfold.weights.mapping import to_af2
cfg = model_preset("af2_ptm")
with torch.device("meta"):
    shapes = {k: tuple(t.shape) for k, t in to_af2(AlphaFold(cfg=cfg).state_dict(), cfg).items()}
rng = np.random.default_rng(0)
with zipfile.ZipFile(sys.argv[1], "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
    for key, shape in shapes.items():
        with archive.open(key + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, rng.standard_normal(shape, dtype=np.float32))
print(sum(int(np.prod(s)) for s in shapes.values()))
"""
# Run in a child: the checkpoint holds raw and EMA weights for every parameter, of the af2_ptm preset.
CHECK = """
import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=True)
n = sum(t.numel() for t in ckpt["ema"]["shadow"].values())
assert ckpt["state_dict"].keys() == {"model." + k for k in ckpt["ema"]["shadow"]}
assert ckpt["hyper_parameters"] == {"preset": "af2_ptm", "model_overrides": None}, ckpt["hyper_parameters"]
print(n, torch.__version__)
"""


def run(cmd: list[str], workdir: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one child; exits with its stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"convert_speed: {' '.join(cmd)} failed ({proc.returncode}):\n{err.read_text()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024, out.read_text().strip()  # Linux reports KiB


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        info["memory_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
        models = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu_model"] = models[0].split(":", 1)[1].strip() if models else platform.machine()
    except (OSError, IndexError, ValueError):
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "convert_speed.json"))
    parser.add_argument("--tmp", default=None, help="folder for the ~372 MB file and its checkpoint")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="convert_speed_", dir=args.tmp))
    try:
        free = shutil.disk_usage(tmp).free
        if free < 1.5e9:
            sys.exit(f"convert_speed: {tmp} has {free / 1e9:.1f} GB free; the file and its checkpoint need ~0.8 GB")
        source, ckpt = tmp / "params_model_random_ptm.npz", tmp / "converted.ckpt"
        n_params = int(run([sys.executable, "-c", MAKE_NPZ, str(source)], tmp)[2])
        size = source.stat().st_size
        load_before = os.getloadavg()
        floor_s, floor_rss, _ = run([sys.executable, "-c", "import torch, protfold.weights"], tmp)
        cmd = [sys.executable, "-m", "protfold.cli", "convert", str(source), "--out", str(ckpt), "--overwrite"]
        runs = [run(cmd, tmp) for _ in range(args.repeats)]
        load_after = os.getloadavg()
        checked, torch_version = run([sys.executable, "-c", CHECK, str(ckpt)], tmp)[2].split()
        assert int(checked) == n_params, (checked, n_params)
        ckpt_size = ckpt.stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    times, peaks = [r[0] for r in runs], [r[1] for r in runs]
    median_s, peak = statistics.median(times), max(peaks)
    record = {
        "benchmark": "protfold convert of a full-size af2_ptm AlphaFold2 .npz (random values)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/convert_speed.py", *sys.argv[1:]]),
        "measured_command": "protfold convert params_model_random_ptm.npz --out converted.ckpt --overwrite",
        "machine": machine(), "torch": torch_version,
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in load_after]},
        "parameters": n_params, "npz_bytes": size, "checkpoint_bytes": ckpt_size,
        "wall_s": [round(t, 2) for t in times], "wall_s_median": round(median_s, 2),
        "peak_rss_bytes": peaks, "peak_rss_over_npz": round(peak / size, 3),
        "import_only": {"wall_s": round(floor_s, 2), "peak_rss_bytes": floor_rss},
        "targets": {"wall_s_below": 30.0, "peak_rss_over_npz_below": 2.0},
        "met": median_s < 30.0 and peak < 2 * size,
        "output": runs[-1][2],
    }
    mib = 2**20
    rows = [("npz file", f"{size / mib:.0f} MiB ({n_params:,} float32)"),
            ("checkpoint", f"{ckpt_size / mib:.0f} MiB (raw and EMA weights, stored once)"),
            ("wall time", f"median {median_s:.1f} s of {', '.join(f'{t:.1f}' for t in times)} (target < 30 s)"),
            ("peak RSS", f"{peak / mib:.0f} MiB = {peak / size:.2f}x the file (target < 2x)"),
            ("import only", f"{floor_s:.1f} s, {floor_rss / mib:.0f} MiB (torch and protfold.weights)"),
            ("load average", f"{record['load_average_1_5_15']['before']} -> {record['load_average_1_5_15']['after']}"),
            ("targets met", "yes" if record["met"] else "NO")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    text = json.dumps(record, indent=1)
    # lists of numbers on one line each
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
