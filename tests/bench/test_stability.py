"""`protfold bench --stability`: the same initialisation and batches under several variants, end to end on the
tiny preset (a few steps on real sample proteins through the data pipeline)."""

from __future__ import annotations

import csv
import json

import pytest

from protfold.cli import main


def test_stability_end_to_end_on_tiny(prepared_samples, tmp_path, capsys):
    assert prepared_samples.returncode == 0, prepared_samples.stderr[-2000:]
    out = tmp_path / "stability"
    steps = 3
    assert main(["bench", "--stability", str(steps), "--model", "tiny", "--cache", str(prepared_samples.cache_dir),
                 "--ids", "1psm_A,2crb_A", "--crop", "24", "--rows", "4", "--extra-rows", "8", "--variants",
                 "fp32,bf16,8bit", "--modes", "recompute", "--mode_precision", "fp32", "--device", "cpu",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["variants"]}
    assert list(rows) == ["fp32", "bf16", "8bit", "recompute_fp32"]
    assert rows["fp32"]["max_abs_diff_loss"] == 0 and rows["fp32"]["steps"] == steps
    # recompute in fp32 computes the same function: the same curve within float reordering
    assert rows["recompute_fp32"]["status"] == "ok" and rows["recompute_fp32"]["max_abs_diff_loss"] < 1e-3
    # bf16 rounds: the curves part, but stay close over a few steps
    assert 0 < rows["bf16"]["max_abs_diff_loss"] < 0.05 * rows["fp32"]["final_loss"]
    assert all(0 <= r["final_lddt_ca"] <= 1 for r in rows.values() if r["status"] == "ok")
    # 8-bit moments: the same weights and batches, a curve that parts from fp32 by quantization only
    assert rows["8bit"]["status"] == "ok" and rows["8bit"]["max_abs_diff_loss"] < 0.05 * rows["fp32"]["final_loss"]
    with open(out / "curves.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    ran = [name for name, r in rows.items() if r["status"] == "ok"]
    assert len(curve) == steps * len(ran) and {r["variant"] for r in curve} == set(ran)
    fp32 = [float(r["loss"]) for r in curve if r["variant"] == "fp32"]
    assert fp32[-1] == pytest.approx(rows["fp32"]["final_loss"])
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["model"] == "tiny" and summary["ids"] == ["1psm_A", "2crb_A"]
    assert summary["command"].startswith("protfold bench --stability 3 --model tiny")


@pytest.mark.parametrize("argv, message", [
    (["--variants", "fp32,fp8"], "unknown variant 'fp8'"),
    (["--variants", "bf16"], "reference variant 'fp32' must be in --variants"),
    (["--ids", "nosuch_A"], "no such prepared entry"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--modes", "nosuchmode"], "variant nosuchmode_bf16: memory preset 'nosuchmode'"),
    (["--memory", "nosuch"], "variant fp32: memory preset 'nosuch'"),
])
def test_stability_bad_arguments_fail_in_one_line(prepared_samples, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--stability", "1", "--cache", str(prepared_samples.cache_dir), "--device", "cpu", *argv])


def test_stability_jobs_give_the_same_curves(prepared_samples, tmp_path):
    """--jobs 2 trains the variants in two spawned processes: the same curves as one after another."""
    assert prepared_samples.returncode == 0, prepared_samples.stderr[-2000:]
    curves = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert main(["bench", "--stability", "2", "--model", "tiny", "--cache", str(prepared_samples.cache_dir),
                     "--ids", "1psm_A", "--crop", "16", "--rows", "4", "--extra-rows", "4", "--variants",
                     "fp32,bf16", "--device", "cpu", "--jobs", str(jobs), "--out", str(out)]) == 0
        with open(out / "curves.csv", newline="") as f:
            curves[jobs] = [(r["variant"], int(r["step"]), float(r["loss"]), float(r["lddt_ca"]))
                            for r in csv.DictReader(f)]
        assert [r["variant"] for r in json.loads((out / "summary.json").read_text())["variants"]] == ["fp32", "bf16"]
    assert [c[:2] for c in curves[1]] == [c[:2] for c in curves[2]] == [("fp32", 1), ("fp32", 2), ("bf16", 1),
                                                                        ("bf16", 2)]
    for one, two in zip(curves[1], curves[2]):
        assert two[2] == pytest.approx(one[2], rel=1e-5) and two[3] == pytest.approx(one[3], abs=1e-5)
