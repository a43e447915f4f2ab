"""Examples per second of the training loader over the prepared sample cache.

    python scripts/loader_speed.py                      # prepares data/samples into a temp dir first
    python scripts/loader_speed.py --cache CACHE_DIR --workers 0 1 2 --examples 64 --write benchmarks/loader_speed.md

For each worker count: one DataModule (crop 256, 128 clusters, 1024 extra rows by default), two epochs of
`--examples` draws each; epoch 1 includes worker start-up and first reads of the cache files, epoch 2
runs on persistent workers with the entries in their memory cache. The loader is the only thing running
(no model), so this is the ceiling the loader sets on training steps per second.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from protfold.data.datamodule import ProteinDataModule
from protfold.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


def _epoch(loader) -> tuple[int, float]:  # noqa: ANN001
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["id"])
    return n, time.perf_counter() - start


def measure(cache_dir: Path, workers: int, args: argparse.Namespace) -> dict:
    dm = ProteinDataModule(
        str(cache_dir), str(SAMPLES / "splits.json"), crop_size=args.crop, max_msa_clusters=args.clusters,
        max_extra_msa=args.extra, batch_size=args.batch_size, num_workers=workers, seed=0,
        samples_per_epoch=args.examples,
    )
    loader = dm.train_dataloader()
    results = {"workers": workers}
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        n, seconds = _epoch(loader)
        results[f"epoch{epoch + 1}"] = n / seconds
    del loader
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="prepared cache (default: prepare data/samples into a temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=48, help="draws per epoch")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=128)
    parser.add_argument("--extra", type=int, default=1024)
    parser.add_argument("--write", type=Path, help="write the table as markdown to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache
        if cache_dir is None:
            cache_dir = Path(tmp) / "cache"
            report = prepare(SAMPLES, cache_dir, msa_dir=SAMPLES / "msas", progress=False)
            print(f"prepared the samples: {report.summary()}")
        rows = [measure(cache_dir, w, args) for w in args.workers]

    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    header = (
        f"crop {args.crop}, {args.clusters} MSA clusters, {args.extra} extra MSA rows, batch size {args.batch_size}, "
        f"{args.examples} draws per epoch (with replacement) from the 20 training chains of data/samples; {machine}"
    )
    table = ["| num_workers | epoch 1 (cold) examples/s | epoch 2 (warm) examples/s | ms/example (warm) |", "| --- | --- | --- | --- |"]
    for r in rows:
        table.append(f"| {r['workers']} | {r['epoch1']:.1f} | {r['epoch2']:.1f} | {1000 / r['epoch2']:.0f} |")
    print(header)
    print("\n".join(table))
    if args.write:
        command = "python scripts/loader_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(
            "# Loader speed\n\n"
            f"`{command.strip()}`\n\n{header}.\n\n" + "\n".join(table) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
