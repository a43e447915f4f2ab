"""What compiling cost a run, and the persistent compile cache that lets the next run skip most of it.

Compiled blocks (`memory.compile_blocks`) compile one graph per block class when training batches keep one
shape (the data pads them: `protfold.data.pipeline.training_sizes`). `CompileStats` reports, once at the end of
fit, how many graphs dynamo compiled in the run and how long compiling took, into the run's metrics
(`compile/graphs`, `compile/seconds`) and `perf.json` (key "compile"), with the cache hits and misses.

The cache: inductor's FX graph cache (the generated kernels and wrappers of each forward and backward graph) and
the AOTAutograd cache (the joint graph's partition, so a hit skips tracing the backward too), both under one
folder: `--compile_cache DIR`; by default `$XDG_CACHE_HOME/protfold/compile` (`~/.cache/protfold/compile`), never
the checkout; `--compile_cache none` leaves torch's own default (a folder under /tmp). A second run of the same
configuration still traces each block with dynamo (seconds), but loads the compiled code from the cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

__all__ = ["CompileStats", "compile_snapshot", "default_cache_dir", "use_compile_cache"]

# dynamo's and inductor's timers (torch._dynamo.utils.compilation_time_metrics): a frame's whole compile (tracing,
# the forward graph, and the backward graph too when AOTAutograd compiles it eagerly or loads it from the cache),
# and the backward graph's compile when it runs lazily at the first backward
_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
# autocast enter/exit nodes (fp32 islands inside compiled blocks) stop the AOTAutograd cache by default ("Unsupported
# call_function target _enter_autocast"). Their arguments (device, dtype, enabled) are constants of the graph and so
# part of its cache key: marking them cacheable, keyed by the torch version, keeps the cache exact.
_AUTOCAST_FUNCTIONS = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/protfold/compile`, else `~/.cache/protfold/compile`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "protfold" / "compile"


def use_compile_cache(setting: str | None) -> Path | None:
    """Point inductor's FX graph cache and the AOTAutograd cache at one folder and turn both on. `setting`: a
    folder, None or "" for `default_cache_dir()`, "none" to leave torch's defaults. Returns the folder used.
    Call before the first compile: inductor reads the folder from the environment when it first caches."""
    if setting is not None and setting.lower() == "none":
        return None
    path = Path(setting).expanduser() if setting else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"protfold: config error: compile_cache {path}: cannot create the folder ({err})") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # triton's kernels go under it too (inductor's default)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    marked = getattr(inductor_config, "unsafe_marked_cacheable_functions", None)
    if isinstance(marked, dict):
        marked.update({name: torch.__version__ for name in _AUTOCAST_FUNCTIONS})
    log.info("compile cache: %s (--compile_cache DIR or none)", path)
    return path


def compile_snapshot() -> dict[str, float]:
    """dynamo's and inductor's process-wide counters now: graphs, frames, compile seconds, cache hits/misses."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(compilation_time_metrics.get(name, ())) for name in _TIMERS)
    aot, inductor = counters["aot_autograd"], counters["inductor"]
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "frames": counters["frames"]["ok"],
        "seconds": seconds,
        "fx_graph_cache_hits": inductor["fxgraph_cache_hit"],
        "fx_graph_cache_misses": inductor["fxgraph_cache_miss"],
        "autograd_cache_hits": aot["autograd_cache_hit"],
        "autograd_cache_misses": aot["autograd_cache_miss"],
        "autograd_cache_bypasses": aot["autograd_cache_bypass"],
    }


class CompileStats(pl.Callback):
    """Graphs compiled and compile seconds during fit, logged once at its end (also when fit stops on an
    exception): one log line, `compile/*` in the run's metrics, and "compile" in `<log_dir>/perf.json` (merged
    into the file `StepStats` writes, so this callback comes after it)."""

    def __init__(self) -> None:
        self._start: dict[str, float] | None = None
        self.result: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self.result = compile_snapshot(), None

    def summary(self) -> dict[str, Any]:
        now = compile_snapshot()
        start = self._start or dict.fromkeys(now, 0)
        out: dict[str, Any] = {key: now[key] - start[key] for key in now}
        out["seconds"] = round(out["seconds"], 3)
        out["cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        return out

    def _report(self, trainer: pl.Trainer) -> None:
        if self.result is not None:
            return
        self.result = result = self.summary()
        log.info("compiled %d graph(s) in %.1f s (FX graph cache: %d hit(s), %d miss(es); AOTAutograd cache: %d "
                 "hit(s), %d miss(es), %d bypass(es))", result["graphs"], result["seconds"],
                 result["fx_graph_cache_hits"], result["fx_graph_cache_misses"], result["autograd_cache_hits"],
                 result["autograd_cache_misses"], result["autograd_cache_bypasses"])
        if not trainer.is_global_zero or trainer.logger is None:
            return
        trainer.logger.log_metrics({"compile/graphs": result["graphs"], "compile/seconds": result["seconds"]},
                                   step=trainer.global_step)
        if trainer.logger.log_dir is None:
            return
        path = Path(trainer.logger.log_dir) / "perf.json"
        perf = json.loads(path.read_text()) if path.is_file() else {}
        perf["compile"] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(perf, indent=2) + "\n")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._report(trainer)
