"""Published weights in the user's commands, on the CPU with the small fixture (tests/fixtures/
alphafold_params_small): `protfold convert`, then `protfold predict --ckpt_path` and `protfold fit
--model.init_from` with the converted checkpoint or with the AF2 / OpenFold file directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protfold.cli import main
from protfold.weights import load_model, read_weights

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alphafold_params_small"
SIZES = json.loads((FIXTURE / "config.json").read_text())["protfold_model_config"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "af2_small.ckpt"
    assert main(["convert", str(FIXTURE / "params.npz"), "--out", str(out)]) == 0
    return out


def test_converted_checkpoint_layout(converted):
    ckpt = torch.load(converted, map_location="cpu", weights_only=True)  # tensors and plain values only
    imported = read_weights(FIXTURE / "params.npz")
    assert ckpt["hyper_parameters"] == {"preset": "af2_ptm", "model_overrides": imported.config.overrides}
    assert ckpt["model_config"]["predicted_aligned_error"] and ckpt["model_config"]["c_z"] == SIZES["c_z"]
    assert ckpt["state_dict"].keys() == {f"model.{k}" for k in imported.state_dict}
    for name, tensor in imported.state_dict.items():  # raw and EMA weights both the imported ones
        assert torch.equal(ckpt["state_dict"][f"model.{name}"], tensor), name
        assert torch.equal(ckpt["ema"]["shadow"][name], tensor), name
    model = load_model(converted)  # its own saved configuration
    assert not model.training and model.cfg == imported.config.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, imported.state_dict[name]), name


def test_predict_from_converted_checkpoint_and_from_the_files_directly(converted, tmp_path, capsys):
    fasta = tmp_path / "query.fasta"
    fasta.write_text(">q1\nMKTAYIAKQRQISFVKSHFSRQ\n")
    runs = {"converted": [str(converted)], "npz": [str(FIXTURE / "params.npz")],
            "openfold": [str(FIXTURE / "openfold_state_dict.pt"), "--preset", str(FIXTURE / "config.json")]}
    written = {}
    for name, ckpt in runs.items():
        out = tmp_path / name
        assert main(["predict", "--ckpt_path", *ckpt, "--input", str(fasta), "--out", str(out), "--device", "cpu"]) == 0
        folder = out / "q1"
        assert {"q1.pdb", "q1.cif", "q1_confidence.json"} <= {p.name for p in folder.iterdir()}
        written[name] = ((folder / "q1.pdb").read_text(), json.loads((folder / "q1_confidence.json").read_text()))
    assert written["npz"] == written["converted"] == written["openfold"]
    assert "ATOM" in written["npz"][0]

    code = main(["predict", "--ckpt_path", str(FIXTURE / "params.npz"), "--preset", "tiny", "--input", str(fasta),
                 "--out", str(tmp_path / "bad"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "has shape" in err[0] and "preset 'tiny'" in err[0]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("source", ["params.npz", "openfold_state_dict.pt", "converted"])
def test_fit_init_from_starts_model_and_ema_at_the_imported_weights(source, converted, run_kit, tmp_path, fit_start):
    path = converted if source == "converted" else FIXTURE / source
    model = ["--model.preset", "af2_ptm", "--model.model_overrides", json.dumps({**SIZES, "max_recycles": 1})]
    run_kit.fit(run_kit.fit_args(tmp_path / "ft", steps=1, extra=(*model, "--model.init_from", str(path))))
    report, imported = fit_start["report"], read_weights(FIXTURE / "params.npz").state_dict
    assert report.loaded == len(imported) == 360 and not report.missing and not report.mismatched
    assert fit_start["ema"].keys() == fit_start["weights"].keys() == imported.keys()
    for name, tensor in imported.items():
        assert torch.equal(fit_start["weights"][name], tensor), name
        assert torch.equal(fit_start["ema"][name], tensor), name


def test_fit_init_from_weights_of_another_size_is_one_line(run_kit, tmp_path, capsys):
    args = run_kit.fit_args(tmp_path / "bad", steps=1, extra=("--model.init_from", str(FIXTURE / "params.npz")))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"protfold fit: {FIXTURE / 'params.npz'}: "), err
    assert "has shape" in err[0] and "preset 'tiny'" in err[0]
