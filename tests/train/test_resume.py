"""Resume: N steps straight equal N/2 steps, a resume from last.ckpt, and N/2 more steps.

Both runs go through `protfold fit` (LightningCLI) on CPU with the tiny preset; the model has dropout,
so this also checks that the torch RNG state travels in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

STEPS = 4
TIGHT = dict(rtol=0.0, atol=1e-6)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], **TIGHT, msg=f"weight {name}")
    ea, eb = a["ema"]["shadow"], b["ema"]["shadow"]
    assert ea.keys() == eb.keys()
    for name in ea:
        torch.testing.assert_close(eb[name], ea[name], **TIGHT, msg=f"EMA {name}")
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for key in oa["state"]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob["state"][key][field], oa["state"][key][field], **TIGHT,
                                       msg=f"Adam {field} of param {key}")
    assert ob["param_groups"][0]["lr"] == pytest.approx(oa["param_groups"][0]["lr"], rel=1e-12)
    (la,), (lb,) = a["lr_schedulers"], b["lr_schedulers"]
    assert la["last_epoch"] == lb["last_epoch"] == STEPS
    assert la["_last_lr"] == pytest.approx(lb["_last_lr"], rel=1e-12)


def _straight_and_resumed(run_kit, tmp_path: Path, *, samples_per_epoch: int, val_every: int | None,
                          ckpt: str, extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Run N steps straight, and N/2 steps then a resume to N; `ckpt` is "last" or "path"; `extra` is
    appended to every command line."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(samples_per_epoch=samples_per_epoch, val_every=val_every)
    run_kit.fit(run_kit.fit_args(straight, steps=STEPS, **common, extra=extra))
    run_kit.fit(run_kit.fit_args(resumed, steps=STEPS // 2, **common, extra=extra))
    first = run_kit.version_dirs(resumed)[0] / "checkpoints" / "last.ckpt"
    half = run_kit.load(first)
    assert half["global_step"] == STEPS // 2
    assert half["lr_schedulers"][0]["last_epoch"] == STEPS // 2
    run_kit.fit(run_kit.fit_args(resumed, steps=STEPS, **common,
                                 extra=extra + ("--ckpt_path", "last" if ckpt == "last" else str(first))))
    assert len(run_kit.version_dirs(resumed)) == 2
    return straight, resumed


def _final(run_kit, root: Path) -> dict:
    return run_kit.load(run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("val_every", [None, STEPS // 2], ids=["no-validation", "validation-at-epoch-end"])
def test_resume_at_epoch_boundary_is_exact(run_kit, tmp_path, val_every):
    """samples_per_epoch = N/2, resumed with `--ckpt_path last`: weights, EMA, Adam moments, scheduler,
    global step, epoch and every logged train/loss equal those of the uninterrupted run.

    Without validation last.ckpt is written at the end of fit, with validation at the validation that ends
    the epoch; Lightning restores those two loop states differently, so both are run.
    """
    straight, resumed = _straight_and_resumed(run_kit, tmp_path, samples_per_epoch=STEPS // 2,
                                              val_every=val_every, ckpt="last")
    a, b = _final(run_kit, straight), _final(run_kit, resumed)
    _assert_same_state(a, b)
    assert a["epoch"] == b["epoch"]
    la, lb = run_kit.train_losses(straight), run_kit.train_losses(resumed)
    assert sorted(la) == list(range(STEPS)), la
    assert sorted(lb) == list(range(STEPS)), lb
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-6), f"train/loss at step {step}"


def _assert_same_run(run_kit, straight: Path, resumed: Path, *, epoch: int) -> None:
    a, b = _final(run_kit, straight), _final(run_kit, resumed)
    _assert_same_state(a, b)
    assert a["epoch"] == b["epoch"] == epoch
    la, lb = run_kit.train_losses(straight), run_kit.train_losses(resumed)
    assert sorted(lb) == sorted(la), (la, lb)
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-6), f"train/loss at step {step}"


def _half_position(run_kit, resumed: Path) -> dict:
    half = run_kit.load(run_kit.version_dirs(resumed)[0] / "checkpoints" / "last.ckpt")
    return half["ProteinDataModule"]["train_position"]


def test_resume_mid_epoch_is_exact(run_kit, tmp_path):
    """A resume from a checkpoint written in the middle of an epoch (validation at step N/2 of an N-step
    epoch): the DataModule's state in the checkpoint holds the epoch and the batches already trained on, and
    the sampler leaves those draws out, so weights, EMA, Adam moments, scheduler and every logged train/loss
    equal those of the uninterrupted run (before, the resumed steps saw the epoch's first examples again)."""
    straight, resumed = _straight_and_resumed(run_kit, tmp_path, samples_per_epoch=STEPS, val_every=STEPS // 2,
                                              ckpt="path")
    assert _half_position(run_kit, resumed)["epoch"] == 0
    assert _half_position(run_kit, resumed)["batches"] == STEPS // 2
    assert sorted(run_kit.train_losses(resumed)) == list(range(STEPS))
    _assert_same_run(run_kit, straight, resumed, epoch=0)


def test_resume_mid_epoch_with_gradient_accumulation_is_exact(run_kit, tmp_path):
    """Accumulation 2 (manual optimisation: an optimiser step at `(batch_idx + 1) % 2 == 0`), an epoch of
    2N batches, validation and the checkpoint after batch N (step N/2): the resumed run goes on at batch_idx
    N with the epoch's next draws, so micro-batches pair up as in the uninterrupted run."""
    straight, resumed = _straight_and_resumed(run_kit, tmp_path, samples_per_epoch=2 * STEPS, val_every=STEPS,
                                              ckpt="last", extra=("--model.accumulate_grad_batches", "2"))
    assert _half_position(run_kit, resumed)["batches"] == STEPS
    _assert_same_run(run_kit, straight, resumed, epoch=0)
