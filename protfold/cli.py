"""The `protfold` command: `protfold <subcommand> ...`.

Subcommands are a table of name -> handler(argv) -> exit code, so others can be added in one line.
`fit`, `validate` and `test` run LightningCLI (protfold.train.lightning_cli), `predict` writes structures
from a checkpoint, `convert` turns AlphaFold2 / OpenFold weights into one (protfold.weights), and `bench`
runs the memory-mode comparison (protfold.bench).
Heavy modules are imported inside the handlers, so `protfold --help` and `protfold prepare` stay quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from protfold.errors import ProtfoldInputError

Handler = Callable[[list[str]], int]


def _prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="protfold prepare",
        description="Parse structure files (+ MSAs) into the prepared cache: one .npz per protein chain, "
        "plus report.tsv. Files that cannot be used are skipped with a reason.",
    )
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder searched recursively for .cif/.pdb/.ent(.gz)")
    parser.add_argument("--out", required=True, metavar="CACHE_DIR", help="cache folder (created if needed)")
    parser.add_argument("--msa_dir", metavar="MSA_DIR", help="MSAs in MSA_DIR/<pdb id>_<chain>/ (a3m, sto, fasta)")
    parser.add_argument("--workers", type=int, metavar="N", help="processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) if any file is skipped or MSA rejected")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    # The hyphenated spellings of earlier releases still work (scripts keep running), left out of --help: every
    # protfold command, LightningCLI's included, spells its flags with underscores.
    parser.add_argument("--msa-dir", dest="msa_dir", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")

    from protfold.data.prepare import prepare

    try:
        report = prepare(
            args.input_dir, args.out, msa_dir=args.msa_dir, workers=args.workers, strict=args.strict,
            progress=False if args.no_progress else None,
        )
    except ProtfoldInputError as exc:
        print(f"protfold prepare: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("protfold prepare: interrupted; finished entries are kept, run it again to continue", file=sys.stderr)
        return 130
    print(f"protfold prepare: {report.summary()}")
    if report.n_ok == 0:
        print("protfold prepare: nothing could be prepared", file=sys.stderr)
    elif not report.succeeded:
        print("protfold prepare: --strict: some input was skipped or rejected (see the report)", file=sys.stderr)
    return 0 if report.succeeded else 1


def _lightning(argv: list[str], name: str) -> int:
    from protfold.errors import ProtfoldInputError
    from protfold.train.lightning_cli import run_lightning

    try:
        return run_lightning([name, *argv])
    except ProtfoldInputError as exc:  # e.g. --model.init_from weights that cannot be used
        print(f"protfold {name}: {exc}", file=sys.stderr)
        return 1


def _predict(argv: list[str]) -> int:
    from protfold.config import ATTENTION_KERNELS, load_memory_preset

    parser = argparse.ArgumentParser(
        prog="protfold predict",
        description="Predict structures: writes OUT/<id>/<id>.pdb, <id>.cif (pLDDT x 100 in B-factors) and "
        "<id>_confidence.json. Existing outputs are skipped unless --overwrite. Ids that are not safe file names "
        "are made so (reported); two inputs with the same id are refused.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `protfold fit` or `protfold "
                        "convert`, or AlphaFold2 / OpenFold weights directly (params_model_3_ptm.npz, *.pt)")
    parser.add_argument("--preset", default=None, help="for AlphaFold2 / OpenFold weights: model preset or JSON "
                        "file of sizes (default: read from the file; af2_ptm with the PAE head, else af2)")
    parser.add_argument("--input", required=True, help="FASTA file, folder of FASTA files, or a prepared cache")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--msa_dir", help="MSAs: MSA_DIR/<id>/ (a3m, sto, fasta) or MSA_DIR/<id>.a3m")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--inference_memory", "--memory", dest="memory", default=None,
                        help="inference memory preset NAME (low, low_host, ...) or YAML file (default: planned for "
                        "each target from its length, MSA depth and the device's free memory, and printed)")
    parser.add_argument("--memory_budget_gib", type=float, default=None,
                        help="bytes the memory plan may use, in GiB (default: the card's free memory)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: under bf16 autocast (CUDA); fp32 by default")
    parser.add_argument("--attention", choices=ATTENTION_KERNELS, default=None,
                        help="attention kernel: the memory is planned for it, or it replaces the given memory's "
                        "(default naive); triton: protfold's fused kernel (CUDA), no attention logits made")
    parser.add_argument("--max_msa_clusters", type=int, default=128)
    parser.add_argument("--max_extra_msa", type=int, default=1024)
    args = parser.parse_args(argv)

    from protfold.data.targets import collect_targets

    try:
        memory = load_memory_preset(args.memory) if args.memory else None
    except ValueError as err:
        parser.error(f"--inference_memory: {err}")
    if args.memory_budget_gib is not None and (memory is not None or not args.memory_budget_gib > 0):
        parser.error("--memory_budget_gib: must be > 0, and sizes the planned memory: not with --inference_memory")
    if memory is not None and memory.pair_storage == "bf16" and args.precision != "bf16":
        parser.error("--inference_memory: pair_storage 'bf16' keeps z in bf16, which only bf16 autocast reads: "
                     "add --precision bf16")
    try:
        targets = collect_targets(args.input, args.msa_dir)  # before torch and the model: input errors come at once
        device = _check_device(args.device)
        from protfold.train.predict import run_predict

        report = run_predict(ckpt_path=args.ckpt_path, targets=targets, out=args.out, overwrite=args.overwrite,
                             device=device, memory=memory, max_msa_clusters=args.max_msa_clusters,
                             max_extra_msa=args.max_extra_msa, model_config=args.preset,
                             memory_budget_gib=args.memory_budget_gib, precision=args.precision,
                             attention=args.attention)
    except ProtfoldInputError as err:
        print(f"protfold predict: {err}", file=sys.stderr)
        return 1
    for path in report.written:
        print(f"protfold predict: wrote {path}")
    if report.existing:
        lead = "nothing new written: " if not report.written and not report.failed else ""
        print(f"protfold predict: {lead}{len(report.existing)} target(s) already predicted, skipped "
              "(use --overwrite)")
    for failure in report.failed:
        print(f"protfold predict: failed: {failure}", file=sys.stderr)
    return 1 if report.failed else 0


def _check_device(device: str | None) -> str | None:
    """`--device`: a CUDA device on a machine without one is a plain mistake, reported in one line."""
    if device is None or not device.startswith("cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        raise ProtfoldInputError("--device", f"{device} requested, but this machine has no usable CUDA device "
                                             f"(torch {torch.__version__}); use --device cpu")
    return device


def _convert(argv: list[str]) -> int:
    from protfold.config import PRESET_NAMES

    parser = argparse.ArgumentParser(
        prog="protfold convert",
        description="AlphaFold2 parameters (params_model_{3,4,5}[_ptm].npz) or an OpenFold checkpoint -> a protfold "
        "checkpoint for `protfold predict --ckpt_path` and `protfold fit --model.init_from` (whose EMA average "
        "starts from these weights). Writes only CKPT.",
    )
    parser.add_argument("source", metavar="SRC", help="AlphaFold2 .npz, OpenFold .pt/.ckpt, or a protfold checkpoint")
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=PRESET_NAMES, help="model preset the parameters must fit (default: read "
                       "from the file: af2_ptm if it has the PAE head, else af2, with the sizes of its tensors)")
    which.add_argument("--config", metavar="JSON", help="JSON file of ModelConfig sizes instead of a preset")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CKPT")
    args = parser.parse_args(argv)

    from protfold.errors import ProtfoldInputError
    from protfold.weights import convert

    try:
        imported = convert(args.source, args.out, args.preset or args.config, overwrite=args.overwrite)
    except ProtfoldInputError as exc:
        print(f"protfold convert: {exc}", file=sys.stderr)
        return 1
    resolved = imported.config
    changed = f" with {len(resolved.overrides)} sizes changed" if resolved.overrides else ""
    print(f"protfold convert: wrote {args.out}: {len(imported.state_dict)} tensors of {imported.format} weights, "
          f"preset {resolved.preset}{changed} ({resolved.label})")
    return 0


def _bench(argv: list[str]) -> int:
    from protfold.bench.runner import main as bench_main

    return bench_main(argv)


SUBCOMMANDS: dict[str, Handler] = {
    "prepare": _prepare,
    "fit": lambda argv: _lightning(argv, "fit"),
    "validate": lambda argv: _lightning(argv, "validate"),
    "test": lambda argv: _lightning(argv, "test"),
    "predict": _predict,
    "convert": _convert,
    "bench": _bench,
}
_HELP = {
    "prepare": "structure files + MSAs -> prepared cache",
    "fit": "train (LightningCLI)",
    "validate": "validate a checkpoint (LightningCLI)",
    "test": "test a checkpoint (LightningCLI)",
    "predict": "predict structures from FASTA / a prepared cache with a checkpoint",
    "convert": "AlphaFold2 / OpenFold weights -> protfold checkpoint",
    "bench": "compare memory modes",
}


def _usage() -> str:
    lines = ["usage: protfold <subcommand> [args]  (protfold <subcommand> --help for its options)", "", "subcommands:"]
    lines += [f"  {name:<10} {_HELP.get(name, '')}" for name in SUBCOMMANDS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `protfold` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    handler = SUBCOMMANDS.get(name)
    if handler is None:
        print(f"protfold: unknown subcommand {name!r}; not available\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return handler(rest)


if __name__ == "__main__":
    sys.exit(main())
