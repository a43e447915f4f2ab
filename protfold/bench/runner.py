"""`protfold bench`: memory modes compared on one training step (or the Evoformer alone, or one inference block).

For each preset x precision x crop x MSA rows x extra rows, every memory mode runs, with each optimizer-state
kind x EMA storage given, on the same weights (built once per preset with a fixed seed), the same synthetic
batch and the same RNG seed, and is compared with mode `none` under the same optimizer state and EMA storage
(or, when `none` does not fit, with the lowest-memory mode that does). See docs/benchmarks.md.

    python3 -m protfold.bench.runner --model tiny --modes none,recompute,low --crops 32,64 --device cpu --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from protfold.bench import report
from protfold.bench.budget import run_budget
from protfold.bench.measure import failure, free_memory, relative_diff
from protfold.bench.synthetic import synthetic_batch, to_device
from protfold.bench.workloads import ModeResult, Network, Point, Settings, run_mode
from protfold.config import (
    EMA_STORAGES,
    OPTIM_STATES,
    PRESET_NAMES,
    MemoryConfig,
    OptimConfig,
    load_memory_preset,
    model_preset,
)
from protfold.env import environment

log = logging.getLogger(__name__)

__all__ = ["load_mode", "main"]



def load_mode(name_or_path: str) -> MemoryConfig:
    """MemoryConfig of a preset name or YAML path (`protfold.config.load_memory_preset`), or a clean exit."""
    try:
        return load_memory_preset(name_or_path)
    except ValueError as err:
        raise SystemExit(f"protfold bench: {err}") from None


def _mode_name(name_or_path: str) -> str:
    """A preset name as given; a YAML path by its file stem (so tables stay narrow)."""
    path = Path(name_or_path)
    return path.stem if path.suffix in (".yaml", ".yml") and path.is_file() else name_or_path


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _skip_rule(text: str) -> tuple[str, str | None, int]:
    """'none=384' or 'none/fp32=384': skip that mode (in that precision) at crops above 384."""
    try:
        key, crop = text.split("=")
        mode, _, prec = key.partition("/")
        return mode, prec or None, int(crop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--skip-above wants MODE[/PRECISION]=CROP, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protfold bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"preset(s), comma separated: {', '.join(PRESET_NAMES)}")
    p.add_argument("--modes", default="none,recompute,chunked,triangle,low",
                   help="memory preset names (protfold/resources/memory) or YAML paths, comma separated")
    p.add_argument("--crops", default="32,64", help="crop sizes (residues), comma separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write results.json, results.csv, memory_time.png here")
    p.add_argument("--precisions", default="fp32", help="fp32 and/or bf16 (torch.autocast), comma separated")
    p.add_argument("--rows", default="128", help="MSA cluster rows N_seq, comma separated")
    p.add_argument("--extra-rows", default="1024", help="extra MSA rows, comma separated")
    p.add_argument("--recycles", type=int, default=0, help="no-grad passes before the grad pass")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the seeded comparison step is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optim.state", dest="optim_state", default="fp32",
                   help=f"Adam's state in training steps (as --model.optim.state of fit), comma separated: "
                        f"{', '.join(OPTIM_STATES)}. Every mode runs with every state x EMA storage given, in this "
                        "process (a compiled mode compiles once per point for all of them)")
    p.add_argument("--optim.ema_storage", dest="ema_storage", default="fp32",
                   help=f"where the EMA copy of the weights lives (as --model.optim.ema_storage of fit), comma "
                        f"separated: {', '.join(EMA_STORAGES)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for this run (restored afterwards); 1 is steadiest on a busy machine")
    p.add_argument("--no-infer", action="store_true", help="skip the no-grad inference measurement")
    p.add_argument("--infer-steps", type=int, default=None, help="timed inference calls (default: --steps)")
    p.add_argument("--skip-above", type=_skip_rule, action="append", default=[], metavar="MODE[/PREC]=CROP",
                   help="do not run MODE (in PREC) at crops above CROP; recorded as skipped (repeatable)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; start no new run after this (the rest is recorded as skipped)")
    p.add_argument("--budget", default=None, help="e.g. 80GB: per mode, the largest crop whose peak fits")
    p.add_argument("--budget-cap", type=int, default=None,
                   help="largest crop the budget search tries (default: the model's max_crop on CUDA, "
                        "4x the largest measured crop on CPU)")
    p.add_argument("--budget-time", type=float, default=None,
                   help="seconds per mode for the budget search; when exceeded, max_crop is a lower bound")
    p.add_argument("--budget-only", action="store_true",
                   help="skip the sweep: the budget search starts by probing the largest of --crops")
    p.add_argument("--peak-sites", action="store_true",
                   help="CUDA: one more training step per run with the allocator's history on; records and prints "
                        "which protfold lines hold the memory alive at its peak (its time counts toward --time-limit)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--evoformer-only", action="store_true",
                      help="the Evoformer stack alone, forward + backward, fp32 inputs m, z (OpenFold's table)")
    what.add_argument("--inference-block", action="store_true",
                      help="no-grad inference of one Evoformer block (inputs in the run precision)")
    p.add_argument("--block-owns-inputs", action="store_true",
                   help="with --inference-block: the block may overwrite its inputs m, z (as every block inside a "
                        "stack after the first does); without it the block keeps the caller's z and makes one copy")
    return p


def _skipped(rules: list[tuple[str, str | None, int]], mode: str, point: Point) -> bool:
    return any(m == mode and (p is None or p == point.precision) and point.crop > c for m, p, c in rules)


def _guarded_run(name: str, point: Point, mem: MemoryConfig, net: Network, s: Settings,
                 batch: dict | None) -> ModeResult:
    """run_mode, with a failure other than running out of memory (a kernel that does not compile, say) recorded
    as status "error" and its message, so that the other modes of the sweep still run."""
    try:
        result = run_mode(point, mem, net, s, batch)
        if result.fields.get("status") != "ok":  # out of memory (caught inside): compile afresh next time too
            net.last_run = None
        return result
    except Exception as exc:  # noqa: BLE001 - recorded, reported, and the sweep goes on
        net.last_run = None  # the next run compiles afresh: nothing of a failed run is reused
        message = failure(exc, f"{name} at crop {point.crop}", s.device)
        return ModeResult(fields={"status": "error", "error": message})


def _optim_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(optim state, EMA storage) pairs: the product of the two lists, or a one-line error naming a bad one."""
    states, emas = _names(args.optim_state), _names(args.ema_storage)
    for flag, given, known in (("--optim.state", states, OPTIM_STATES), ("--optim.ema_storage", emas, EMA_STORAGES)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            raise SystemExit(f"protfold bench: {flag}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                             f"use {', '.join(known)} (comma separated)")
    return list(dict.fromkeys(itertools.product(states, emas)))


def _compare_pairs(results: dict[tuple[str, str, str], ModeResult]) -> None:
    """`_compare` within each (optim state, EMA storage) pair: results are keyed (mode, state, ema). The loss and
    gradients compared are the first step's, before any update; the state kinds differ only in the update."""
    for pair in dict.fromkeys(key[1:] for key in results):
        _compare({key[0]: r for key, r in results.items() if key[1:] == pair})


def _compare(results: dict[str, ModeResult]) -> None:
    """Fill loss_diff, grad_diff and reference: each mode against `none`, else the lowest-memory mode that ran.

    About ten small CPU ops per parameter tensor (4,915 in af2), run on one thread: with many threads on cores
    that other work shares, each op wakes them all and the comparison takes tens of seconds instead of 1-2 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_all(results)
    finally:
        torch.set_num_threads(threads)


def _compare_all(results: dict[str, ModeResult]) -> None:
    ok = {name: r for name, r in results.items() if r.fields.get("status") == "ok"}
    if not ok:
        return
    if "none" in ok:
        ref_name, note = "none", "none"
    else:
        ref_name = min(ok, key=lambda n: ok[n].fields["peak_bytes"])
        why = results["none"].fields["status"] if "none" in results else "not run"
        note = f"{ref_name} (none: {why})"
    ref = ok[ref_name]
    for r in ok.values():
        r.fields["reference"] = note
        if ref.outputs:  # inference block: the largest relative output difference
            r.fields["loss_diff"] = max(relative_diff(a, b) for a, b in zip(r.outputs, ref.outputs))
            r.fields["grad_diff"] = None
            continue
        r.fields["loss_diff"] = relative_diff(r.loss, ref.loss)
        names = set(ref.grads) | set(r.grads)
        r.fields["grad_diff"] = max((relative_diff(r.grads.get(n), ref.grads.get(n)) for n in names), default=0.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `protfold bench`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plan" in argv:  # predictions only, nothing runs: protfold.bench.plan
        from protfold.bench import plan

        return plan.main(argv)
    if any(a == "--stability" or a.startswith("--stability=") for a in argv):
        from protfold.bench import stability

        return stability.main(argv)
    if any(part == "auto" for arg in argv for part in arg.removeprefix("--modes=").split(",")):  # `--modes auto`: the preset --model.memory auto would pick
        from protfold.bench.plan import resolve_auto_modes

        argv = resolve_auto_modes(argv)
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args, argv)
    finally:
        torch.set_num_threads(threads)


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f"protfold bench: --device {args.device!r} is not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"protfold bench: --device {args.device} requested, but this machine has no usable CUDA "
                         f"device (torch {torch.__version__}); use --device cpu")
    precisions = _names(args.precisions)
    bad = set(precisions) - {"fp32", "bf16"}
    if bad:
        raise SystemExit(f"protfold bench: unknown precision(s) {sorted(bad)}; use fp32 and/or bf16")
    presets = _names(args.model)
    if args.block_owns_inputs and not args.inference_block:
        raise SystemExit("protfold bench: --block-owns-inputs applies to --inference-block only")
    if args.peak_sites and args.budget_only:
        raise SystemExit("protfold bench: --peak-sites records the sweep's runs; --budget-only has no sweep runs")
    if args.peak_sites and device.type != "cuda":
        raise SystemExit(f"protfold bench: --peak-sites needs CUDA (the allocator's history); device is {device}")
    if args.peak_sites and args.inference_block:
        raise SystemExit("protfold bench: --peak-sites covers training steps; --inference-block has none")
    if args.budget_only and not args.budget:
        raise SystemExit("protfold bench: --budget-only needs --budget")
    pairs = _optim_pairs(args)
    if args.budget and len(pairs) > 1:
        raise SystemExit(f"protfold bench: --budget searches under one optimizer state and EMA storage; got "
                         f"{len(pairs)} pairs from --optim.state {args.optim_state} --optim.ema_storage "
                         f"{args.ema_storage}")
    modes = {_mode_name(name): load_mode(name) for name in _names(args.modes)}
    kind = "evoformer" if args.evoformer_only else "inference_block" if args.inference_block else "train"
    try:
        extras = [0] if kind != "train" else _ints(args.extra_rows)
    except ValueError:
        raise SystemExit(f"protfold bench: --extra-rows wants comma-separated integers, got {args.extra_rows!r}") from None
    try:
        crops, rows_list = _ints(args.crops), _ints(args.rows)
    except ValueError:
        raise SystemExit(f"protfold bench: --crops and --rows want comma-separated integers, got "
                         f"{args.crops!r} and {args.rows!r}") from None
    s = Settings(device=device, steps=args.steps, warmup=args.warmup, seed=args.seed, infer=not args.no_infer,
                 infer_steps=args.infer_steps, block_owns_inputs=args.block_owns_inputs, peak_sites=args.peak_sites,
                 optim=OptimConfig(state=pairs[0][0], ema_storage=pairs[0][1]))
    settings = {pair: dataclasses.replace(s, optim=OptimConfig(state=pair[0], ema_storage=pair[1])) for pair in pairs}
    env = environment(device, argv)
    start = time.monotonic()
    records: list[dict[str, Any]] = []
    combos = list(itertools.product(precisions, crops, rows_list, extras))
    bar = tqdm(total=0 if args.budget_only else len(presets) * len(combos) * len(modes) * len(pairs),
               desc="protfold bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    for preset in presets:
        cfg = model_preset(preset)
        net = Network.build(kind, cfg, seed=args.seed, device=device)
        for precision, crop, rows, extra in [] if args.budget_only else combos:
            point = Point(kind=kind, preset=preset, precision=precision, crop=crop, rows=rows, extra_rows=extra,
                          recycles=args.recycles)
            began = time.monotonic()
            batch = to_device(synthetic_batch(crop, rows, extra, seed=args.seed), device) if kind == "train" else None
            setup_s = time.monotonic() - began
            results: dict[tuple[str, str, str], ModeResult] = {}  # (mode, optim state, EMA storage)

            def point_records(results: dict = results, point: Point = point) -> list[dict[str, Any]]:
                return [{**{k: None for k in report.REQUIRED}, **point.__dict__, "mode": name,
                         "block_owns_inputs": args.block_owns_inputs, "optim_state": state, "ema_storage": ema,
                         "memory": dict(modes[name].__dict__), **r.fields, **env}
                        for (name, state, ema), r in results.items()]

            # each mode's pairs one after another: a compiled mode keeps its graphs from one pair to the next
            for (name, mem), pair in itertools.product(modes.items(), pairs):
                key = (name, *pair)
                bar.set_postfix_str(f"{preset} {precision} crop {crop} {name}" +
                                    (f" {pair[0]}/{pair[1]}" if len(pairs) > 1 else ""))
                if _skipped(args.skip_above, name, point):
                    results[key] = ModeResult(fields={"status": "skipped"})
                elif args.time_limit is not None and time.monotonic() - start > args.time_limit:
                    results[key] = ModeResult(fields={"status": "skipped (time limit)"})
                else:
                    began = time.monotonic()
                    results[key] = _guarded_run(name, point, mem, net, settings[pair], batch)
                    results[key].fields["run_wall_s"] = round(time.monotonic() - began, 3)
                    if args.out:  # a run killed later (a device lease's end) keeps the runs already made
                        report.write_outputs(args.out, [*records, *point_records()], plot=False)
                bar.update()
            began = time.monotonic()
            _compare_pairs(results)
            records.extend(point_records())
            del batch, results
            free_memory(device)
            if args.out:
                report.write_outputs(args.out, records, plot=False)
            bar.write(f"# {preset} {precision} crop {crop}: batch {setup_s:.1f} s; comparisons, cleanup and writing "
                      f"{time.monotonic() - began:.1f} s", file=sys.stderr)
        if args.budget:
            for precision, rows, extra in itertools.product(precisions, rows_list, extras):
                point = Point(kind=kind, preset=preset, precision=precision, crop=max(crops), rows=rows,
                              extra_rows=extra, recycles=args.recycles)
                records.extend(run_budget(args, point, modes, net, s, records, env,
                                          start=max(crops) if args.budget_only else None))
    bar.close()
    print(report.format_table(records, env))
    if args.out:
        report.write_outputs(args.out, records)
        print(f"# wrote {args.out / 'results.json'}, results.csv, memory_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
