"""`protfold fit | validate | test` on LightningCLI, and the argument parser of `protfold predict`."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from protfold.config import MemoryConfig, load_memory_preset, model_preset
from protfold.data.datamodule import ProteinDataModule
from protfold.train.callbacks import AtomicCheckpointIO, BestAndLastCheckpoint, StepStats, TrainingCurvePlot
from protfold.train.module import ProtfoldModule

log = logging.getLogger(__name__)
RUN_NAME = "protfold"  # runs go to <trainer.default_root_dir>/protfold/version_N/


class ProtfoldCLI(LightningCLI):
    """LightningCLI with protfold's defaults: best-by-val/lddt_ca and last checkpoints (written atomically),
    CSV logs under the run folder, the training-curve plot, and config checks before any work."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--logger_kind", default="csv", choices=["csv", "tensorboard"],
                            help="logger used when trainer.logger is not set (CSV by default)")

    def _parse_ckpt_path(self) -> None:
        """validate/test: the checkpoint's model settings are used (Lightning's behaviour). fit: the config
        given is what runs; Lightning would silently replace every model setting by the checkpoint's (the
        preset, but also memory switches and loss weights the user changed for the resumed run), and a
        checkpoint of another model configuration is reported by `_check_checkpoint_matches` instead."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_config(config)
        trainer = config.trainer
        if trainer.logger is None or trainer.logger is True:
            root = trainer.default_root_dir or "runs"
            kind = "CSVLogger" if config.logger_kind == "csv" else "TensorBoardLogger"
            trainer.logger = {"class_path": f"lightning.pytorch.loggers.{kind}",
                              "init_args": {"save_dir": root, "name": RUN_NAME}}
        _resolve_last_checkpoint(config)
        if self.subcommand == "fit":
            _check_checkpoint_matches(config)


def _resolve_last_checkpoint(config: Any) -> None:
    """`--ckpt_path last`: Lightning looks for last.ckpt in *this* run's checkpoint folder, a new and empty
    version_N, and silently starts from scratch; resume from the newest last.ckpt of the earlier runs instead."""
    if getattr(config, "ckpt_path", None) != "last":
        return
    root = Path(config.trainer.default_root_dir or "runs") / RUN_NAME
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if found:
        config.ckpt_path = str(found[-1])
        log.info("--ckpt_path last: resuming from %s", found[-1])


def _check_config(config: Any) -> None:
    """Fail before any work on settings that cannot run, with what to change."""
    model, data = config.model, config.data
    try:
        cfg = model_preset(model.preset, **(model.model_overrides or {}))
    except ValueError as err:
        raise SystemExit(f"protfold: config error: {err} (model.preset / model.model_overrides)") from None
    for key in ("memory", "inference_memory"):
        value = getattr(model, key, None)
        if value is None or isinstance(value, MemoryConfig):
            continue
        try:
            MemoryConfig(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"protfold: config error: model.{key}: {err}") from None
    if getattr(model.loss, "experimentally_resolved", 0) > 0 and not cfg.experimentally_resolved:
        raise SystemExit(
            f"protfold: config error: model.loss.experimentally_resolved={model.loss.experimentally_resolved} "
            "needs the experimentally resolved head, which this model has not; set "
            "model.model_overrides.experimentally_resolved: true or the loss weight to 0"
        )
    pae = getattr(model.loss, "pae", 0)
    if pae > 0 and not cfg.predicted_aligned_error:
        raise SystemExit(
            f"protfold: config error: model.loss.pae={pae} needs the predicted aligned error head, which this model "
            "has not; use a `_ptm` preset (model.preset tiny_ptm, small_ptm or af2_ptm), set "
            "model.model_overrides.predicted_aligned_error: true, or set the loss weight to 0"
        )
    if pae > 0 and model.loss.pae_max_bin != cfg.pae_max_bin:
        raise SystemExit(
            f"protfold: config error: model.loss.pae_max_bin={model.loss.pae_max_bin} differs from the model's "
            f"pae_max_bin={cfg.pae_max_bin}; set both to the same value"
        )
    if data.crop_size > cfg.max_crop:
        raise SystemExit(
            f"protfold: config error: data.crop_size={data.crop_size} is beyond the model's limit "
            f"max_crop={cfg.max_crop}; lower data.crop_size or raise model.model_overrides.max_crop"
        )


def _check_checkpoint_matches(config: Any) -> None:
    """Resuming (`fit --ckpt_path`) needs the model configuration the checkpoint was trained with."""
    import torch

    path = getattr(config, "ckpt_path", None)
    if not path or not Path(path).is_file():
        return
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("model_config")
    except Exception:  # noqa: BLE001 - Lightning reports unreadable checkpoints itself
        return
    model = config.model
    ours = asdict(model_preset(model.preset, **(model.model_overrides or {})))
    if saved is None or saved == ours:
        return
    diff = sorted(k for k in saved if saved[k] != ours.get(k))
    detail = ", ".join(f"{k}={saved[k]!r} (now {ours.get(k)!r})" for k in diff[:6])
    raise SystemExit(
        f"protfold: config error: --ckpt_path {path} was trained with another model configuration: {detail}. "
        "Resume with the settings it was trained with (its run's config.yaml: model.preset, "
        f"model.model_overrides), or start a new run from its weights with --model.init_from {path}"
    )


def trainer_defaults() -> dict[str, Any]:
    best = BestAndLastCheckpoint(monitor="val/lddt_ca", mode="max", save_last=True, save_top_k=1,
                           filename="best-{step}", auto_insert_metric_name=False)
    return {"callbacks": [best, TrainingCurvePlot(), StepStats()], "plugins": [AtomicCheckpointIO()]}


def run_lightning(argv: list[str]) -> int:
    """Entry for fit/validate/test: argv starts with the subcommand."""
    saved_argv = sys.argv
    # LightningCLI reads sys.argv (passing args= as well makes it warn). Keep argv[0], the running script:
    # Lightning's DDP launcher starts the other ranks as `python <argv[0]> <argv[1:]>`.
    sys.argv = [saved_argv[0] if saved_argv else "protfold", *argv]
    try:
        _make_cli()
    finally:
        sys.argv = saved_argv
    return 0


def _make_cli() -> ProtfoldCLI:
    return ProtfoldCLI(
        ProtfoldModule,
        ProteinDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def run_predict_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="protfold predict",
        description="Predict structures: writes OUT/<id>/<id>.pdb, <id>.cif (pLDDT x 100 in B-factors) and "
        "<id>_confidence.json. Existing outputs are skipped unless --overwrite.",
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
    parser.add_argument("--memory", default=None, help="inference memory preset (configs/memory/NAME.yaml) or YAML file")
    parser.add_argument("--max_msa_clusters", type=int, default=128)
    parser.add_argument("--max_extra_msa", type=int, default=1024)
    args = parser.parse_args(argv)

    from protfold.errors import ProtfoldInputError
    from protfold.train.predict import run_predict

    try:
        memory = load_memory_preset(args.memory) if args.memory else None
    except ValueError as err:
        print(f"protfold predict: --memory: {err}", file=sys.stderr)
        return 2
    try:
        written = run_predict(ckpt_path=args.ckpt_path, source=args.input, out=args.out, msa_dir=args.msa_dir,
                              overwrite=args.overwrite, device=args.device, memory=memory,
                              max_msa_clusters=args.max_msa_clusters, max_extra_msa=args.max_extra_msa,
                              model_config=args.preset)
    except ProtfoldInputError as err:
        print(f"protfold predict: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"protfold predict: wrote {path}")
    if not written:
        print("protfold predict: nothing new written (outputs exist; use --overwrite)")
    return 0
