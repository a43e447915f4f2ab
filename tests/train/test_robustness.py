"""Non-finite steps are skipped, counted and logged; too many in a row stop the run; checkpoint writes are
atomic; config errors stop `protfold fit` before any work with a message saying what to change."""

from __future__ import annotations

import csv
import functools
import io

import pytest
import torch

import protfold.train.step as step_lib
from protfold.cli import main
from protfold.train.callbacks import AtomicCheckpointIO
from protfold.train.module import NonFiniteStepsError, ProtfoldModule

BAD_BATCH = 1  # the second training batch of the run


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradients are not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def step_probe(monkeypatch):
    """Weights, EMA and optimizer step count before and after every training batch."""
    seen: list[dict] = []

    def snapshot(self):
        opt = self.optimizers().optimizer
        steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
        return {"weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "ema": {k: v.clone() for k, v in self.ema.shadow.items()},
                "adam_step": max(steps, default=0.0), "global_step": self.global_step}

    def on_train_batch_start(self, batch, batch_idx):
        seen.append({"before": snapshot(self)})

    def on_train_batch_end(self, outputs, batch, batch_idx):
        seen[-1]["after"] = snapshot(self)
        seen[-1]["bad_total"] = self.bad_steps_total

    monkeypatch.setattr(ProtfoldModule, "on_train_batch_start", on_train_batch_start, raising=False)
    monkeypatch.setattr(ProtfoldModule, "on_train_batch_end", on_train_batch_end, raising=False)
    return seen


def _poison(monkeypatch, kind: str, bad_calls) -> None:
    """Make the training loss (kind="loss") or its gradients (kind="grad") non-finite on the given calls."""
    real = step_lib.alphafold_loss
    calls = {"n": 0}

    def alphafold_loss(outputs, batch, cfg, **kwargs):
        loss, terms = real(outputs, batch, cfg, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if bad_calls(calls["n"] - 1):
                loss = loss * float("nan") if kind == "loss" else _NanGradient.apply(loss)
        return loss, terms

    monkeypatch.setattr(step_lib, "alphafold_loss", alphafold_loss)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_counted_and_logged(run_kit, tmp_path, monkeypatch, step_probe, kind):
    _poison(monkeypatch, kind, lambda i: i == BAD_BATCH)
    run_kit.fit(run_kit.fit_args(tmp_path, steps=3, samples_per_epoch=4))
    assert len(step_probe) == 4, "a skipped batch must not count as an optimizer step"
    bad = step_probe[BAD_BATCH]
    for key in ("weights", "ema"):
        for name, value in bad["before"][key].items():
            torch.testing.assert_close(bad["after"][key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    assert bad["after"]["adam_step"] == bad["before"]["adam_step"] == 1
    assert bad["after"]["global_step"] == bad["before"]["global_step"] == 1
    assert [s["bad_total"] for s in step_probe] == [0, 1, 1, 1]
    good = step_probe[BAD_BATCH + 1]
    assert any(not torch.equal(good["after"]["weights"][k], v) for k, v in good["before"]["weights"].items())
    assert all(torch.isfinite(v).all() for v in step_probe[-1]["after"]["weights"].values())

    last = run_kit.load(run_kit.version_dirs(tmp_path)[-1] / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and last["bad_steps_total"] == 1
    with open(run_kit.version_dirs(tmp_path)[-1] / "metrics.csv", newline="") as handle:
        logged = [float(r["train/skipped_steps"]) for r in csv.DictReader(handle) if r.get("train/skipped_steps")]
    assert logged == [0.0, 1.0, 1.0, 1.0]


def test_too_many_bad_steps_in_a_row_stop_the_run(run_kit, tmp_path, monkeypatch, step_probe):
    _poison(monkeypatch, "loss", lambda i: i >= 1)
    with pytest.raises(NonFiniteStepsError, match=r"3 consecutive steps had non-finite loss or gradients; lower "
                       r"the learning rate, check the input data, or use precision 32"):
        run_kit.fit(run_kit.fit_args(tmp_path, steps=10, samples_per_epoch=8, extra=("--model.max_bad_steps", "3")))
    assert len(step_probe) == 4  # one good step, then three bad ones
    first = step_probe[0]["after"]["weights"]
    for name, value in step_probe[-1]["before"]["weights"].items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------- atomic checkpoint writes


def test_interrupted_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io_plugin.save_checkpoint({"global_step": 1, "w": torch.arange(5.0)}, target)
    good_bytes = target.read_bytes()
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of it reaches the disk
        raise OSError("No space left on device")

    for error in (OSError, KeyboardInterrupt):
        def save(obj, handle, *args, _error=error, **kwargs):
            try:
                failing_save(obj, handle)
            except OSError:
                raise _error("interrupted") from None

        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(error):
            io_plugin.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, target)
        assert target.read_bytes() == good_bytes
        assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"], "partial/temporary file left"
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["global_step"] == 1


def test_checkpoint_write_failing_during_fit_keeps_last_checkpoint(run_kit, tmp_path, monkeypatch):
    """A real run: last.ckpt of step 2 survives a failed write at step 4 (validation every 2 steps)."""
    run_kit.fit(run_kit.fit_args(tmp_path, steps=2, samples_per_epoch=2, val_every=2))
    ckpt_dir = run_kit.version_dirs(tmp_path)[-1] / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    assert "last.ckpt" in before
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        handle.write(b"PARTIAL")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="disk full"):
        run_kit.fit(run_kit.fit_args(tmp_path, steps=4, samples_per_epoch=2, val_every=2,
                                     extra=("--ckpt_path", str(ckpt_dir / "last.ckpt"))))
    monkeypatch.setattr(torch, "save", real_save)
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before
    new_dir = run_kit.version_dirs(tmp_path)[-1] / "checkpoints"
    assert not new_dir.exists() or not any(new_dir.iterdir()), "partial/temporary checkpoint left behind"


# ----------------------------------------------------------------------------- config errors


def _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, *extra: str) -> str:
    """Runs `protfold fit` expecting a config error; no model or trainer may have been built."""
    built = []
    real_init = ProtfoldModule.__init__

    @functools.wraps(real_init)  # jsonargparse reads the signature
    def init(self, *args, **kwargs):
        built.append(kwargs.get("preset"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ProtfoldModule, "__init__", init)
    with pytest.raises(SystemExit) as exc:
        main(run_kit.fit_args(tmp_path / "run", steps=1, extra=extra))
    assert exc.value.code not in (0, None)
    assert not built, "the model was built before the config error"
    assert not (tmp_path / "run").exists()
    captured = capsys.readouterr()
    return f"{exc.value.code}\n{captured.err}"


def test_config_error_unknown_key(run_kit, tmp_path, capsys, monkeypatch):
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, "--model.bogus", "1")
    assert "unrecognized arguments: --model.bogus" in message


def test_config_error_impossible_memory_combination(run_kit, tmp_path, capsys, monkeypatch):
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, "--model.memory.checkpoint_storage", "bf16")
    assert "model.memory" in message and "set blocks_per_checkpoint" in message


