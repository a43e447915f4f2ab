"""Fine-tuning with `protfold fit -c configs/finetune.yaml --model.init_from CKPT`.

The `pretrained` checkpoint (tests/train/conftest.py) has no experimentally resolved or PAE head, 3 Evoformer
blocks and 25 pLDDT bins; the fine-tuned model is the tiny preset with both heads on (configs/finetune.yaml):
2 blocks and 50 bins. So the report must list missing, unexpected and shape-mismatched parameters.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from protfold.train.module import ProtfoldModule

FINETUNE = Path(__file__).resolve().parents[2] / "configs" / "finetune.yaml"
TRUNK_PREFIXES = ("input_embedder.", "recycling_embedder.", "extra_msa_embedder.", "extra_msa_stack.", "evoformer.")


def _finetune(run_kit, root: Path, ckpt: Path, *extra: str) -> Path:
    args = run_kit.fit_args(root, steps=2, extra=("-c", str(FINETUNE), "--model.init_from", str(ckpt), *extra))
    run_kit.fit(args)
    return run_kit.version_dirs(root)[-1]


def test_finetune_reports_keys_and_starts_ema_from_loaded_weights(run_kit, pretrained, tmp_path, fit_start):
    run = _finetune(run_kit, tmp_path / "ft", pretrained)
    report = fit_start["report"]
    assert report is not None and report.source == str(pretrained)
    heads = ("heads.experimentally_resolved.linear", "heads.predicted_aligned_error.linear")
    assert report.missing == [f"{head}.{p}" for head in heads for p in ("bias", "weight")]
    assert report.unexpected and all(k.startswith("evoformer.blocks.2.") for k in report.unexpected)
    mismatched = {name: (ours, theirs) for name, ours, theirs in report.mismatched}
    assert mismatched == {"heads.plddt.net.5.weight": ((50, 8), (25, 8)), "heads.plddt.net.5.bias": ((50,), (25,))}
    text = str(report)
    assert "4 missing" in text and "unexpected" in text and "shape mismatch" in text and "(50, 8)" in text

    # the EMA starts from the loaded (EMA) weights, the model too; new or re-shaped tensors keep their init
    source = run_kit.load(pretrained)["ema"]["shadow"]
    torch.manual_seed(0)  # LightningCLI seeds 0 before building the model: the same fresh init
    overrides = {"experimentally_resolved": True, "predicted_aligned_error": True}
    fresh = ProtfoldModule(preset="tiny", model_overrides=overrides).model.state_dict()
    ema, weights = fit_start["ema"], fit_start["weights"]
    assert ema.keys() == weights.keys() == fresh.keys()
    loaded = [k for k in ema if k not in report.missing and k not in mismatched]
    assert len(loaded) == report.loaded > 300
    differs_from_init = 0
    for name in ema:
        expected = source[name] if name in loaded else fresh[name]
        torch.testing.assert_close(ema[name], expected, rtol=0, atol=0, msg=f"EMA {name}")
        torch.testing.assert_close(weights[name], expected, rtol=0, atol=0, msg=f"weight {name}")
        differs_from_init += name in loaded and not torch.equal(source[name], fresh[name])
    assert differs_from_init > 0.9 * len(loaded), "loaded weights look like a fresh initialisation"

    # the fine-tuning settings took effect: config, optimizer and the three extra loss terms
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["crop_size"] == 96 and config["data"]["max_msa_clusters"] == 32
    assert config["model"]["loss"]["violation"] == 1.0
    assert config["model"]["loss"]["experimentally_resolved"] == 0.01
    assert config["model"]["loss"]["pae"] == 0.1
    assert config["model"]["loss"]["fape_backbone"] == 0.5  # untouched fields keep their defaults
    last = run_kit.load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    assert last["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(5e-4)
    assert {f"{head}.weight" for head in heads} <= last["ema"]["shadow"].keys()
    with open(run / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/loss")]
    assert len(rows) == 2
    for term in ("train/violation", "train/experimentally_resolved", "train/pae"):
        assert all(r[term] not in ("", None) for r in rows), term


def test_finetune_frozen_trunk_trains_only_structure_module_and_heads(run_kit, pretrained, tmp_path, fit_start):
    run = _finetune(run_kit, tmp_path / "frozen", pretrained, "--model.freeze_trunk", "true")
    trainable = fit_start["trainable"]
    assert trainable and all(k.startswith(("structure_module.", "heads.")) for k in trainable)
    assert any(k.startswith("structure_module.") for k in trainable)
    last = run_kit.load(run / "checkpoints" / "last.ckpt")
    n_opt = sum(len(g["params"]) for g in last["optimizer_states"][0]["param_groups"])
    assert n_opt == len(trainable)
    before, after = fit_start["weights"], {k[len("model."):]: v for k, v in last["state_dict"].items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert not {k for k in changed if k.startswith(TRUNK_PREFIXES)}, "a frozen trunk parameter changed"
    assert changed <= trainable
