"""Two-process data parallel training on CPU (gloo): `protfold fit --trainer.devices 2 --trainer.strategy ddp`.

Lightning's `ddp` strategy starts rank 1 by re-running the running script with the same arguments, so
the run goes through a small driver script in a subprocess (not pytest itself). The driver wraps
ProtfoldModule to record, on every rank, the recycling count and FAPE clamping drawn at each step, a
digest of each batch, and the final weights and EMA.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

DRIVER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    import torch.distributed as dist
    from protfold.cli import main
    from protfold.train.module import ProtfoldModule

    out = os.environ["PROTFOLD_TEST_RANK_DIR"]
    record = {"draws": [], "batches": []}
    draw = ProtfoldModule.draw_step_settings
    step = ProtfoldModule.training_step

    def draw_step_settings(self):
        n_recycles, clamped = draw(self)
        record["draws"].append([self.global_step, n_recycles, clamped])
        return n_recycles, clamped

    def training_step(self, batch, batch_idx):
        record["batches"].append(hashlib.sha1(batch["msa_feat"].numpy().tobytes()).hexdigest())
        return step(self, batch, batch_idx)

    def on_train_end(self):
        rank = self.global_rank
        record["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        record["backend"] = dist.get_backend() if dist.is_initialized() else None
        torch.save({"weights": self.model.state_dict(), "ema": self.ema.state_dict()["shadow"]},
                   os.path.join(out, f"rank{rank}.pt"))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
            json.dump(record, handle)

    ProtfoldModule.draw_step_settings = draw_step_settings
    ProtfoldModule.training_step = training_step
    ProtfoldModule.on_train_end = on_train_end
    sys.exit(main(sys.argv[1:]))
    """
)
STEPS = 3


def test_two_process_ddp_keeps_ranks_identical(run_kit, tmp_path):
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DRIVER)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    root = tmp_path / "run"
    args = run_kit.fit_args(root, steps=STEPS, samples_per_epoch=4,
                            extra=("--trainer.devices", "2", "--trainer.strategy", "ddp"))
    env = _env(PROTFOLD_TEST_RANK_DIR=str(ranks))
    proc = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=240,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(rec["world_size"] == 2 and rec["backend"] == "gloo" for rec in records)
    # the per-step draws (recycles, clamping) are the same on every rank, one per optimizer step
    assert records[0]["draws"] == records[1]["draws"]
    assert [d[0] for d in records[0]["draws"]] == list(range(STEPS))
    # the ranks trained on different examples (data parallel), yet end with identical weights and EMA
    assert records[0]["batches"] != records[1]["batches"]
    for key in ("weights", "ema"):
        a, b = states[0][key], states[1][key]
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{key} {name} differs across ranks")
    last = run_kit.load(run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STEPS
    for name, value in states[0]["weights"].items():
        torch.testing.assert_close(last["state_dict"][f"model.{name}"], value, rtol=0, atol=0)


def _env(**extra: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env