def test_config_error_crop_beyond_model_limit(run_kit, tmp_path, capsys, monkeypatch):
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, "--data.crop_size", "5000")
    assert "data.crop_size=5000 is beyond the model's limit max_crop=4096" in message
    assert "lower data.crop_size" in message


def test_config_error_resume_with_another_preset(run_kit, pretrained, tmp_path, capsys, monkeypatch):
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch,
                                 "--model.preset", "small", "--ckpt_path", str(pretrained))
    assert "trained with another model configuration" in message
    assert "c_m=16 (now 64)" in message and "--model.init_from" in message


def test_config_error_loss_weight_without_its_head(run_kit, tmp_path, capsys, monkeypatch):
    """A loss weight for a head the model lacks would otherwise be dropped without a word."""
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, "--model.loss.experimentally_resolved",
                                 "0.01", "--model.model_overrides", "{experimentally_resolved: false}")
    assert "model.loss.experimentally_resolved=0.01 needs the experimentally resolved head" in message
    assert "model.model_overrides.experimentally_resolved: true" in message


def test_config_error_pae_loss_without_its_head(run_kit, tmp_path, capsys, monkeypatch):
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, "--model.loss.pae", "0.1")
    assert "model.loss.pae=0.1 needs the predicted aligned error head" in message
    assert "tiny_ptm" in message and "model.model_overrides.predicted_aligned_error: true" in message


@pytest.mark.parametrize("extra, words", [
    (("--model.memory.triangle_slice_mb", "128"), ("triangle_slice_mb", "set low_memory_triangle")),
    (("--model.inference_memory", "{triangle_slice_mb: 64}"), ("model.inference_memory", "triangle_slice_mb")),
    (("--model.memory.low_memory_triangle", "true", "--model.memory.offload_triangle_edge", "true"),
     ("model.memory.offload_triangle_edge", "model.inference_memory")),
    (("--model.memory.structure_chunk", "64"), ("model.memory.structure_chunk", "model.inference_memory")),
    (("--model.inference_memory", "{head_chunk: 64}"), ("model.inference_memory.head_chunk", "protfold predict")),
])
def test_config_error_inert_memory_combination(run_kit, tmp_path, capsys, monkeypatch, extra, words):
    """A memory setting that would change nothing where it is set is refused before any work, naming the fields."""
    message = _fails_before_work(run_kit, tmp_path, capsys, monkeypatch, *extra)
    assert all(word in message for word in words), message
