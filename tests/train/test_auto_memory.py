"""`protfold fit --model.memory auto` through LightningCLI: resolved before the model is built, logged in one
line, and saved in the run's config.yaml as the chosen preset's fields."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from protfold.config import load_memory_preset


def test_fit_auto_on_a_cpu_takes_the_plain_path_and_saves_it(run_kit, tmp_path, caplog):
    argv = run_kit.fit_args(tmp_path, steps=1, extra=("--model.memory", "auto"))
    with caplog.at_level("INFO"):
        run_kit.fit(argv)
    assert "memory auto: none (no CUDA device and no --memory_budget_gib" in caplog.text
    config = yaml.safe_load((run_kit.version_dirs(tmp_path)[-1] / "config.yaml").read_text())
    saved = {k: v for k, v in config["model"]["memory"].items() if not k.startswith("__")}
    assert saved == asdict(load_memory_preset("none"))


def test_fit_auto_with_a_budget_too_small_stops_in_one_line(run_kit, tmp_path, capsys):
    argv = run_kit.fit_args(tmp_path, steps=1, extra=("--model.memory=auto", "--memory_budget_gib", "0.0001"))
    with pytest.raises(SystemExit, match="no memory preset fits at crop 24.*no crop from 32 up fits"):
        run_kit.fit(argv)
    assert not (tmp_path / "protfold").exists()  # stopped before any run folder was made


def test_fit_auto_builds_the_model_with_the_chosen_preset(run_kit, tmp_path, monkeypatch):
    """The choice (here forced to `recompute`, as on a card where it is auto's pick) is what the model runs with."""
    import protfold.plan.auto as auto

    seen = {}

    def pick(cfg, shape, **kwargs):
        seen.update(shape=shape, budget=kwargs["budget_bytes"])
        return "recompute", "memory auto: recompute (test)"

    monkeypatch.setattr(auto, "resolve", pick)
    from protfold.model.alphafold import AlphaFold

    forward = AlphaFold.forward

    def run(self, *args, **kwargs):
        seen.setdefault("mem", kwargs["memory"])  # the training step's memory, passed on each call
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AlphaFold, "forward", run)
    run_kit.fit(run_kit.fit_args(tmp_path, steps=1, extra=("--model.memory", "auto", "--memory_budget_gib", "3")))
    assert seen["shape"].crop == 24 and seen["shape"].rows == 4 and seen["budget"] == 3 * 2**30
    assert seen["mem"] == load_memory_preset("recompute")  # a MemoryConfig, not fields
    config = yaml.safe_load((run_kit.version_dirs(tmp_path)[-1] / "config.yaml").read_text())
    assert config["model"]["memory"]["blocks_per_checkpoint"] == 1
