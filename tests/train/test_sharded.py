"""Sharded training (FSDP2 through `protfold.train.sharding.ShardedStrategy`) on CPU with two gloo processes.

Lightning starts rank 1 by re-running the running script, so runs go through a small driver script in a
subprocess (as tests/train/test_ddp.py does). The driver records, on every rank, the per-step draws
(recycles, FAPE clamping) and the (dataset index, example seed) of every example the rank trained on.

Shown here, with three two-process launches: a sharded run (every memory switch on) stopped after 2 steps and
resumed to 4 logs the same losses and ends with the same weights, EMA and Adam moments as an uninterrupted DDP
run (started by scripts/torchrun_fit.sh), and DDP equals one process with the same global batch (2
micro-batches per step): so the sharded run equals DDP and its resume is exact. The sharded checkpoint resumed
on one process with the same global batch equals them too; one with another global batch stops with one line
naming both world sizes. The sharded checkpoint is one full file that `protfold predict` and `convert` read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from protfold.data.datamodule import EpochSampler

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from protfold.cli import main
    from protfold.data.datamodule import ProteinDataset
    from protfold.train.module import ProtfoldModule

    out = os.environ["PROTFOLD_TEST_RANK_DIR"]
    record = {"draws": [], "examples": []}
    draw, getitem = ProtfoldModule.draw_step_settings, ProteinDataset.__getitem__

    def draw_step_settings(self):
        n_recycles, clamped = draw(self)
        record["draws"].append([self.global_step, n_recycles, clamped])
        return n_recycles, clamped

    def __getitem__(self, key):
        if self.train:
            record["examples"].append(list(key))
        return getitem(self, key)

    def on_train_end(self):
        with open(os.path.join(out, f"rank{self.global_rank}.json"), "w") as handle:
            json.dump(record, handle)

    ProtfoldModule.draw_step_settings = draw_step_settings
    ProteinDataset.__getitem__ = __getitem__
    ProtfoldModule.on_train_end = on_train_end
    sys.exit(main(sys.argv[1:]))
    """
)
STEPS = 4
SAMPLES_PER_EPOCH = 4  # two steps per epoch on two ranks: the half-way checkpoint ends an epoch
SHARDED = ("--trainer.devices", "2", "--trainer.strategy", "protfold_fsdp")
# every memory switch at once: the sharded units compose with the model's own recompute, chunking and offload
# (memory switches compute the same function, so the comparisons below still hold)
LOWEST_MEMORY = ("--model.memory", "low")
ONE_PROCESS_SAME_BATCH = ("--model.accumulate_grad_batches", "2")
# Reduction order differs between a sharded reduce-scatter, DDP's all-reduce and one process's accumulation
STATE_TOL = dict(rtol=1e-5, atol=1e-6)


def _torchrun_ddp(run_kit, tmp_path: Path, name: str, *, steps: int) -> Path:
    """DDP on 2 processes started by the launch recipe scripts/torchrun_fit.sh (torchrun, Lightning reading its
    environment)."""
    root = tmp_path / name
    args = run_kit.fit_args(root, steps=steps, samples_per_epoch=SAMPLES_PER_EPOCH, extra=("--trainer.strategy", "ddp"))
    assert args[0] == "fit"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "torchrun_fit.sh"), "2", *args[1:]], capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _run(run_kit, tmp_path: Path, name: str, *, steps: int, extra: tuple[str, ...], ranks: str):
    """`protfold fit` through the recording driver; the ranks' records go to a folder named `ranks`."""
    ranks = tmp_path / f"{name}_{ranks}_ranks"
    ranks.mkdir(exist_ok=True)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = tmp_path / name
    args = run_kit.fit_args(root, steps=steps, samples_per_epoch=SAMPLES_PER_EPOCH, extra=extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PROTFOLD_TEST_RANK_DIR=str(ranks))
    proc = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=240,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, ranks, proc


def _last(run_kit, root: Path) -> dict:
    return run_kit.load(run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt")


def _assert_same_training(run_kit, a_root: Path, b_root: Path, what: str, *, a_micro: int = 1) -> None:
    """Rank 0's logged loss of every step, and the final weights, EMA and Adam moments, equal within STATE_TOL.
    `a_micro`: micro-batches per step of run a, each logged; the first of a step is rank 0's draw of it."""
    la = {step // a_micro: loss for step, loss in run_kit.train_losses(a_root).items() if step % a_micro == 0}
    lb = run_kit.train_losses(b_root)
    assert sorted(la) == sorted(lb) == list(range(STEPS)), (la, lb)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6), f"{what}: train/loss at step {step}"
    a, b = _last(run_kit, a_root), _last(run_kit, b_root)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, **STATE_TOL, msg=f"{what}: weight {name}")
    for name, value in a["ema"]["shadow"].items():
        torch.testing.assert_close(b["ema"]["shadow"][name], value, **STATE_TOL, msg=f"{what}: EMA {name}")
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert sorted(oa["state"]) == sorted(ob["state"]) and oa["state"]
    for key in oa["state"]:
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob["state"][key][field], oa["state"][key][field], **STATE_TOL,
                                       msg=f"{what}: Adam {field} of parameter {key}")


