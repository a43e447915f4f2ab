"""`protfold bench --optim.state A,B --optim.ema_storage C,D`: every mode under every (state, EMA storage) pair in
one process, each compared within its pair, and a compiled mode compiling once per point for all pairs."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json

import pytest
import torch

from protfold.bench import workloads
from protfold.bench.runner import main

COMMON = ["--model", "tiny", "--device", "cpu", "--rows", "5", "--extra-rows", "7", "--steps", "1", "--warmup", "1",
          "--threads", "1", "--no-infer"]
EXACT = 1e-5  # fp32: every mode computes the same function


def run_main(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()


def test_every_mode_runs_under_every_pair(tmp_path, monkeypatch) -> None:
    """fp32 and cpu_offload (plain Adam on the CPU) x fp32 and bf16 EMA: four records per mode, each with its own
    optim_state and ema_storage, compared with `none` of the same pair; the table and results.csv show both; and
    the optimizer and EMA of each run are built with that run's pair."""
    built: list[tuple[str, str]] = []
    real_adam, real_ema = workloads.adam, workloads.EMA
    monkeypatch.setattr(workloads, "adam",
                        lambda params, optim: built.append((optim.state, "")) or real_adam(params, optim))

    def ema(module, *, decay, storage):
        built[-1] = (built[-1][0], storage)
        return real_ema(module, decay=decay, storage=storage)

    monkeypatch.setattr(workloads, "EMA", ema)
    text = run_main([*COMMON, "--modes", "none,low", "--crops", "16", "--optim.state", "fp32,cpu_offload",
                     "--optim.ema_storage", "fp32,bf16", "--out", str(tmp_path)])
    recs = json.loads((tmp_path / "results.json").read_text())
    # each run's optimizer and EMA were built with the pair its record names (runs in record order; a run that
    # builds its trainer more than once shows as repeats)
    runs = [pair for i, pair in enumerate(built) if i == 0 or pair != built[i - 1]]
    assert runs == [(r["optim_state"], r["ema_storage"]) for r in recs]
    pairs = {("fp32", "fp32"), ("fp32", "bf16"), ("cpu_offload", "fp32"), ("cpu_offload", "bf16")}
    for mode in ("none", "low"):
        mine = [r for r in recs if r["mode"] == mode]
        assert {(r["optim_state"], r["ema_storage"]) for r in mine} == pairs and len(mine) == 4
    for r in recs:
        assert r["status"] == "ok" and r["peak_bytes"] > 0 and r["step_time_s"] > 0, r
        assert r["reference"] == "none" and r["loss_diff"] < EXACT and r["grad_diff"] < EXACT, r
    header = next(line for line in text.splitlines() if line.startswith("mode"))
    assert header.split()[:4] == ["mode", "optim", "ema", "prec"]
    assert "cpu_offload/bf16" in text and "each compared within itself" in text
    assert sum(line.split()[1:3] == ["cpu_offload", "bf16"] for line in text.splitlines()) == 2
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["mode"], r["optim_state"], r["ema_storage"]) for r in rows} == {(m, *p) for m in ("none", "low")
                                                                                for p in pairs}


def test_one_pair_keeps_the_table_narrow(tmp_path) -> None:
    text = run_main([*COMMON, "--modes", "none", "--crops", "16"])
    header = next(line for line in text.splitlines() if line.startswith("mode"))
    assert header.split()[:2] == ["mode", "prec"] and "compared within itself" not in text


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="optim.state 8bit needs torchao")
def test_8bit_state_in_the_sweep(tmp_path) -> None:
    run_main([*COMMON, "--modes", "low", "--crops", "16", "--optim.state", "8bit,fp32", "--optim.ema_storage", "bf16",
              "--out", str(tmp_path)])
    recs = json.loads((tmp_path / "results.json").read_text())
    assert [(r["optim_state"], r["ema_storage"], r["status"]) for r in recs] == [("8bit", "bf16", "ok"),
                                                                                  ("fp32", "bf16", "ok")]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--optim.state", "fp32,16bit", "protfold bench: --optim.state: unknown '16bit'; use fp32, 8bit, 4bit, cpu_offload"),
    ("--optim.ema_storage", "bf16,fp8", "protfold bench: --optim.ema_storage: unknown 'fp8'; use fp32, bf16, cpu"),
    ("--optim.state", ",", "protfold bench: --optim.state: unknown empty list; use fp32, 8bit, 4bit, cpu_offload"),
])
def test_bad_names_fail_in_one_line(flag, value, message) -> None:
    with pytest.raises(SystemExit) as err:
        main([*COMMON, "--modes", "none", flag, value])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_budget_wants_one_pair() -> None:
    with pytest.raises(SystemExit, match="--budget searches under one optimizer state and EMA storage; got 2 pairs"):
        main([*COMMON, "--modes", "none", "--budget", "1GB", "--optim.ema_storage", "fp32,bf16"])


