"""`protfold bench --stability STEPS`: the third axis. The same initial weights train on the same batches
under several variants (fp32, bf16, quantized optimizer state, memory modes); loss and lDDT-Cα are recorded at
every step and compared with the fp32 reference.

    protfold bench --stability 500 --model small --cache cache/samples --variants fp32,bf16,8bit,4bit \
        --modes low --out DIR

Each step is `protfold fit`'s (`protfold.train.step`): `training_loss` (recycles and FAPE clamping drawn per
step from one seeded generator, identical for every variant), backward, `clip_and_step` on `adam`, the AF2
warm-up schedule. Dropout is seeded per step, so every variant draws the same masks. The batches are one
fixed crop per protein (the data pipeline's `make_example`, seeded), cycled: overfitting is the point.
lDDT-Cα is that of the training forward (dropout on) against the crop's true structure. A variant is a set
of overrides (precision, memory preset, OptimConfig fields); one whose OptimConfig field does not exist in
this version is skipped with a one-line note.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from protfold.bench.workloads import autocast
from protfold.config import (
    PRESET_NAMES,
    DataConfig,
    LossConfig,
    MemoryConfig,
    OptimConfig,
    load_memory_preset,
    model_preset,
)
from protfold.data.cache import list_entries, read_entry
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.model.alphafold import AlphaFold
from protfold.train.module import structure_scores, warmup_step_decay
from protfold.train.step import adam, clip_and_step, freeze_unused_heads, training_loss

__all__ = ["VARIANTS", "main", "run_variant"]

# name -> overrides: precision, memory preset (None: --memory), OptimConfig fields
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "8bit": {"precision": "fp32", "optim": {"state": "8bit"}},
    "4bit": {"precision": "fp32", "optim": {"state": "4bit"}},
    "bf16_8bit": {"precision": "bf16", "optim": {"state": "8bit"}},
    "cpu_offload": {"precision": "fp32", "optim": {"state": "cpu_offload"}},
}
REFERENCE = "fp32"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protfold bench --stability", description=__doc__.splitlines()[0])
    p.add_argument("--stability", type=int, required=True, metavar="STEPS", help="training steps per variant")
    p.add_argument("--model", default="tiny", choices=PRESET_NAMES)
    p.add_argument("--cache", required=True, type=Path, help="prepared cache (protfold prepare)")
    p.add_argument("--ids", default=None, help="entries to train on, comma separated (default: the first 3)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--rows", type=int, default=16, help="MSA cluster rows")
    p.add_argument("--extra-rows", "--extra_rows", dest="extra_rows", type=int, default=32)
    p.add_argument("--variants", default="fp32,bf16,8bit,4bit", help=f"comma separated: {', '.join(VARIANTS)}")
    p.add_argument("--modes", default="", help="memory presets, each one more variant at --mode_precision")
    p.add_argument("--mode_precision", "--mode-precision", dest="mode_precision", default="bf16",
                   choices=["fp32", "bf16"])
    p.add_argument("--memory", default="none", help="memory preset of the non-mode variants")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", "--warmup-steps", dest="warmup_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", type=int, default=1,
                   help="variants trained at once, each in its own process on --device (a small model leaves "
                        "most of a GPU idle; the curves do not depend on it)")
    p.add_argument("--out", type=Path, default=None, help="write curves.csv, summary.json/.csv, stability.png")
    return p


def _variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            raise SystemExit(f"protfold bench --stability: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        chosen[name] = {"memory": args.memory, **VARIANTS[name]}
    for mode in [m for m in args.modes.split(",") if m]:
        chosen[f"{mode}_{args.mode_precision}"] = {"precision": args.mode_precision, "memory": mode}
    if REFERENCE not in chosen:
        raise SystemExit(f"protfold bench --stability: the reference variant {REFERENCE!r} must be in --variants")
    for name, spec in chosen.items():  # before any variant trains: a bad preset must not end a long run half-way
        try:
            load_memory_preset(spec["memory"])
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise SystemExit(f"protfold bench --stability: variant {name}: memory preset {spec['memory']!r}: "
                             f"{err}".splitlines()[0]) from None
    return chosen


def _batches(args: argparse.Namespace) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """The entries trained on (--ids, or the cache's first 3) and one fixed crop of each."""
    ids = args.ids.split(",") if args.ids else list_entries(args.cache)[:3]
    if not ids:
        raise SystemExit(f"protfold bench --stability: {args.cache}: no prepared entries")
    data = DataConfig(crop_size=args.crop, max_msa_clusters=args.rows, max_extra_msa=args.extra_rows)
    batches = []
    for i, entry in enumerate(ids):
        path = args.cache / f"{entry}.npz"
        if not path.is_file():
            raise SystemExit(f"protfold bench --stability: {path}: no such prepared entry (--ids)")
        batches.append(collate([make_example(read_entry(path), data, seed=args.seed + i, train=True)]))
    return ids, batches


class _Capture:
    """Calls the model and keeps its outputs, so the step's lDDT-Cα needs no second forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.outputs = model, None

    def __call__(self, batch: dict, *, n_recycles: int, memory: MemoryConfig) -> dict:
        self.outputs = self.model(batch, n_recycles=n_recycles, memory=memory)
        return self.outputs


def _optim(overrides: dict[str, Any], args: argparse.Namespace) -> OptimConfig | str:
    """The variant's OptimConfig, or the one-line reason it cannot be built."""
    try:
        return replace(OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps), **overrides)
    except (TypeError, ValueError) as err:
        return f"OptimConfig({overrides}): {err}"