@pytest.fixture(scope="module")
def runs(run_kit, tmp_path_factory):
    """Sharded on 2 processes with every memory switch: 2 steps, then resumed to 4 (one CSV folder each);
    DDP on 2 processes started by torchrun, 4 steps; one process (this one) with 2 micro-batches per step."""
    tmp = tmp_path_factory.mktemp("sharded")
    sharded, first_ranks, _ = _run(run_kit, tmp, "sharded", steps=STEPS // 2, extra=SHARDED + LOWEST_MEMORY,
                                   ranks="first")
    half = run_kit.version_dirs(sharded)[0] / "checkpoints" / "last.ckpt"
    assert run_kit.load(half)["global_step"] == STEPS // 2
    _, second_ranks, _ = _run(run_kit, tmp, "sharded", steps=STEPS, ranks="second",
                              extra=SHARDED + LOWEST_MEMORY + ("--ckpt_path", str(half)))
    ddp = _torchrun_ddp(run_kit, tmp, "ddp", steps=STEPS)
    single = tmp / "single"
    run_kit.fit(run_kit.fit_args(single, steps=STEPS, samples_per_epoch=SAMPLES_PER_EPOCH,
                                 extra=ONE_PROCESS_SAME_BATCH))
    return {"sharded": sharded, "half": half, "ranks": (first_ranks, second_ranks), "ddp": ddp, "single": single,
            "tmp": tmp}


def test_sharded_stopped_and_resumed_equals_ddp_and_one_process(run_kit, runs):
    _assert_same_training(run_kit, runs["ddp"], runs["sharded"], "sharded (resumed) vs DDP")
    _assert_same_training(run_kit, runs["single"], runs["ddp"], "DDP vs one process", a_micro=2)


def test_ranks_draw_the_same_settings_and_disjoint_deterministic_data(runs):
    """Both ranks draw the same recycling counts and FAPE clamping at every step; their examples are the
    epoch's draws dealt alternately (rank r takes positions r, r+2, ...): disjoint, fixed by the seed, and
    continued where they stopped by the resumed run."""
    records = [{"draws": [], "examples": []} for _ in (0, 1)]
    for folder in runs["ranks"]:
        for rank in (0, 1):
            part = json.loads((folder / f"rank{rank}.json").read_text())
            for key in records[rank]:
                records[rank][key] += part[key]
    assert records[0]["draws"] == records[1]["draws"]
    assert [d[0] for d in records[0]["draws"]] == list(range(STEPS))
    expected: list[list[int]] = []
    for epoch in range(STEPS * 2 // SAMPLES_PER_EPOCH):
        sampler = EpochSampler(3, num_samples=SAMPLES_PER_EPOCH, seed=0)
        sampler.set_epoch(epoch)
        expected += [list(item) for item in sampler]
    assert np.unique([e[1] for e in expected]).size == len(expected)
    seeds = [{tuple(e) for e in rec["examples"]} for rec in records]
    assert not seeds[0] & seeds[1], "the ranks trained on the same draws"
    for rank, rec in enumerate(records):
        assert rec["examples"] == expected[rank::2], f"rank {rank} examples"


def test_sharded_checkpoint_is_full_and_read_by_predict_and_convert(run_kit, runs, tmp_path, sample_cache):
    from protfold.cli import main
    from protfold.train.module import load_module

    ckpt = run_kit.version_dirs(runs["sharded"])[-1] / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), "the sharded strategy writes one file"
    module = load_module(str(ckpt))
    saved = _last(run_kit, runs["sharded"])
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][f"model.{name}"], rtol=0, atol=0)
    out = tmp_path / "converted.ckpt"
    assert main(["convert", str(ckpt), "--out", str(out)]) == 0
    converted = run_kit.load(out)
    assert converted["state_dict"].keys() == saved["state_dict"].keys()
    fasta = tmp_path / "one.fasta"
    fasta.write_text(">one\nMKTAYIAKQRQISFVKSHFSRQ\n")
    assert main(["predict", "--ckpt_path", str(ckpt), "--input", str(fasta), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "one" / "one.pdb").is_file()


def test_sharded_checkpoint_resumes_on_one_process_with_the_same_global_batch(run_kit, runs):
    other = runs["tmp"] / "other_world"
    run_kit.fit(run_kit.fit_args(other, steps=STEPS, samples_per_epoch=SAMPLES_PER_EPOCH,
                                 extra=ONE_PROCESS_SAME_BATCH + ("--ckpt_path", str(runs["half"]))))
    resumed, straight = _last(run_kit, other), _last(run_kit, runs["ddp"])
    assert resumed["global_step"] == STEPS
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, **STATE_TOL, msg=f"weight {name}")
    for name, value in straight["ema"]["shadow"].items():
        torch.testing.assert_close(resumed["ema"]["shadow"][name], value, **STATE_TOL, msg=f"EMA {name}")


def test_resume_with_another_global_batch_names_both_world_sizes(run_kit, runs, tmp_path, capsys):
    from protfold.cli import main

    ckpt = run_kit.version_dirs(runs["sharded"])[-1] / "checkpoints" / "last.ckpt"
    args = run_kit.fit_args(tmp_path / "run", steps=STEPS + 1, samples_per_epoch=SAMPLES_PER_EPOCH,
                            extra=("--ckpt_path", str(ckpt)))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "world size 2 (global batch 2)" in err and "at world size 1 (global batch 1" in err, err