@pytest.fixture
def compile_counter(monkeypatch):
    """protfold's compiled blocks through dynamo's cheap `aot_eager` backend, counted; and the calls of
    `reset_compiled` the bench makes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    plain_compile, counter, resets = torch.compile, CompileCounterWithBackend("aot_eager"), []

    def aot_eager_compile(fn, **kw):
        kw.pop("options", None)  # inductor's; aot_eager takes none
        return plain_compile(fn, backend=counter, **kw)

    def counted_reset():
        resets.append(1)
        reset()

    reset = workloads.reset_compiled
    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    monkeypatch.setattr(workloads, "reset_compiled", counted_reset)
    torch._dynamo.reset()
    monkeypatch.setattr("protfold.model.memory._COMPILED", {})
    yield counter, resets
    torch._dynamo.reset()


def test_a_compiled_mode_compiles_once_for_every_pair(tmp_path, compile_counter, monkeypatch) -> None:
    """The optimizer and the EMA are outside the compiled blocks: the runs of one compiled mode at one point that
    differ only in them keep the graphs (one reset, no frame compiled after the first pair's run). The compiled
    runs still match `none` of their pair."""
    counter, resets = compile_counter
    frames, plain = [], workloads.run_mode

    def counted_run(*args, **kwargs):
        result = plain(*args, **kwargs)
        frames.append(counter.frame_count)
        return result

    monkeypatch.setattr("protfold.bench.runner.run_mode", counted_run)
    run_main([*COMMON, "--modes", "none,compiled", "--crops", "16", "--optim.state", "fp32,cpu_offload",
              "--out", str(tmp_path)])
    assert frames[:2] == [0, 0] and frames[2] > 0  # none (both pairs), then compiled's first pair compiles
    assert frames[3] == frames[2] and len(resets) == 1  # its second pair reuses the graphs
    recs = json.loads((tmp_path / "results.json").read_text())
    assert [(r["mode"], r["optim_state"]) for r in recs] == [("none", "fp32"), ("none", "cpu_offload"),
                                                             ("compiled", "fp32"), ("compiled", "cpu_offload")]
    for r in recs:
        assert r["status"] == "ok" and r["reference"] == "none", r
        assert r["loss_diff"] < EXACT and r["grad_diff"] < EXACT, r


def test_compile_caches_are_kept_only_for_the_same_mode_and_point(monkeypatch) -> None:
    """`Network.reset` resets the compile caches for a compiled mode unless the run before had the same key (the
    bench's: point and memory settings); a failed run (`_guarded_run`) leaves nothing to reuse."""
    from protfold.bench import runner
    from protfold.config import load_memory_preset, model_preset

    resets = []
    monkeypatch.setattr(workloads, "reset_compiled", lambda: resets.append(1))
    net = workloads.Network.build("inference_block", model_preset("tiny"), seed=0, device=torch.device("cpu"))
    compiled, plain = load_memory_preset("compiled"), load_memory_preset("low")
    for key, mem, expected in [("a", compiled, 1), ("a", compiled, 1), ("b", compiled, 2), ("c", plain, 2),
                               ("b", compiled, 3), (None, compiled, 4), (None, compiled, 5)]:
        net.reset(mem, key=key)
        assert len(resets) == expected, key

    def fails(*args, **kwargs):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(runner, "run_mode", fails)
    net.last_run = "b"
    point = workloads.Point(kind="inference_block", preset="tiny", precision="fp32", crop=8, rows=3, extra_rows=0)
    with contextlib.redirect_stderr(io.StringIO()):
        result = runner._guarded_run("compiled", point, compiled, net, workloads.Settings(torch.device("cpu")), None)
    assert result.fields["status"] == "error" and net.last_run is None


def test_a_trainer_removes_the_hooks_its_optimizer_left(monkeypatch) -> None:
    """Host offload registers a gradient hook per large parameter and keeps no handle; on the module every run
    shares, the bench removes them after the run (hooks that were there before stay)."""
    from protfold.config import OptimConfig

    module = torch.nn.Linear(4, 4)
    fired = []
    module.weight.register_post_accumulate_grad_hook(lambda p: fired.append("before"))

    def hooking_adam(params, optim):
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: fired.append("optimizer"))  # handle dropped
        return torch.optim.Adam(params)

    monkeypatch.setattr(workloads, "adam", hooking_adam)
    trainer = workloads._Trainer(module, lambda: module(torch.ones(2, 4)).square().sum(), [], optimize=True,
                                 optim=OptimConfig())
    trainer.release()
    module(torch.ones(2, 4)).sum().backward()
    assert fired == ["before"]


def test_a_trainer_that_fails_to_build_removes_its_hooks(monkeypatch) -> None:
    """When priming the optimizer fails (out of memory at a large shape, say), the hooks it registered do not
    outlive the failed trainer."""
    from protfold.config import OptimConfig

    module = torch.nn.Linear(4, 4)
    fired = []

    def hooking_adam(params, optim):
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: fired.append("optimizer"))
        return torch.optim.Adam(params)

    def failing_prime(self):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(workloads, "adam", hooking_adam)
    monkeypatch.setattr(workloads._Trainer, "_prime", failing_prime)
    with pytest.raises(torch.OutOfMemoryError):
        workloads._Trainer(module, lambda: module(torch.ones(2, 4)).sum(), [], optimize=True, optim=OptimConfig())
    module(torch.ones(2, 4)).sum().backward()
    assert fired == []
