"""Plain mistakes on the command line get one line naming the problem (no traceback, no page of usage), a
run's saved config runs again as it is, Lightning's lines print once, and torch's threads fit the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from protfold.cli import main


def _protfold(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protfold.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_fit_error_comes_first_and_usage_stays_short(run_kit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(run_kit.fit_args(tmp_path / "run", steps=1, extra=("--model.bogus", "1")))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "protfold fit: error: unrecognized arguments: --model.bogus 1", lines[:3]
    assert len(lines) <= 3, lines


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_that_is_not_a_checkpoint(run_kit, tmp_path, capsys, command):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("these are my notes, not a checkpoint\n")
    argv = run_kit.fit_args(tmp_path / "run", steps=1, extra=("--ckpt_path", str(bogus)))
    argv[0] = command
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert message.startswith(f"protfold {command}: --ckpt_path {bogus}: not a PyTorch checkpoint"), message
    assert "\n" not in message
    assert not (tmp_path / "run").exists()


def test_bench_on_cuda_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _protfold("bench", "--device", "cuda", "--model", "tiny", "--modes", "none", "--crops", "16")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"protfold bench: --device cuda requested, but this machine has no usable CUDA device "
        f"(torch {torch.__version__}); use --device cpu"]


def test_predict_on_cuda_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy\nMKV\n")
    done = _protfold("predict", "--ckpt_path", "x.ckpt", "--input", str(fasta), "--out", str(tmp_path / "o"),
                     "--device", "cuda")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no usable CUDA device" in done.stderr


def test_saved_config_runs_again_and_lightning_logs_once(run_kit, tmp_path):
    """The run's config.yaml holds nothing jsonargparse cannot write back (the checkpoint IO plugin was an
    instance: 'Unable to serialize'), so `fit -c config.yaml` runs it again; each Lightning line prints once."""
    first = tmp_path / "first"
    done = _protfold(*run_kit.fit_args(first, steps=1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Unable to serialize" not in done.stderr
    assert done.stderr.count("Seed set to 0") == 1, done.stderr[:2000]
    assert done.stderr.count("GPU available") == 1
    saved = run_kit.version_dirs(first)[-1] / "config.yaml"
    text = saved.read_text()
    assert "Unable to serialize" not in text
    assert yaml.safe_load(text)["trainer"]["plugins"] == [{"class_path": "protfold.train.callbacks.AtomicCheckpointIO"}]

    again = tmp_path / "again"
    run_kit.fit(["fit", "-c", str(saved), "--trainer.default_root_dir", str(again)])
    ckpt = run_kit.version_dirs(again)[-1] / "checkpoints" / "last.ckpt"
    assert run_kit.load(ckpt)["global_step"] == 1
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")) == []  # atomic writes kept


def test_torch_threads_leave_a_core_per_data_worker(monkeypatch):
    from protfold.train.lightning_cli import set_torch_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    try:
        assert set_torch_threads(None, data_workers=1) == 1 == torch.get_num_threads()
        assert set_torch_threads(None, data_workers=0) == 2 == torch.get_num_threads()
        assert set_torch_threads(None, data_workers=4) == 1
        assert set_torch_threads(3, data_workers=1) == 3 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_torch_threads(None, data_workers=0) == 1  # the user's OMP_NUM_THREADS is left alone
        with pytest.raises(SystemExit, match="torch_threads=0"):
            set_torch_threads(0, data_workers=0)
    finally:
        torch.set_num_threads(before)


def test_fresh_process_error_output_has_no_traceback(tmp_path):
    bogus = tmp_path / "x.ckpt"
    bogus.write_bytes(b"\x00" * 64)
    done = _protfold("validate", "--ckpt_path", str(bogus), "--model.preset", "tiny", "--data.cache_dir", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("protfold validate: --ckpt_path"), done.stderr



@pytest.mark.parametrize("command", ["fit", "predict", "prepare", "bench"])
def test_help_cites_only_documents_that_exist(command, capsys):
    """Help text names documents a user can open: every `*.md` it cites is in the repository."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert len(text) > 200
    cited = set(re.findall(r"[\w./-]+\.md\b", text))
    missing = [name for name in cited if not (repo / name).is_file() and not list(repo.rglob(Path(name).name))]
    assert not missing, missing
