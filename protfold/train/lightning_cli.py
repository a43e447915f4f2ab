"""`protfold fit | validate | test` on LightningCLI."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from protfold.config import MemoryConfig, memory_preset_path, model_preset
from protfold.data.datamodule import ProteinDataModule
from protfold.errors import ProtfoldInputError
from protfold.train.callbacks import AtomicCheckpointIO, BestAndLastCheckpoint, StepStats, TrainingCurvePlot
from protfold.train.checkpoints import read_checkpoint
from protfold.train.compile_cache import CompileStats, use_compile_cache
from protfold.train.module import ProtfoldModule

log = logging.getLogger(__name__)
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # --ckpt_path values that are not file paths
RUN_NAME = "protfold"  # runs go to <trainer.default_root_dir>/protfold/version_N/


class ProtfoldCLI(LightningCLI):
    """LightningCLI with protfold's defaults: best-by-val/lddt_ca and last checkpoints (written atomically),
    CSV logs under the run folder, the training-curve plot, and config checks before any work.
    `auto_memory`: `--model.memory auto` was given (taken out of argv): resolved before the model is built."""

    def __init__(self, *args: Any, auto_memory: bool = False, **kwargs: Any) -> None:
        self.auto_memory = auto_memory
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.add_argument("--logger_kind", default="csv", choices=["csv", "tensorboard"],
                            help="logger used when trainer.logger is not set (CSV by default)")
        parser.add_argument("--memory_budget_gib", type=Optional[float], default=None,
                            help="with --model.memory auto: the GPU memory budget in GiB instead of the card's free "
                            "memory less the safety margin (protfold.plan.auto)")
        parser.add_argument("--torch_threads", type=Optional[int], default=None,
                            help="torch's intra-op CPU threads (default: the cores this process may use, less "
                            "one per data worker, unless OMP_NUM_THREADS is set)")
        parser.add_argument("--compile_cache", type=Optional[str], default=None,
                            help="folder of the persistent compile cache (inductor's FX graph cache and the "
                            "AOTAutograd cache) for compiled blocks; default $XDG_CACHE_HOME/protfold/compile "
                            "(~/.cache/protfold/compile); 'none' leaves torch's default")

    def _parse_ckpt_path(self) -> None:
        """validate/test: the checkpoint's model settings are used (Lightning's behaviour). fit: the config
        given is what runs; Lightning would silently replace every model setting by the checkpoint's (the
        preset, but also memory switches and loss weights the user changed for the resumed run), and a
        checkpoint of another model configuration is reported by `_check_checkpoint_matches` instead.
        A --ckpt_path that is not a checkpoint is reported in one line before anything else reads it."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if path and path not in _LIGHTNING_CKPT_NAMES:
            try:
                read_checkpoint(path)
            except ProtfoldInputError as err:
                raise SystemExit(f"protfold {subcommand}: --ckpt_path {err}") from None
        if subcommand != "fit":
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.auto_memory or config.memory_budget_gib is not None:
            _resolve_auto_memory(config, self.auto_memory)
        _check_config(config)
        set_torch_threads(config.torch_threads, data_workers=config.data.num_workers)
        if config.compile_cache or _memory_field(config, "compile_blocks") or _memory_field(config, "attention") == "flex":
            use_compile_cache(config.compile_cache)  # only runs that compile make (or name) a cache folder
        _load_triangle_kernels(config)
        _resolve_last_checkpoint(config)
        if self.subcommand == "fit":
            _check_checkpoint_matches(config)

    def instantiate_trainer(self, **kwargs: Any):  # noqa: ANN201
        """The default logger is made here, not written into the config: a run's saved config.yaml keeps
        `logger: null`, so reusing it with another default_root_dir logs under that root."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if "logger" not in kwargs and (trainer.logger is None or trainer.logger is True):
            from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

            kind = CSVLogger if config.logger_kind == "csv" else TensorBoardLogger
            kwargs["logger"] = kind(save_dir=trainer.default_root_dir or "runs", name=RUN_NAME)
        return super().instantiate_trainer(**kwargs)


def set_torch_threads(requested: int | None, *, data_workers: int) -> int:
    """Set torch's intra-op threads so that they and the data workers do not oversubscribe the cores: a CPU
    step with more busy threads than cores runs many times slower (threads wait on each other), not faster.
    `requested` wins; else OMP_NUM_THREADS (the user's choice) is left alone; else the cores this process
    may use, less one per data worker, at least one. Returns the thread count in force."""
    import torch

    if requested is not None and requested < 1:
        raise SystemExit(f"protfold: config error: torch_threads={requested} must be >= 1")
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores - data_workers)
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%d cores, %d data workers; --torch_threads or OMP_NUM_THREADS to change)",
             threads, cores, data_workers)
    return threads


def _memory_field(config: Any, name: str) -> Any:
    """Field `name` of the training memory config, which the parser holds as a dict or a MemoryConfig."""
    memory = getattr(config.model, "memory", None)
    return memory.get(name) if isinstance(memory, dict) else getattr(memory, name, None)


def _load_triangle_kernels(config: Any) -> None:
    """`triangle_kernel: cueq`: import cuEquivariance (or log once why not) now, before any block is compiled, so that
    dynamo's first trace of a block does not meet the import."""
    if _memory_field(config, "triangle_kernel") == "cueq":
        import torch

        from protfold.model.kernels import cueq

        cueq.available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


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
            fields = value.as_dict() if hasattr(value, "as_dict") else dict(value)
            # a group read from a file (`--model.memory NAME` or a path) carries jsonargparse's `__path__` key
            MemoryConfig(**{k: v for k, v in fields.items() if not k.startswith("__")})
        except (TypeError, ValueError) as err:
            raise SystemExit(f"protfold: config error: model.{key}: {err}") from None
        if key == "memory" and fields.get("offload_triangle_edge"):
            raise SystemExit(
                "protfold: config error: model.memory.offload_triangle_edge acts without grad only, so in training "
                "it changes nothing: set it in model.inference_memory (validation and prediction) instead"
            )
        if key == "memory" and fields.get("structure_chunk"):
            raise SystemExit(
                "protfold: config error: model.memory.structure_chunk acts without grad only, so in training it "
                "changes nothing: set it in model.inference_memory instead"
            )
        if fields.get("head_chunk"):
            raise SystemExit(
                f"protfold: config error: model.{key}.head_chunk drops the distogram and PAE logits that the "
                "losses read; it is for `protfold predict` only (its planner sets it)"
            )
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
    # the plugin as a class path, not an instance: the saved config.yaml must be readable by `fit -c` again
    atomic_io = {"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__qualname__}"}
    # CompileStats after StepStats: it adds its figures to the perf.json that StepStats writes
    return {"callbacks": [best, TrainingCurvePlot(), StepStats(), CompileStats()], "plugins": [atomic_io]}


def _resolve_auto_memory(config: Any, auto: bool) -> None:
    """`--model.memory auto`: replace it by the preset `protfold.plan.auto` picks for this run's shapes, device,
    precision and optimizer state (the run's saved config.yaml then holds the chosen fields)."""
    from dataclasses import asdict

    from jsonargparse import Namespace

    from protfold.config import load_memory_preset
    from protfold.plan.auto import NothingFits, card_budget, resolve
    from protfold.plan.cost import GIB, Shape, count_parameters

    if not auto:
        raise SystemExit("protfold: config error: memory_budget_gib is the budget of --model.memory auto; without "
                         "it it changes nothing: add --model.memory auto or drop memory_budget_gib")
    model, data, trainer = config.model, config.data, config.trainer
    try:
        cfg = model_preset(model.preset, **(model.model_overrides or {}))
    except ValueError as err:
        raise SystemExit(f"protfold: config error: {err} (model.preset / model.model_overrides)") from None
    precision = "bf16" if "16" in str(trainer.precision) else "fp32"  # fp16 is costed as bf16
    shape = Shape(data.crop_size, data.max_msa_clusters, data.max_extra_msa, cfg.max_recycles / 2, precision,
                  batch=data.batch_size)
    budget, note = None, "no CUDA device and no --memory_budget_gib"
    if config.memory_budget_gib is not None:
        budget, note = config.memory_budget_gib * GIB, "--memory_budget_gib"
    elif str(trainer.accelerator) in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            budget, note = card_budget(torch.cuda.current_device())
    optim_state = getattr(model.optim, "state", None) or "fp32"
    try:
        name, line = resolve(cfg, shape, n_params=count_parameters(cfg), budget_bytes=budget, budget_note=note,
                             optim_state=optim_state, ema=True)
    except NothingFits as err:
        raise SystemExit(f"protfold: {err}") from None
    log.info("%s", line)
    model.memory = Namespace(**asdict(load_memory_preset(name)))


_AUTO = "auto"


def take_auto_memory(argv: list[str]) -> tuple[list[str], bool]:
    """argv without `--model.memory auto` (or `=auto`), and whether it was there."""
    out, auto, skip = [], False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == f"--model.memory={_AUTO}":
            auto = True
        elif arg == "--model.memory" and i + 1 < len(argv) and argv[i + 1] == _AUTO:
            auto, skip = True, True
        else:
            out.append(arg)
    return out, auto


def run_lightning(argv: list[str]) -> int:
    """Entry for fit/validate/test: argv starts with the subcommand."""
    saved_argv = sys.argv
    # LightningCLI reads sys.argv (passing args= as well makes it warn). Keep argv[0], the running script:
    # Lightning's DDP launcher starts the other ranks as `python <argv[0]> <argv[1:]>`.
    argv, auto = take_auto_memory(argv)
    sys.argv = [saved_argv[0] if saved_argv else "protfold", *preset_paths(argv)]
    _one_log_output()
    try:
        _make_cli(auto_memory=auto)
    except ArgumentError as err:  # the error first, then one line of help instead of a page of usage
        name = argv[0] if argv else "fit"
        print(f"protfold {name}: error: {err}\n(`protfold {name} --help` lists every option)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved_argv
    return 0


_MEMORY_FLAGS = ("--model.memory", "--model.inference_memory")


def preset_paths(argv: list[str]) -> list[str]:
    """`--model.memory NAME` (or `--model.inference_memory NAME`, `=NAME`) with NAME a shipped preset becomes the
    preset's file: jsonargparse reads a dataclass argument from a YAML file of its fields, and the presets are
    package data, so selection by name works from any install. Existing paths and YAML strings pass unchanged."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag in _MEMORY_FLAGS:
            out.append(f"{flag}={_preset_file(value)}")
        elif i > 0 and argv[i - 1] in _MEMORY_FLAGS:
            out.append(_preset_file(arg))
        else:
            out.append(arg)
    return out


def _preset_file(value: str) -> str:
    path = None if Path(value).exists() else memory_preset_path(value)
    return str(path) if path else value


def _one_log_output() -> None:
    """Lightning gives its logger a handler of its own; with protfold's root handler every line printed twice.
    Where the root logger has a handler, Lightning's lines go through it alone."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).handlers.clear()


def _make_cli(*, auto_memory: bool = False) -> ProtfoldCLI:
    return ProtfoldCLI(
        ProtfoldModule,
        ProteinDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "exit_on_error": False},
        auto_memory=auto_memory,
    )
