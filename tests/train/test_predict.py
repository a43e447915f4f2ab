"""`protfold predict`: structure files that Biopython reads back with pLDDT x 100 in every B-factor, the
confidence JSON, skipping of existing outputs, --overwrite, a prepared cache as input, bad FASTA errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from Bio.PDB import MMCIFParser, PDBParser
from Bio.SeqUtils import seq1

from protfold.cli import main
from protfold.data.cache import read_entry

MSAS = Path(__file__).resolve().parents[2] / "data" / "samples" / "msas"


@pytest.fixture(scope="module")
def predictor(pretrained, tmp_path_factory) -> Path:
    """The pretrained checkpoint with random pLDDT-head outputs, different in the raw and the EMA weights.

    After 4 tiny steps the zero-initialised pLDDT head still gives 50 everywhere (the training chains carry
    no resolution in the pLDDT range), which would make B-factor checks and raw/EMA checks blind.
    """
    import torch

    ckpt = torch.load(pretrained, map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(7)
    for weights, prefix in ((ckpt["state_dict"], "model."), (ckpt["ema"]["shadow"], "")):
        for name in ("heads.plddt.net.5.weight", "heads.plddt.net.5.bias"):
            weights[prefix + name] = torch.randn(weights[prefix + name].shape, generator=gen)
    path = tmp_path_factory.mktemp("predictor") / "varied.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def records(sample_cache) -> dict[str, str]:
    """2crb_A (its MSA is under data/samples/msas) and a 7-residue toy without MSA."""
    return {"2crb_A": read_entry(sample_cache / "2crb_A.npz")["sequence"], "toy7": "MKVLAAG"}


def _structure(path: Path):
    parser = PDBParser(QUIET=True) if path.suffix == ".pdb" else MMCIFParser(QUIET=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parser.get_structure(path.stem, str(path))


def _check_target(out: Path, target_id: str, sequence: str, *, varied: bool = True) -> None:
    folder = out / target_id
    confidence = json.loads((folder / f"{target_id}_confidence.json").read_text())
    plddt = np.asarray(confidence["plddt"])
    assert confidence["id"] == target_id and plddt.shape == (len(sequence),)
    assert np.all((plddt >= 0) & (plddt <= 100)), "pLDDT must be on the 0-100 scale"
    assert plddt.max() > 1.0, "pLDDT looks like the [0, 1] scale"
    assert not varied or plddt.std() > 0.1, "constant pLDDT: the B-factor check could not tell residues apart"
    assert confidence["mean_plddt"] == pytest.approx(plddt.mean(), abs=1e-3)
    for suffix in (".pdb", ".cif"):
        structure = _structure(folder / f"{target_id}{suffix}")
        residues = [r for r in structure[0]["A"]]
        assert "".join(seq1(r.get_resname()) for r in residues) == sequence, suffix
        for i, residue in enumerate(residues):
            atoms = list(residue)
            assert any(a.get_id() == "CA" for a in atoms)
            for atom in atoms:
                # files keep two decimals; the JSON keeps four
                assert atom.get_bfactor() == pytest.approx(plddt[i], abs=0.0051), (suffix, i, atom.get_id())


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def test_predict_fasta_writes_readable_files_then_skips_then_overwrites(predictor, records, tmp_path, capsys):
    fasta = tmp_path / "query.fasta"
    fasta.write_text("".join(f">{name} a description\n{seq[:50]}\n{seq[50:]}\n" for name, seq in records.items()))
    out = tmp_path / "out"
    args = ["predict", "--ckpt_path", str(predictor), "--input", str(fasta), "--out", str(out),
            "--msa_dir", str(MSAS), "--device", "cpu"]
    assert main(args) == 0
    for name, seq in records.items():
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(
            [f"{name}.pdb", f"{name}.cif", f"{name}_confidence.json", f"{name}_plddt.png"])
        _check_target(out, name, seq)
    before = _mtimes(out)
    assert len(before) == 8

    capsys.readouterr()
    assert main(args) == 0
    assert "nothing new written" in capsys.readouterr().out
    assert _mtimes(out) == before, "a second run rewrote existing outputs"

    assert main([*args, "--overwrite"]) == 0
    after = _mtimes(out)
    assert after.keys() == before.keys()
    assert all(after[k] > before[k] for k in before), "--overwrite did not rewrite every output"
    for name, seq in records.items():
        _check_target(out, name, seq)


def test_predict_from_prepared_cache(predictor, sample_cache, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    ids = ["1psm_A", "3zee_A"]
    for entry_id in ids:
        shutil.copy(sample_cache / f"{entry_id}.npz", cache)
    out = tmp_path / "out"
    assert main(["predict", "--ckpt_path", str(predictor), "--input", str(cache), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ids
    for entry_id in ids:
        _check_target(out, entry_id, read_entry(cache / f"{entry_id}.npz")["sequence"])


@pytest.mark.parametrize("text, reason", [
    ("MKVLAAG\n>x\nMKV\n", "before the first '>'"),
    (">x\nMKV1LZ\n", "not amino acids"),
    (">x\n>y\nMKV\n", "empty sequence"),
    ("", "no FASTA records"),
])
def test_predict_bad_fasta_names_the_file(pretrained, tmp_path, capsys, text, reason):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(text)
    out = tmp_path / "out"
    code = main(["predict", "--ckpt_path", str(pretrained), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(fasta) in err and reason in err, err
    assert not out.exists() or not any(out.rglob("*.pdb"))


def test_predict_missing_inputs_are_clear_errors(pretrained, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["predict", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--input", "x.fasta", "--out", out]) == 2
    assert "nope.ckpt" in capsys.readouterr().err
    missing = tmp_path / "missing.fasta"
    assert main(["predict", "--ckpt_path", str(pretrained), "--input", str(missing), "--out", out,
                 "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_predict_from_finetuned_checkpoint_without_its_source(run_kit, pretrained, tmp_path):
    """A fine-tuned checkpoint records `init_from` in its hyperparameters; predicting must not need that
    source checkpoint any more (it may be deleted or on another machine)."""
    source = tmp_path / "source.ckpt"
    shutil.copy(pretrained, source)
    root = tmp_path / "ft"
    run_kit.fit(run_kit.fit_args(root, steps=1, extra=("--model.init_from", str(source))))
    finetuned = run_kit.version_dirs(root)[-1] / "checkpoints" / "last.ckpt"
    source.unlink()
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy7\nMKVLAAG\n")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt_path", str(finetuned), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"]) == 0
    _check_target(out, "toy7", "MKVLAAG", varied=False)


def test_predict_uses_ema_weights(predictor, tmp_path):
    """The written pLDDT is that of the checkpoint's averaged (EMA) weights, not its raw weights."""
    import torch

    from protfold.config import DataConfig
    from protfold.train.module import ProtfoldModule
    from protfold.train.predict import iter_targets, predict_target

    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy7\nMKVLAAG\n")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt_path", str(predictor), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"]) == 0
    written = np.asarray(json.loads((out / "toy7" / "toy7_confidence.json").read_text())["plddt"])
    module = ProtfoldModule.load_from_checkpoint(predictor, map_location="cpu").eval()
    (target,) = iter_targets(fasta)
    data = DataConfig(max_msa_clusters=128, max_extra_msa=1024)
    raw = predict_target(module, target, device=torch.device("cpu"), data=data)["plddt"]
    with module.ema.swapped_in():
        ema = predict_target(module, target, device=torch.device("cpu"), data=data)["plddt"]
    np.testing.assert_allclose(written, ema, atol=1e-4)
    assert np.abs(raw - ema).max() > 1e-3, "raw and EMA weights give the same pLDDT: the test cannot tell"
