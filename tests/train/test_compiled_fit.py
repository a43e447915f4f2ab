"""`protfold fit` with compiled blocks (`--model.memory compiled`, and `compiled_flex`, which is `compiled` on
the CPU) trains as the eager path does under Lightning: the same losses step by step, within float reordering.
The README recommends `compiled_flex` first on CUDA, so its Lightning path (precision plugin, EMA callback,
validation without grad, checkpointing) is exercised here on the CPU; tests/gpu covers the kernels on CUDA, and the
last test here (gpu marker) runs the fit itself on CUDA with FlexAttention, which the CPU cannot."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from protfold.model import primitives
from protfold.model.memory import reset_compiled

# bf16 against bf16 through other kernels: the tolerance of tests/gpu/test_bf16_gpu.py (8 mantissa bits, about
# 1e-2 relative after the Evoformer, the structure module and the losses).
BF16_RTOL = 3e-2


def test_compiled_blocks_train_like_eager(run_kit, cwd_repo, tmp_path, aot_eager_compile):
    """The compiled blocks go through dynamo's `aot_eager` backend here (`aot_eager_compile`): what this test is
    for is Lightning's path around them, and inductor's CPU code generation would take two minutes of CI."""
    losses = {}
    for mode in ("recompute", "compiled_flex"):
        reset_compiled()
        root = tmp_path / mode
        run_kit.fit(run_kit.fit_args(root, steps=3, val_every=3, extra=("--model.memory", mode)))
        losses[mode] = run_kit.train_losses(root)
        run = run_kit.version_dirs(root)[-1]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        memory = yaml.safe_load((run / "config.yaml").read_text())["model"]["memory"]
        assert memory["compile_blocks"] is (mode == "compiled_flex"), memory  # the preset really applied
    assert aot_eager_compile.counter.frame_count >= 2  # both block classes went through torch.compile
    assert sorted(losses["compiled_flex"]) == sorted(losses["recompute"]) and len(losses["recompute"]) == 3
    for step, value in losses["recompute"].items():
        assert losses["compiled_flex"][step] == pytest.approx(value, rel=1e-5), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_fit_on_gpu(run_kit, cwd_repo, tmp_path, monkeypatch):
    """`protfold fit` with `compiled_flex` on CUDA in bf16, from the state of a fresh process (no FlexAttention
    kernel made yet), so that the first flex call is inside the first compiled block's trace: session 6's af2
    `fit` failed there in its first step (CheckpointError). Its losses against `recompute` (plain kernels)."""
    monkeypatch.setattr(primitives, "_flex_compiled", None)
    gpu = ("--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed")
    losses = {}
    for mode in ("compiled_flex", "recompute"):
        reset_compiled()
        root = tmp_path / mode
        # Dynamo's fallback at its recompile limit (session 6: eager blocks whose recompute ran other graphs)
        # raises here, and the limit is 4 graphs per block class over 6 steps of varied MSA depth and recycles: a
        # class should need 2 (static, then symbolic sizes). The flex kernel called eagerly keeps its own limit.
        with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
            run_kit.fit(run_kit.fit_args(root, steps=6, val_every=3,
                                         extra=(*gpu, "--model.memory", mode)))
        losses[mode] = run_kit.train_losses(root)
        perf = json.loads((run_kit.version_dirs(root)[-1] / "perf.json").read_text())
        assert perf["device"] == torch.cuda.get_device_name() and perf["steps"] == 6, perf  # the steps' card
    reset_compiled()
    assert sorted(losses["compiled_flex"]) == sorted(losses["recompute"]) and len(losses["recompute"]) == 6
    for step, value in losses["recompute"].items():
        assert losses["compiled_flex"][step] == pytest.approx(value, rel=BF16_RTOL), step
