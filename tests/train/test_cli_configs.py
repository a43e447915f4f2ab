"""Every shipped YAML config parses through `protfold fit -c ... --print_config` and builds its model (on the
meta device: no memory, no time, even for af2); and the main job, `protfold fit -c configs/sample.yaml`
with small overrides, writes last.ckpt, a best checkpoint, metrics.csv, config.yaml and curves.png."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from protfold.cli import main
from protfold.config import MemoryConfig, load_memory_preset, memory_preset_names, model_preset
from protfold.model.alphafold import AlphaFold

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))


def test_configs_are_found():
    assert "configs/sample.yaml" in CONFIGS and "configs/finetune.yaml" in CONFIGS
    assert "configs/finetune_af2.yaml" in CONFIGS
    for folder in ("configs/model/", "configs/trainer/"):
        assert any(c.startswith(folder) for c in CONFIGS), folder


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_builds(config, cwd_repo, capsys):
    """Each config as documented: alone for sample.yaml, else composed on top of it."""
    stack = ["-c", "configs/sample.yaml"] + ([] if config == "configs/sample.yaml" else ["-c", config])
    with pytest.raises(SystemExit) as exc:
        main(["fit", *stack, "--print_config"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-2000:]
    resolved = yaml.safe_load(out.out)
    own = yaml.safe_load((REPO / config).read_text()) or {}
    _assert_contains(resolved, own, config)

    model = resolved["model"]
    cfg = model_preset(model["preset"], **(model.get("model_overrides") or {}))
    mems = [MemoryConfig(**m) for m in (model.get("memory"), model.get("inference_memory")) if m is not None]
    assert mems, "no memory settings"
    assert resolved["data"]["crop_size"] <= cfg.max_crop
    with torch.device("meta"):
        net = AlphaFold(cfg=cfg)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params > 10_000
    if model["preset"] in ("af2", "af2_ptm"):
        assert 80e6 < n_params < 110e6, n_params  # AF2 without templates: ~93M parameters


@pytest.mark.parametrize("name", memory_preset_names())
def test_memory_preset_by_name(name, cwd_repo, capsys):
    """`--model.memory NAME` selects the shipped preset (package data) by name; a later field flag still applies."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", "configs/sample.yaml", "--model.memory", name, "--model.inference_memory", name,
              "--model.memory.attention", "sdpa", "--print_config"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-2000:]
    model = yaml.safe_load(out.out)["model"]
    preset = load_memory_preset(name)
    assert MemoryConfig(**model["inference_memory"]) == preset
    assert MemoryConfig(**model["memory"]) == dataclasses.replace(preset, attention="sdpa")


def test_memory_presets_are_shipped():
    assert {"none", "recompute", "low", "long", "compiled_flex"} <= set(memory_preset_names())


def test_finetune_af2_is_af2s_fine_tuning_stage(cwd_repo, capsys, tmp_path):
    """configs/finetune_af2.yaml as its header says to run it, with an init_from path of the user's."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", "configs/sample.yaml", "-c", "configs/finetune_af2.yaml",
              "--model.init_from", str(tmp_path / "af2_model_3_ptm.ckpt"), "--print_config"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-2000:]
    resolved = yaml.safe_load(out.out)
    model, data = resolved["model"], resolved["data"]
    assert model["preset"] == "af2_ptm" and model["init_from"] == str(tmp_path / "af2_model_3_ptm.ckpt")
    assert model["init_weights"] == "ema" and model["optim"]["ema_decay"] == 0.999
    assert (data["crop_size"], data["max_msa_clusters"], data["max_extra_msa"]) == (384, 512, 5120)
    assert model["optim"]["lr"] == 5e-4 and model["optim"]["warmup_steps"] == 0
    loss = model["loss"]
    assert (loss["violation"], loss["experimentally_resolved"], loss["pae"]) == (1.0, 0.01, 0.1)
    assert resolved["trainer"]["precision"] == "bf16-mixed"


def _assert_contains(resolved: dict, own: dict, where: str) -> None:
    """Every value the YAML file sets appears in the resolved config."""
    for key, value in own.items():
        assert key in resolved, f"{where}: {key} missing from the resolved config"
        if isinstance(value, dict) and isinstance(resolved[key], dict):
            _assert_contains(resolved[key], value, f"{where}:{key}")
        elif not isinstance(value, dict):
            assert resolved[key] == value, f"{where}: {key} = {resolved[key]!r}, file says {value!r}"


def test_main_job_writes_checkpoints_metrics_config_and_curves(sample_cache, cwd_repo, tmp_path):
    root = tmp_path / "sample"
    main(["fit", "-c", "configs/sample.yaml",
          "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(root), "--model.optim.warmup_steps", "2",
          "--data.cache_dir", str(sample_cache), "--data.crop_size", "24", "--data.max_msa_clusters", "4",
          "--data.max_extra_msa", "8", "--data.num_workers", "0", "--data.samples_per_epoch", "4"])
    run = root / "protfold" / "version_0"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts), ckpts
    assert not [n for n in ckpts if n.startswith(".")], "temporary checkpoint files left"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4 and last["hyper_parameters"]["preset"] == "small"
    assert {"ema", "model_config", "torch_rng", "bad_steps_total"} <= last.keys()

    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [r for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/lddt_ca")]
    assert len(train) == 4 and len(val) == 2
    assert all(0.0 <= float(r["val/lddt_ca"]) <= 1.0 for r in val)

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["preset"] == "small" and config["data"]["crop_size"] == 24
    assert config["trainer"]["max_steps"] == 4
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    perf = json.loads((run / "perf.json").read_text())
    assert perf["steps"] == 4 and perf["world_size"] == 1 and len(perf["step_s"]) == 4
    assert perf["card"] == "cpu" and perf["torch"] == torch.__version__ and perf["date"] and "fit" in perf["command"]
    assert all(t > 0 for t in perf["step_s"]) and perf["median_step_s_after_first"] > 0
    assert perf["recycles"] == [float(r["train/recycles"]) for r in train]
    assert all(float(r["perf/step_s"]) > 0 for r in train)


def test_step_stats_count_optimizer_steps_under_accumulation(sample_cache, cwd_repo, tmp_path):
    """With accumulate_grad_batches 2, perf.json holds one time per optimizer step (2 batches each)."""
    root = tmp_path / "acc"
    main(["fit", "-c", "configs/sample.yaml", "--model.preset", "tiny", "--model.accumulate_grad_batches", "2",
          "--trainer.max_steps", "3", "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "1",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(root), "--data.cache_dir", str(sample_cache), "--data.crop_size", "16",
          "--data.max_msa_clusters", "3", "--data.max_extra_msa", "4", "--data.num_workers", "0",
          "--data.samples_per_epoch", "6"])
    perf = json.loads((root / "protfold" / "version_0" / "perf.json").read_text())
    assert perf["steps"] == 3 and perf["samples_per_step_per_rank"] == 2 and perf["device"] == "cpu"
    assert perf["samples_per_s"] == pytest.approx(2 / perf["median_step_s_after_first"])
