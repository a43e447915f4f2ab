"""`protfold bench --plan`: the whole table for given shapes and card size, nothing run, files only with --out."""

from __future__ import annotations

import json

import pytest
import torch

from protfold.cli import main
from protfold.config import model_preset
from protfold.plan.auto import choose, plan
from protfold.plan.cost import GIB, Shape, count_parameters


def test_plan_prints_every_preset_and_marks_autos_pick(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--plan", "--model", "af2", "--crops", "256,768", "--card_gib", "12"]) == 0
    text = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # writes nothing without --out
    blocks = text.split("# af2")[1:]
    assert len(blocks) == 2 and "crop 256 / 128 / 1024" in blocks[0] and "budget 9.80 GiB" in blocks[0]
    for block in blocks:
        for mode in ("recompute", "offload", "chunked", "low", "long", "compiled_flex", "none"):
            assert f"\n{mode} " in block
        assert block.count("<- auto") == 1
    budget = 12 * GIB * 0.9 - GIB
    for crop, block in zip((256, 768), blocks):
        best = choose(plan(model_preset("af2"), Shape(crop, 128, 1024), n_params=count_parameters(model_preset("af2")),
                           budget_bytes=budget))
        assert [line.split()[0] for line in block.splitlines() if "<- auto" in line] == [best.mode]


def test_plan_out_writes_csv_and_json_and_reports_nothing_fits(capsys, tmp_path):
    assert main(["bench", "--plan", "--model", "af2", "--crops", "1024", "--card_gib", "4", "--out",
                 str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "no memory preset fits at crop 1024" in text and "would fit" in text
    records = json.loads((tmp_path / "plan.json").read_text())
    assert {r["mode"] for r in records} >= {"low", "long", "recompute"} and not any(r["auto"] for r in records)
    assert (tmp_path / "plan.csv").read_text().splitlines()[0].startswith("preset,crop,rows,extra_rows")


def test_plan_without_a_card_asks_for_its_size():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the plan reads its free memory")
    with pytest.raises(SystemExit, match="--card_gib"):
        main(["bench", "--plan", "--crops", "256"])


def test_bench_modes_auto_becomes_the_pick(capsys):
    from protfold.bench.plan import resolve_auto_modes

    argv = ["--model", "af2", "--crops", "512", "--precisions", "bf16", "--modes", "auto,low", "--card_gib", "12"]
    cfg = model_preset("af2")
    best = choose(plan(cfg, Shape(512, 128, 1024, 0, "bf16"), n_params=count_parameters(cfg),
                       budget_bytes=12 * GIB * 0.9 - GIB))
    assert resolve_auto_modes(argv) == ["--model", "af2", "--crops", "512", "--precisions", "bf16", "--modes",
                                        f"{best.mode},low"]
    assert f"memory auto: {best.mode}" in capsys.readouterr().out
    assert resolve_auto_modes(["--modes", "low"]) == ["--modes", "low"]
    with pytest.raises(SystemExit, match="one point"):
        resolve_auto_modes(["--modes", "auto", "--crops", "256,512", "--card_gib", "80"])
    if not torch.cuda.is_available():
        argv = ["--modes=auto", "--crops", "24", "--device", "cpu"]
        assert resolve_auto_modes(argv) == ["--modes=none", "--crops", "24", "--device", "cpu"]


def test_plan_refuses_a_card_size_that_is_not_positive():
    with pytest.raises(SystemExit, match=r"--card_gib -3: a card's size in GiB must be > 0"):
        main(["bench", "--plan", "--crops", "256", "--card_gib", "-3"])
