"""End to end `protfold predict` of one long sequence with an af2-size checkpoint of random weights (issue 17):

    python benchmarks/long_predict.py --n_res 4096 --out benchmarks/long_inference/predict_4096

Writes `<out>/af2_ptm_random.ckpt` (the `af2_ptm` model, or `--preset`, with AF2's initialisation plus N(0, 0.02) noise on every
weight, so no head is identically zero; the EMA average equals the weights), `<out>/long.fasta` (a random
sequence of `--n_res` residues, seed 0), then runs `protfold predict --precision bf16` with the memory planned for
the card (no --inference_memory), single-sequence MSA, `--recycles` recycling passes (default 0: one pass; af2
uses 3, four times the time).
predict prints the plan and the target's time and peak; this script also writes them, with the files written,
to `<out>/result.json`. No external files are read.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from protfold.cli import main as protfold_main
from protfold.config import OptimConfig, model_preset
from protfold.env import environment
from protfold.model.alphafold import AlphaFold


def random_checkpoint(path: Path, preset: str = "af2_ptm", recycles: int = 0) -> Path:
    torch.manual_seed(0)
    overrides = {"eval_recycles": recycles}
    model = AlphaFold(cfg=model_preset(preset, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = model.state_dict()
    torch.save({
        "state_dict": {f"model.{k}": v for k, v in weights.items()},
        "ema": {"decay": OptimConfig().ema_decay, "shadow": dict(weights)},
        "hyper_parameters": {"preset": preset, "model_overrides": overrides},
        "model_config": asdict(model_preset(preset, **overrides)),
        "pytorch-lightning_version": version("lightning"),
    }, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n_res", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/long_inference/predict"))
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--preset", default="af2_ptm", help="model sizes (tiny_ptm: a quick check of this script)")
    ap.add_argument("--recycles", type=int, default=0, help="eval_recycles of the checkpoint (af2: 3; each one "
                    "is another whole pass: 0 keeps 4,096 residues within ~9 minutes)")
    args = ap.parse_args()
    if args.n_res < 1 or args.recycles < 0:
        raise SystemExit(f"long_predict.py: --n_res must be >= 1 and --recycles >= 0; got {args.n_res}, {args.recycles}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"long_predict.py: cannot make the output folder {args.out}: {err.strerror}") from None
    ckpt = random_checkpoint(args.out / f"{args.preset}_random.ckpt", args.preset, args.recycles)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    sequence = "".join(np.random.default_rng(0).choice(letters, args.n_res))
    fasta = args.out / "long.fasta"
    fasta.write_text(f">long\n{sequence}\n")
    captured = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(captured):
        code = protfold_main(["predict", "--ckpt_path", str(ckpt), "--input", str(fasta), "--out",
                              str(args.out / "pred"), "--overwrite", "--precision", args.precision])
    wall = time.perf_counter() - start
    printed = captured.getvalue()
    print(printed, end="")
    files = sorted(str(p.relative_to(args.out)) for p in (args.out / "pred").rglob("*") if p.is_file())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"n_res": args.n_res, "exit_code": code, "wall_s_including_load": round(wall, 1),
              "printed": printed.splitlines(), "files": files, **environment(device, None)}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "printed"}, indent=1))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
