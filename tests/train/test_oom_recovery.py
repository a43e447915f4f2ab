"""Recovery from out-of-memory (`optim.recover_oom`), with an injected error, through `protfold fit` on CPU.

A test-only hook (`ProtfoldModule.oom_hook`) raises `torch.OutOfMemoryError` in the `recompute` mode at step
K; the run must retry the same batch with the same draws in `offload` (the next preset down
`protfold.train.oom.MEMORY_LADDER`) and end with the weights of a run that switched to `offload` at step K
by itself.
"""

from __future__ import annotations

import pytest
import torch

from protfold.config import load_memory_preset
from protfold.train.module import ProtfoldModule
from protfold.train.oom import MEMORY_LADDER, crop_that_fits, next_leaner, requested_bytes

STEPS, K = 4, 2


def _fingerprint(batch) -> float:
    return float(batch["aatype"].float().sum() + batch["msa_feat"].sum())


def _run(run_kit, root, monkeypatch, hook) -> dict:
    monkeypatch.setattr(ProtfoldModule, "oom_hook", staticmethod(hook))
    run_kit.fit(run_kit.fit_args(root, steps=STEPS, extra=("--model.memory", "recompute")))
    return run_kit.load(run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt")


def test_injected_oom_retries_the_batch_in_the_leaner_mode(run_kit, tmp_path, monkeypatch, caplog):
    seen: list[tuple[int, str, int, float]] = []
    offload = load_memory_preset("offload")

    def failing(module):
        seen.append((module.global_step, module.train_memory == offload, module.draw_step_settings()[0],
                     module._current_batch_fingerprint))
        if module.global_step == K and module.train_memory == load_memory_preset("recompute"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def switching(module):
        if module.global_step == K:
            module.set_train_memory(offload)

    monkeypatch.setattr(ProtfoldModule, "_current_batch_fingerprint", 0.0, raising=False)
    original = ProtfoldModule.training_step

    def recording(self, batch, batch_idx):
        self._current_batch_fingerprint = _fingerprint(batch)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ProtfoldModule, "training_step", recording)
    with caplog.at_level("WARNING", logger="protfold.train.module"):
        recovered = _run(run_kit, tmp_path / "recovered", monkeypatch, failing)
    assert "out of memory at step 2: memory mode recompute -> offload" in caplog.text
    at_k = [s for s in seen if s[0] == K]
    assert len(at_k) == 2 and not at_k[0][1] and at_k[1][1], at_k  # tried in recompute, retried in offload
    assert at_k[0][2:] == at_k[1][2:]  # the same batch and the same recycling draw
    assert [s[0] for s in seen] == [0, 1, K, K, 3]  # nothing skipped, nothing run twice but the failed step
    assert recovered["train_memory"] == {k: getattr(offload, k) for k in recovered["train_memory"]}

    reference = _run(run_kit, tmp_path / "reference", monkeypatch, switching)
    assert recovered["global_step"] == reference["global_step"] == STEPS
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(recovered["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
    (oa,), (ob,) = reference["optimizer_states"], recovered["optimizer_states"]
    for key in oa["state"]:
        assert float(ob["state"][key]["step"]) == float(oa["state"][key]["step"]) == STEPS
        torch.testing.assert_close(ob["state"][key]["exp_avg"], oa["state"][key]["exp_avg"], rtol=0, atol=1e-6)


def test_oom_in_the_leanest_mode_stops_naming_a_crop(run_kit, tmp_path, monkeypatch):
    def always(module):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")

    monkeypatch.setattr(ProtfoldModule, "oom_hook", staticmethod(always))
    with pytest.raises(RuntimeError, match=r"leanest memory mode 'low' with crop 24: a crop of about \d+ residues"):
        run_kit.fit(run_kit.fit_args(tmp_path, steps=2, extra=("--model.memory", "long")))


def test_recover_oom_off_raises_the_error(run_kit, tmp_path, monkeypatch):
    def always(module):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(ProtfoldModule, "oom_hook", staticmethod(always))
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        run_kit.fit(run_kit.fit_args(tmp_path, steps=2, extra=("--model.optim.recover_oom", "false")))


def test_ladder_goes_down_to_low_and_estimates_a_crop():
    names = []
    mem = load_memory_preset(MEMORY_LADDER[0])
    while (nxt := next_leaner(mem)) is not None:
        names.append(nxt[0])
        mem = nxt[1]
    assert names == list(MEMORY_LADDER[1:])
    assert requested_bytes("Tried to allocate 2.00 GiB. GPU 0 has") == 2 * 1024**3
    gib = 1024**3  # 4 GiB for activations, 16 GiB reached: half the crop
    assert crop_that_fits(512, capacity=6 * gib, resident=2 * gib, peak=15 * gib, requested=3 * gib) == 256


def _gpu_fit(run_kit, root, *, steps: int, mode: str) -> None:
    run_kit.fit(run_kit.fit_args(root, steps=steps, extra=(
        "--model.preset", "small", "--model.memory", mode, "--data.crop_size", "256",
        "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed")))


def _gpu_peak(run_kit, root, mode: str) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _gpu_fit(run_kit, root, steps=1, mode=mode)
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_oom_is_recovered(run_kit, tmp_path, caplog):
    """A real CUDA out-of-memory error: the `small` preset's step is measured in `none` and in `low`, the process
    is limited to the memory halfway between the two peaks, and a run started in `none` must step down the
    ladder to a mode that fits and finish its steps."""
    none_peak = _gpu_peak(run_kit, tmp_path / "none", "none")
    low_peak = _gpu_peak(run_kit, tmp_path / "low", "low")
    if low_peak > 0.8 * none_peak:
        pytest.skip(f"peaks too close to provoke an error between them: none {none_peak}, low {low_peak} bytes")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((none_peak + low_peak) / 2 / total)
    try:
        with caplog.at_level("WARNING", logger="protfold.train.module"):
            _gpu_fit(run_kit, tmp_path / "limited", steps=2, mode="none")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    print([line for line in caplog.text.splitlines() if "out of memory" in line])  # the recovery, for the record
    assert "out of memory at step 0: memory mode none -> triangle" in caplog.text, caplog.text[-2000:]
    ckpt = run_kit.load(run_kit.version_dirs(tmp_path / "limited")[-1] / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and "train_memory" in ckpt
