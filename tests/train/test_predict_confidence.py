"""`protfold predict` with a `_ptm` model: PAE and pTM in `<id>_confidence.json`, the PAE and pLDDT PNGs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from protfold.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ptm_predictor(pretrained, tmp_path_factory) -> Path:
    """The pretrained tiny checkpoint as a `tiny_ptm` model: the PAE head added with random weights (raw and
    EMA), so its PAE and pTM vary over residue pairs."""
    ckpt = torch.load(pretrained, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["preset"] = "tiny_ptm"
    ckpt["model_config"]["predicted_aligned_error"] = True
    c_z = ckpt["model_config"]["c_z"]
    gen = torch.Generator().manual_seed(3)
    for weights, prefix in ((ckpt["state_dict"], "model."), (ckpt["ema"]["shadow"], "")):
        weights[prefix + "heads.predicted_aligned_error.linear.weight"] = torch.randn(64, c_z, generator=gen)
        weights[prefix + "heads.predicted_aligned_error.linear.bias"] = torch.randn(64, generator=gen)
    path = tmp_path_factory.mktemp("ptm_predictor") / "ptm.ckpt"
    torch.save(ckpt, path)
    return path


def _predict(ckpt: Path, tmp_path: Path, sequence: str = "MKVLAAGWRD") -> Path:
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">toy\n{sequence}\n")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt_path", str(ckpt), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"]) == 0
    return out / "toy"


def test_predict_writes_pae_ptm_and_both_pngs(ptm_predictor, tmp_path) -> None:
    from protfold.config import DataConfig
    from protfold.data.targets import collect_targets
    from protfold.train.module import ProtfoldModule
    from protfold.train.predict import predict_target

    folder = _predict(ptm_predictor, tmp_path)
    n = 10
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["toy.pdb", "toy.cif", "toy_confidence.json", "toy_pae.png", "toy_plddt.png"])
    record = json.loads((folder / "toy_confidence.json").read_text())
    pae = np.asarray(record["predicted_aligned_error"])
    assert pae.shape == (n, n) and record["max_predicted_aligned_error"] == 31.75
    assert ((pae >= 0) & (pae <= 31.75)).all() and pae.std() > 0.1
    assert 0 < record["ptm"] <= 1 and len(record["plddt"]) == n
    for png in ("toy_pae.png", "toy_plddt.png"):
        assert (folder / png).read_bytes()[:8] == PNG_MAGIC, png
        import matplotlib.image

        assert matplotlib.image.imread(folder / png).ndim == 3, png

    # the values are the EMA model's own outputs, rounded as written
    module = ProtfoldModule.load_from_checkpoint(ptm_predictor, map_location="cpu").eval()
    (target,) = collect_targets(tmp_path / "q.fasta")
    with module.ema.swapped_in():
        pred = predict_target(module, target, device=torch.device("cpu"), data=DataConfig())
    np.testing.assert_allclose(pae, pred["pae"], atol=0.005 + 1e-6)
    assert record["ptm"] == pytest.approx(pred["ptm"], abs=1e-4)


def test_predict_without_the_head_has_no_pae(pretrained, tmp_path) -> None:
    folder = _predict(pretrained, tmp_path)
    assert not (folder / "toy_pae.png").exists() and (folder / "toy_plddt.png").is_file()
    record = json.loads((folder / "toy_confidence.json").read_text())
    assert not {"predicted_aligned_error", "max_predicted_aligned_error", "ptm"} & record.keys()


def test_predict_with_a_tiny_budget_chunks_everything_and_writes_the_same(ptm_predictor, tmp_path, capsys,
                                                                         monkeypatch) -> None:
    """No --inference_memory: the plan for a forced 1-KiB budget is (about) the smallest (chunked attention,
    triangle edge on the host, chunked structure module and heads); the outputs are those of the plain path.
    The PAE goes to the compact .npz (threshold lowered for the test), and a residue number past 9,999 makes the
    PDB writer refuse while the mmCIF is written."""
    from protfold.data.targets import collect_targets
    from protfold.io import confidence
    from protfold.io.writer import PDBFormatLimitError
    from protfold.train import predict

    monkeypatch.setattr(confidence, "PAE_JSON_MAX_RESIDUES", 4)
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy\nMKVLAAGWRD\n")
    folders = {}
    for name, flags in (("plain", ["--inference_memory", "none"]), ("tiny", ["--memory_budget_gib", str(2**-20)])):
        out = tmp_path / name
        assert main(["predict", "--ckpt_path", str(ptm_predictor), "--input", str(fasta), "--out", str(out),
                     "--device", "cpu", *flags]) == 0
        folders[name] = out / "toy"
    printed = capsys.readouterr().out
    assert "memory plan:" in printed and "DOES NOT FIT" in printed and "chunks of" in printed
    assert "triangle edge in host memory" in printed and "10 residues in" in printed
    records = {k: json.loads((f / "toy_confidence.json").read_text()) for k, f in folders.items()}
    np.testing.assert_allclose(records["tiny"]["plddt"], records["plain"]["plddt"], atol=1e-3)
    assert records["tiny"]["ptm"] == pytest.approx(records["plain"]["ptm"], abs=1e-4)
    paes = [confidence.read_pae_npz(folders[k] / "toy_pae.npz") for k in ("plain", "tiny")]
    assert np.abs(paes[0] - paes[1]).max() <= 0.25  # at most one 0.25 A step apart (rounding of equal values)
    cif = {k: [line for line in (f / "toy.cif").read_text().splitlines() if line.startswith("ATOM")]
           for k, f in folders.items()}
    assert len(cif["tiny"]) == len(cif["plain"]) > 0
    xyz = {k: np.array([[float(v) for v in line.split()[10:13]] for line in lines]) for k, lines in cif.items()}
    np.testing.assert_allclose(xyz["tiny"], xyz["plain"], atol=2e-3)

    # a target the PDB format cannot hold: the mmCIF and the confidence files are written, no PDB
    (target,) = collect_targets(fasta)
    pred = {"aatype": np.zeros(3, dtype=np.int64), "atom_positions": np.zeros((3, 37, 3)),
            "atom_mask": np.ones((3, 37)), "residue_index": np.arange(9_998, 10_001), "plddt": np.full(3, 50.0)}
    with pytest.raises(PDBFormatLimitError):
        predict.to_pdb(type("C", (), {**pred, "chain_id": "A"})(), tmp_path / "x.pdb")
    path = predict.write_prediction(tmp_path / "big", target.id, pred)
    assert path.suffix == ".cif" and path.is_file() and not path.with_suffix(".pdb").exists()
    assert (path.parent / "toy_confidence.json").is_file()


def test_predict_stores_z_in_bf16_only_under_bf16(ptm_predictor, tmp_path, capsys) -> None:
    """Under --precision bf16 a budget too small for fp32 z gives a plan with z stored in bf16 (printed), and the
    prediction stays within bf16 rounding of the plain fp32 one; an --inference_memory with pair_storage bf16 is
    refused in one line without --precision bf16."""
    from protfold.config import ModelConfig
    from protfold.model.inference_plan import HEADROOM, InferenceShape, _candidates, predicted_peak_bytes

    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy\nMKVLAAGWRD\n")
    # a budget between the smallest fp32-z plan and the smallest bf16-z plan (10 residues, one sequence)
    cfg = ModelConfig(**torch.load(ptm_predictor, map_location="cpu", weights_only=False)["model_config"])
    peaks = {storage: min(predicted_peak_bytes(m, InferenceShape(10, 1, 1), cfg, torch.bfloat16)
                          for _, m in _candidates(10, bf16_pair=True)
                          if m.pair_storage == storage and not m.offload_triangle_edge)  # predict on the CPU: no host edge
             for storage in ("fp32", "bf16")}
    assert peaks["bf16"] < peaks["fp32"]
    budget_gib = (peaks["bf16"] + peaks["fp32"]) / 2 / HEADROOM / 2**30
    runs = {"plain": ["--inference_memory", "none"], "bf16": ["--precision", "bf16", "--memory_budget_gib", str(budget_gib)]}
    for name, flags in runs.items():
        assert main(["predict", "--ckpt_path", str(ptm_predictor), "--input", str(fasta), "--out",
                     str(tmp_path / name), "--device", "cpu", *flags]) == 0
    assert "z stored in bf16" in capsys.readouterr().out
    records = {k: json.loads((tmp_path / k / "toy" / "toy_confidence.json").read_text()) for k in runs}
    np.testing.assert_allclose(records["bf16"]["plddt"], records["plain"]["plddt"], atol=1.0)  # pLDDT in 0..100
    assert records["bf16"]["ptm"] == pytest.approx(records["plain"]["ptm"], abs=2e-2)
    memory = tmp_path / "m.yaml"
    memory.write_text("pair_chunk: 4\nlow_memory_triangle: true\nattention_chunk_mb: 8\nstructure_chunk: 4\n"
                      "head_chunk: 4\npair_storage: bf16\n")
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ptm_predictor), "--input", str(fasta), "--out", str(tmp_path / "x"),
              "--device", "cpu", "--inference_memory", str(memory)])
    err = capsys.readouterr().err
    assert "pair_storage 'bf16' keeps z in bf16" in err and "--precision bf16" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_predict_with_the_triton_attention_kernel_writes_the_same(ptm_predictor, tmp_path, capsys) -> None:
    """--attention triton (Triton's interpreter on the CPU): planned for the kernel under a budget small enough to
    chunk the attention, the plan line names it, and the outputs are those of the naive kernel."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py: the kernel runs on the CPU
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy\nMKVLAAGWRD\n")
    for name, flags in (("naive", []), ("triton", ["--attention", "triton"])):
        assert main(["predict", "--ckpt_path", str(ptm_predictor), "--input", str(fasta), "--out",
                     str(tmp_path / name), "--device", "cpu", "--memory_budget_gib", str(2**-20), *flags]) == 0
    printed = capsys.readouterr().out
    assert printed.count("extra rows, attention triton, budget") == 1
    records = {k: json.loads((tmp_path / k / "toy" / "toy_confidence.json").read_text()) for k in ("naive", "triton")}
    np.testing.assert_allclose(records["triton"]["plddt"], records["naive"]["plddt"], atol=1e-3)
    assert records["triton"]["ptm"] == pytest.approx(records["naive"]["ptm"], abs=1e-4)
