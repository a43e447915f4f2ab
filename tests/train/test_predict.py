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
    (">x\nMK*VL\n", "'*' is allowed only at the end"),
    (">x\n>y\nMKV\n", "empty sequence"),
    (">x\n*\n", "empty sequence"),
    ("", "no FASTA records"),
])
def test_predict_bad_fasta_names_the_file(pretrained, tmp_path, capsys, text, reason):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(text)
    out = tmp_path / "out"
    code = main(["predict", "--ckpt_path", str(pretrained), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(fasta) in err and reason in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.rglob("*.pdb"))


def test_predict_missing_inputs_are_clear_errors(pretrained, tmp_path, capsys):
    out = str(tmp_path / "out")
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy7\nMKVLAAG\n")
    assert main(["predict", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--input", str(fasta), "--out", out]) == 1
    assert "nope.ckpt" in capsys.readouterr().err
    missing = tmp_path / "missing.fasta"
    assert main(["predict", "--ckpt_path", str(pretrained), "--input", str(missing), "--out", out,
                 "--device", "cpu"]) == 1
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
    from protfold.data.targets import collect_targets
    from protfold.train.module import ProtfoldModule
    from protfold.train.predict import predict_target

    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy7\nMKVLAAG\n")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt_path", str(predictor), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"]) == 0
    written = np.asarray(json.loads((out / "toy7" / "toy7_confidence.json").read_text())["plddt"])
    module = ProtfoldModule.load_from_checkpoint(predictor, map_location="cpu").eval()
    (target,) = collect_targets(fasta)
    data = DataConfig(max_msa_clusters=128, max_extra_msa=1024)
    raw = predict_target(module, target, device=torch.device("cpu"), data=data)["plddt"]
    with module.ema.swapped_in():
        ema = predict_target(module, target, device=torch.device("cpu"), data=data)["plddt"]
    np.testing.assert_allclose(written, ema, atol=1e-4)
    assert np.abs(raw - ema).max() > 1e-3, "raw and EMA weights give the same pLDDT: the test cannot tell"


# ----------------------------------------------------------------------------- ids, duplicates, letters


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_predict_never_writes_outside_out(predictor, tmp_path, capsys, caplog):
    """A record named like a path is written under --out with a safe name, and the run says so."""
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    fasta = work / "q.fasta"
    fasta.write_text(">../../escape\nMKVLAAG\n>/abs/path x\nMKVLA\n")
    out = work / "out"
    before = {p for p in tmp_path.rglob("*")}
    with caplog.at_level("WARNING"):
        code, _ = _run(["predict", "--ckpt_path", str(predictor), "--input", str(fasta), "--out", str(out),
                        "--device", "cpu"], capsys)
    assert code == 0
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out or out in p.parents for p in new), sorted(map(str, new))
    assert sorted(p.name for p in out.iterdir()) == ["_.._escape", "_abs_path"]
    _check_target(out, "_.._escape", "MKVLAAG", varied=False)
    assert "'../../escape' is written as '_.._escape'" in caplog.text


def test_predict_refuses_an_id_with_no_usable_character(predictor, tmp_path, capsys):
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">...\nMKV\n")
    code, text = _run(["predict", "--ckpt_path", str(predictor), "--input", str(fasta), "--out",
                       str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 1 and str(fasta) in text and "no character usable" in text
    assert not (tmp_path / "out").exists()


def test_predict_refuses_duplicate_ids_naming_both_files(predictor, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.fasta").write_text(">same\nMKVLAAG\n")
    (folder / "b.fasta").write_text(">same other words\nGGGG\n")
    code, text = _run(["predict", "--ckpt_path", str(predictor), "--input", str(folder), "--out",
                       str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 1
    assert str(folder / "a.fasta") in text and str(folder / "b.fasta") in text and "unique" in text
    assert not (tmp_path / "out").exists(), "nothing is predicted when the inputs collide"


def test_fasta_stop_codon_and_rare_amino_acids(tmp_path):
    """A trailing '*' is dropped; U (selenocysteine) and O (pyrrolysine) are read as their parents C and K."""
    from protfold.io.fasta import read_fasta

    fasta = tmp_path / "q.fasta"
    fasta.write_text(">sel\nMKUV\nLAO*\n>plain\nmkv*\n")
    assert read_fasta(fasta) == [("sel", "MKCVLAK"), ("plain", "MKV")]


def test_structure_parser_maps_selenocysteine_like_fasta():
    from protfold.io.residues import residue_letter

    assert (residue_letter("SEC"), residue_letter("PYL"), residue_letter("MSE")) == ("C", "K", "M")


def test_predicted_mmcif_is_named_after_its_entry(predictor, tmp_path):
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toyA\nMKVLAAG\n>toyB\nMKVLA\n")
    out = tmp_path / "out"
    assert main(["predict", "--ckpt_path", str(predictor), "--input", str(fasta), "--out", str(out),
                 "--device", "cpu"]) == 0
    for name in ("toyA", "toyB"):
        text = (out / name / f"{name}.cif").read_text()
        assert text.startswith(f"data_{name}\n") and f"_entry.id {name}\n" in text


def test_predict_reports_input_errors_before_loading_torch(tmp_path):
    """An input mistake needs no model: it is reported without importing torch (a fresh process)."""
    import subprocess
    import sys

    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">x\nMKV1\n")
    code = ("import sys, runpy; sys.argv = ['protfold', 'predict', '--ckpt_path', 'none.ckpt', '--input', "
            f"{str(fasta)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
            "from protfold.cli import main\nrc = main()\nassert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert str(fasta) in done.stderr and "not amino acids" in done.stderr


def test_predict_with_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">toy7\nMKVLAAG\n")
    for name, content in (("text.ckpt", b"not a checkpoint\n"), ("cut.ckpt", b"PK\x03\x04" + bytes(100))):
        bogus = tmp_path / name
        bogus.write_bytes(content)
        code, text = _run(["predict", "--ckpt_path", str(bogus), "--input", str(fasta), "--out",
                           str(tmp_path / "out"), "--device", "cpu"], capsys)
        assert code == 1 and str(bogus) in text and "checkpoint" in text, text
        assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
