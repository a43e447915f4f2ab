"""Learning check: the `small` preset overfits one real sample protein on the CPU.

    python3 scripts/overfit.py --entry 6mrr_A --steps 600 --out benchmarks/overfit

Trains on one prepared entry (whole chain, no crop, its real MSA if any) with the AF2 losses and Adam, and
every `--eval-every` steps measures lDDT-Cα, Cα RMSD and GDT-TS of the prediction (eval mode, no dropout)
against the experimental structure. Writes `log.csv`, `curve.png` and `summary.json` under --out and stops
early once lDDT-Cα reaches --target.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from protfold.config import DataConfig, LossConfig, model_preset
from protfold.data.cache import read_entry
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.losses import alphafold_loss
from protfold.model.alphafold import AlphaFold
from protfold.train.module import structure_scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="cache/samples")
    p.add_argument("--entry", default="6mrr_A")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/overfit")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    raw = read_entry(Path(args.cache) / f"{args.entry}.npz")
    length = len(raw["aatype"])
    data = DataConfig(crop_size=length, max_msa_clusters=32, max_extra_msa=64)
    cfg = replace(model_preset("small"), max_recycles=0, eval_recycles=0)
    model = AlphaFold(cfg=cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, eps=1e-6)
    losses = LossConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        batch = collate([make_example(raw, data, seed=step, train=True)])
        loss, _ = alphafold_loss(model(batch), batch, losses, use_clamped_fape=step % 10 != 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if step % args.eval_every == 0 or step == 1:
            model.eval()
            with torch.no_grad():
                batch = collate([make_example(raw, data, seed=0, train=False)])
                scores = {k: float(v) for k, v in structure_scores(model(batch), batch).items()}
            rows.append({"step": step, "loss": float(loss), **scores, "elapsed_s": round(time.time() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
            if scores["lddt_ca"] >= args.target:
                break
    with open(out / "log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"entry": args.entry, "length": length, "preset": "small", "steps": rows[-1]["step"],
               "final": rows[-1], "best_lddt_ca": max(r["lddt_ca"] for r in rows), "target": args.target,
               "reached": max(r["lddt_ca"] for r in rows) >= args.target, "device": "cpu",
               "torch": torch.__version__, "date": str(date.today()), "command": " ".join(["python3", *sys.argv])}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(rows, out / "curve.png", args.entry)
    print(json.dumps(summary))
    return 0 if summary["reached"] else 1


def _plot(rows: list[dict], path: Path, entry: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["lddt_ca"] for r in rows], marker="o", ms=3, label="lDDT-Cα")
    a.plot(steps, [r["gdt_ts"] for r in rows], marker="o", ms=3, label="GDT-TS")
    a.set_ylim(0, 1)
    a.set_title(f"small preset overfitting {entry}")
    b.plot(steps, [r["rmsd_ca"] for r in rows], marker="o", ms=3, color="C3", label="Cα RMSD (Å)")
    b2 = b.twinx()
    b2.plot(steps, [r["loss"] for r in rows], color="C7", alpha=0.6, label="train loss")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