def run_variant(name: str, spec: dict[str, Any], state: dict[str, torch.Tensor], batches: list[dict],
                draws: list[tuple[int, bool]], args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant for len(draws) steps; {"status", "note", "loss": [...], "lddt_ca": [...]}."""
    optim = _optim(spec.get("optim", {}), args)
    if isinstance(optim, str):
        return {"status": "skipped", "note": optim, "loss": [], "lddt_ca": []}
    device = torch.device(args.device)
    cfg, loss_cfg = model_preset(args.model), LossConfig()
    memory = load_memory_preset(spec["memory"])
    model = AlphaFold(cfg=cfg)
    model.load_state_dict(state)
    model.to(device).train()
    freeze_unused_heads(model, loss_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = adam(params, optim)
    except (ImportError, ValueError, RuntimeError) as err:
        return {"status": "skipped", "note": f"optimizer: {err}".splitlines()[0], "loss": [], "lddt_ca": []}
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_step_decay(optim))
    capture, losses, scores = _Capture(model), [], []
    for step, (n_recycles, clamped) in enumerate(draws):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[step % len(batches)].items()}
        torch.manual_seed(args.seed * 1_000_003 + step)  # the same dropout masks in every variant
        with autocast(device, spec["precision"]):
            loss, _ = training_loss(capture, batch, n_recycles=n_recycles, loss_cfg=loss_cfg, clamped_fape=clamped,
                                    memory=memory)
        if not torch.isfinite(loss):
            return {"status": f"non-finite loss at step {step}", "note": "", "loss": losses, "lddt_ca": scores}
        loss.backward()
        clip_and_step(opt, params, optim.grad_clip)
        opt.zero_grad(set_to_none=True)
        schedule.step()
        with torch.no_grad():
            scores.append(float(structure_scores(capture.outputs, batch)["lddt_ca"]))
        losses.append(float(loss.detach()))
        capture.outputs = None
    return {"status": "ok", "note": "", "loss": losses, "lddt_ca": scores}


def summarize(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the largest and the final divergence from the fp32 reference, and the final lDDT-Cα."""
    ref = runs[REFERENCE]
    rows = []
    for name, run in runs.items():
        row: dict[str, Any] = {"variant": name, "status": run["status"], "note": run["note"],
                               "steps": len(run["loss"])}
        n = min(len(run["loss"]), len(ref["loss"]))
        for key in ("loss", "lddt_ca"):
            diffs = [abs(a - b) for a, b in zip(run[key][:n], ref[key][:n])]
            row[f"max_abs_diff_{key}"] = max(diffs) if diffs else None
            row[f"end_abs_diff_{key}"] = diffs[-1] if diffs else None
        row["final_loss"] = run["loss"][-1] if run["loss"] else None
        row["final_lddt_ca"] = run["lddt_ca"][-1] if run["lddt_ca"] else None
        tail = run["lddt_ca"][-10:]
        row["last10_mean_lddt_ca"] = sum(tail) / len(tail) if tail else None
        rows.append(row)
    return rows


def _plot(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lddt) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        if run["loss"]:
            steps = range(1, len(run["loss"]) + 1)
            ax_loss.plot(steps, run["loss"], label=name, lw=1)
            ax_lddt.plot(steps, run["lddt_ca"], label=name, lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log")
    ax_lddt.set(xlabel="step", ylabel="lDDT-Cα (training forward)", ylim=(0, 1))
    ax_lddt.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(out: Path, runs: dict[str, dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "step", "loss", "lddt_ca"])
        for name, run in runs.items():
            writer.writerows([name, i + 1, a, b] for i, (a, b) in enumerate(zip(run["loss"], run["lddt_ca"])))
    (out / "summary.json").write_text(json.dumps({**meta, "variants": rows}, indent=1) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(runs, out / "stability.png", f"{meta['model']}, crop {meta['crop']}, {meta['steps']} steps, "
          f"{len(meta['ids'])} proteins, {meta['device']}")


def _ordered(runs: dict[str, dict[str, Any]], variants: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: runs[name] for name in variants if name in runs}


def _run_all(variants: dict[str, dict[str, Any]], state: dict[str, torch.Tensor], batches: list[dict],
             draws: list[tuple[int, bool]], args: argparse.Namespace) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, run) per variant as each finishes: in this process one after another, or with --jobs N > 1 in N
    spawned processes at once (each builds its model from the same `state` and reads the same batches)."""
    if args.jobs <= 1 or len(variants) == 1:
        for name, spec in variants.items():
            yield name, run_variant(name, spec, state, batches, draws, args)
        return
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(variants)), mp_context=context) as pool:
        futures = {pool.submit(run_variant, name, spec, state, batches, draws, args): name
                   for name, spec in variants.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> int:
    from protfold.env import environment

    args = build_parser().parse_args(argv)
    if args.stability < 1:
        raise SystemExit("protfold bench --stability: STEPS must be >= 1")
    if args.jobs < 1:
        raise SystemExit(f"protfold bench --stability: --jobs must be >= 1, got {args.jobs}")
    variants = _variants(args)
    ids, batches = _batches(args)
    cfg = model_preset(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    draws = [(int(torch.randint(0, cfg.max_recycles + 1, (1,), generator=gen)),
              bool(torch.rand((), generator=gen) < LossConfig().fape_clamp_prob)) for _ in range(args.stability)]
    torch.manual_seed(args.seed)
    state = {k: v.clone() for k, v in AlphaFold(cfg=cfg).state_dict().items()}
    meta = {"model": args.model, "crop": args.crop, "rows": args.rows, "extra_rows": args.extra_rows,
            "steps": args.stability, "ids": ids, "lr": args.lr, "warmup_steps": args.warmup_steps,
            "seed": args.seed, "reference": REFERENCE, "variant_specs": variants,
            **environment(torch.device(args.device), argv)}
    runs: dict[str, dict[str, Any]] = {}
    for name, run in _run_all(variants, state, batches, draws, args):
        runs[name] = run
        if run["status"] == "skipped":
            print(f"# {name}: skipped: {run['note']}", file=sys.stderr)
        if args.out and REFERENCE in runs:  # after every variant: a run stopped later keeps those it finished
            _write(args.out, _ordered(runs, variants), summarize(_ordered(runs, variants)), meta)
    runs = _ordered(runs, variants)
    rows = summarize(runs)
    keys = ["variant", "status", "max_abs_diff_loss", "end_abs_diff_loss", "max_abs_diff_lddt_ca",
            "end_abs_diff_lddt_ca", "final_lddt_ca"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(_fmt(row[k]) for k in keys))
    if args.out:
        _write(args.out, runs, rows, meta)
        print(f"# wrote {args.out / 'summary.json'}, summary.csv, curves.csv, stability.png")
    return 0
