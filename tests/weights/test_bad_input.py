"""Every refusal of `protfold convert`, made from the fixture in tmp_path: exit code 1, one line on stderr
naming the file and the reason, no traceback, nothing written. Most cases run `protfold.cli.main` in this
process (an escaping exception would fail the test); one runs the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protfold.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alphafold_params_small"
REPO = Path(__file__).resolve().parents[2]
AF2 = "alphafold/alphafold_iteration/"


def _npz(tmp: Path, name: str, change) -> Path:
    with np.load(FIXTURE / "params.npz") as data:
        arrays = dict(data)
    change(arrays)
    path = tmp / name
    np.savez(path, **arrays)
    return path


def _pt(tmp: Path, name: str, change) -> Path:
    state = dict(torch.load(FIXTURE / "openfold_state_dict.pt", weights_only=True))
    change(state)
    path = tmp / name
    torch.save(state, path)
    return path


def _truncated(tmp: Path, source: str) -> Path:
    data = (FIXTURE / source).read_bytes()
    path = tmp / f"half_{source}"
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupted(tmp: Path) -> Path:
    data = bytearray((FIXTURE / "params.npz").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # inside an array's bytes: the zip member's CRC no longer matches
    path = tmp / "corrupt.npz"
    path.write_bytes(bytes(data))
    return path


def _multimer_npz(arrays: dict) -> None:
    arrays[f"{AF2}evoformer/~_relative_encoding/position_activations//weights"] = np.zeros((73, 12), np.float32)
    arrays.pop(f"{AF2}evoformer/pair_activiations//weights")


def _template_npz(arrays: dict) -> None:
    key = f"{AF2}evoformer/template_embedding/single_template_embedding/embedding2d//weights"
    arrays[key] = np.zeros((88, 64), np.float32)


def _without_pae(arrays: dict) -> None:
    for p in ("weights", "bias"):
        arrays.pop(f"{AF2}predicted_aligned_error_head/logits//{p}")


def _write(name: str, content: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name
    return make


# case -> (make the source in tmp, extra arguments, words the message must hold)
CASES = {
    "missing_file": (lambda tmp: tmp / "nothere.npz", [], ["no such file"]),
    "truncated_npz": (lambda tmp: _truncated(tmp, "params.npz"), [], ["truncated or corrupt", ".npz"]),
    "corrupt_npz_member": (_corrupted, [], ["truncated or corrupt .npz", "CRC"]),
    "truncated_pt": (lambda tmp: _truncated(tmp, "openfold_state_dict.pt"), [], ["truncated or corrupt checkpoint"]),
    "garbage_pt": (_write("garbage.pt", bytes(range(256)) * 64), [], ["truncated or corrupt checkpoint"]),
    "text_file": (_write("notes.txt", b"these are not parameters\n"), [], ["not a parameter file"]),
    "empty_file": (_write("empty.npz", b""), [], ["empty file"]),
    "unrelated_npz": (lambda tmp: _unrelated_npz(tmp), [], ["not AlphaFold2 parameters"]),
    "unrelated_pt": (lambda tmp: _unrelated_pt(tmp), [], ["not OpenFold or protfold parameters"]),
    "template_npz": (lambda tmp: _npz(tmp, "params_model_1.npz", _template_npz), [],
                     ["templates are not supported", "model_1/model_2", "params_model_3/4/5"]),
    "multimer_npz": (lambda tmp: _npz(tmp, "params_model_1_multimer_v3.npz", _multimer_npz), [],
                     ["AlphaFold-Multimer", "multimer is not supported", "params_model_3/4/5"]),
    "template_pt": (lambda tmp: _pt(tmp, "finetuning_1.pt", lambda s: s.update(
        {"template_embedder.template_pair_embedder.linear.weight": torch.zeros(64, 88)})), [],
        ["OpenFold model with templates", "templates are not supported"]),
    "multimer_pt": (lambda tmp: _pt(tmp, "multimer.pt", lambda s: s.update(
        {"input_embedder.linear_relpos.weight": torch.zeros(12, 73)})), [], ["OpenFold multimer model"]),
    "wrong_preset_npz": (lambda tmp: FIXTURE / "params.npz", ["--preset", "af2"],
                         [f"{AF2}evoformer/preprocess_1d//weights has shape [22, 16]", "preset 'af2' needs [22, 256]"]),
    "wrong_preset_pt": (lambda tmp: FIXTURE / "openfold_state_dict.pt", ["--preset", "small_ptm"],
                        ["input_embedder.linear_tf_m.weight has shape [16, 22]", "preset 'small_ptm' needs [64, 22]"]),
    "bad_json_config": (lambda tmp: FIXTURE / "params.npz", ["--config", "{tmp}/sizes.json"],
                        ["not a model configuration"]),
}


def _unrelated_npz(tmp: Path) -> Path:
    path = tmp / "unrelated.npz"
    np.savez(path, weights=np.ones((3, 3), np.float32), bias=np.zeros(3, np.float32))
    return path


def _unrelated_pt(tmp: Path) -> Path:
    path = tmp / "unrelated.pt"
    torch.save({"encoder.layer.0.weight": torch.ones(3, 3)}, path)
    return path


def _convert(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(["convert", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_1_nothing_written(case, tmp_path, capsys):
    make, extra, words = CASES[case]
    (tmp_path / "sizes.json").write_text('{"c_m": 16, "no_such_size": 3}')
    source = make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, stdout, stderr = _convert(capsys, [str(source), "--out", str(out_dir / "model.ckpt"),
                                             *[a.format(tmp=tmp_path) for a in extra]])
    assert code == 1, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    named = str(tmp_path / "sizes.json") if case == "bad_json_config" else str(source)
    assert lines[0].startswith(f"protfold convert: {named}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in stderr and list(out_dir.iterdir()) == []


def test_ptm_preset_needs_the_pae_head(tmp_path, capsys):
    source = _npz(tmp_path, "params_model_3.npz", _without_pae)
    code, _, stderr = _convert(capsys, [str(source), "--out", str(tmp_path / "m.ckpt"), "--preset", "tiny_ptm"])
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    # sizes do not fit tiny either; the first mismatch is reported before the missing head
    assert "has shape" in stderr and not (tmp_path / "m.ckpt").exists()
    config = tmp_path / "ptm.json"
    sizes = (FIXTURE / "config.json").read_text()
    config.write_text(sizes.replace('"c_plddt": 7', '"c_plddt": 7, "preset": "af2_ptm"'))
    code, _, stderr = _convert(capsys, [str(source), "--out", str(tmp_path / "m.ckpt"), "--config", str(config)])
    assert code == 1, stderr
    assert f"{AF2}predicted_aligned_error_head/logits//weights" in stderr and "use af2, not af2_ptm" in stderr
    # without a configuration the file's own (no PAE head: af2 sizes) is taken, and it converts
    code, stdout, stderr = _convert(capsys, [str(source), "--out", str(tmp_path / "m.ckpt")])
    assert code == 0 and "preset af2 " in stdout, stderr
    assert torch.load(tmp_path / "m.ckpt", weights_only=True)["hyper_parameters"]["preset"] == "af2"


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "model.ckpt"
    out.write_bytes(b"keep me")
    code, _, stderr = _convert(capsys, [str(FIXTURE / "params.npz"), "--out", str(out)])
    assert code == 1 and stderr.strip() == f"protfold convert: {out}: exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"keep me"
    code, _, stderr = _convert(capsys, [str(FIXTURE / "params.npz"), "--out", str(out), "--overwrite"])
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]  # no temporary file left
    assert torch.load(out, weights_only=True)["hyper_parameters"]["preset"] == "af2_ptm"


def test_the_real_command_prints_one_line_without_traceback(tmp_path):
    source = _npz(tmp_path, "params_model_1.npz", _template_npz)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "protfold.cli", "convert", str(source), "--out",
                           str(tmp_path / "m.ckpt")], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    expected = (f"protfold convert: {source}: an AlphaFold2 model with templates (model_1/model_2): templates "
                "are not supported; use a template-free monomer model: params_model_3/4/5.npz or "
                "params_model_3/4/5_ptm.npz")
    assert proc.stderr.strip().splitlines() == [expected]
    assert proc.stdout == "" and not (tmp_path / "m.ckpt").exists()
