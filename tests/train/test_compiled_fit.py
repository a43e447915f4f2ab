"""`protfold fit` with compiled blocks (`configs/memory/compiled.yaml`, and `compiled_flex`, which is `compiled` on
the CPU) trains as the eager path does under Lightning: the same losses step by step, within float reordering.
The README recommends `compiled_flex` first on CUDA, so its Lightning path (precision plugin, EMA callback,
validation without grad, checkpointing) is exercised here on the CPU; tests/gpu covers the kernels on CUDA."""

from __future__ import annotations

import pytest
import yaml

from protfold.model.memory import reset_compiled


def test_compiled_blocks_train_like_eager(run_kit, cwd_repo, tmp_path):
    losses = {}
    for mode in ("recompute", "compiled_flex"):
        reset_compiled()
        root = tmp_path / mode
        run_kit.fit(run_kit.fit_args(root, steps=3, val_every=3, extra=("-c", f"configs/memory/{mode}.yaml")))
        losses[mode] = run_kit.train_losses(root)
        run = run_kit.version_dirs(root)[-1]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        memory = yaml.safe_load((run / "config.yaml").read_text())["model"]["memory"]
        assert memory["compile_blocks"] is (mode == "compiled_flex"), memory  # the preset really applied
    reset_compiled()
    assert sorted(losses["compiled_flex"]) == sorted(losses["recompute"]) and len(losses["recompute"]) == 3
    for step, value in losses["recompute"].items():
        assert losses["compiled_flex"][step] == pytest.approx(value, rel=1e-5), step
