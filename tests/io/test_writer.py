"""parse -> write (PDB, mmCIF) -> parse keeps sequence, coordinates, masks and B-factors; Biopython reads
the files; writes are atomic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from Bio.PDB import MMCIFParser, PDBParser

from protfold.io import parse_structure, to_mmcif, to_pdb

# unobserved termini (2q2k), MSE (4zey), insertion codes (1gbt), residue without backbone (2xhe), PDB input (5l33)
ROUND_TRIP = [("2q2k", "A"), ("4zey", "A"), ("1gbt", "A"), ("2xhe", "A"), ("5l33", "A")]


@pytest.mark.parametrize("writer,suffix", [(to_pdb, "pdb"), (to_mmcif, "cif")])
@pytest.mark.parametrize("pdb_id,chain_id", ROUND_TRIP)
def test_round_trip(pdb_id, chain_id, writer, suffix, tmp_path, samples):
    chain = samples.chain_of(pdb_id, chain_id)
    path = writer(chain, tmp_path / f"out.{suffix}")
    (back,) = parse_structure(path)
    assert back.sequence == chain.sequence
    assert back.chain_id == chain.chain_id
    np.testing.assert_array_equal(back.atom_mask, chain.atom_mask)
    np.testing.assert_allclose(back.atom_positions, chain.atom_positions, atol=1e-3)
    np.testing.assert_allclose(back.b_factors, chain.b_factors, atol=5e-3)
    assert back.resolution == chain.resolution and back.method == chain.method
    # Biopython itself reads the same number of atoms
    parser = PDBParser(QUIET=True) if suffix == "pdb" else MMCIFParser(QUIET=True)
    atoms = list(parser.get_structure("x", str(path)).get_atoms())
    assert len(atoms) == int(chain.atom_mask.sum())


def test_plddt_b_factors_from_tensors(tmp_path, samples):
    """A prediction-like input: torch tensors, per-residue pLDDT x 100 as B-factors."""
    chain = samples.chain_of("1a8o", "A")
    plddt = torch.linspace(10.0, 99.0, len(chain.sequence))

    class Prediction:
        aatype = torch.from_numpy(chain.aatype)
        atom_positions = torch.from_numpy(chain.atom_positions).requires_grad_(True)
        atom_mask = torch.from_numpy(chain.atom_mask)
        residue_index = torch.from_numpy(chain.residue_index)
        chain_id = "A"

    for writer, parser, name in ((to_pdb, PDBParser(QUIET=True), "p.pdb"), (to_mmcif, MMCIFParser(QUIET=True), "p.cif")):
        path = writer(Prediction(), tmp_path / name, b_factors=plddt)
        residues = [r for r in parser.get_structure("p", str(path)).get_residues()]
        assert len(residues) == int(chain.observed.sum())
        for residue in residues:
            expected = float(plddt[residue.id[1] - 1])
            assert all(abs(atom.get_bfactor() - expected) < 6e-3 for atom in residue)


def test_write_is_atomic_and_replaces(tmp_path, samples):
    chain = samples.chain_of("1aki", "A")
    target = tmp_path / "model.pdb"
    target.write_text("old content\n")
    to_pdb(chain, target)
    to_mmcif(chain, tmp_path / "model.cif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.cif", "model.pdb"]  # no temp files left
    assert target.read_text().startswith("HEADER") and "old content" not in target.read_text()


def test_bad_shapes_and_long_chain_ids_are_refused(tmp_path, samples):
    chain = samples.chain_of("1aki", "A")
    with pytest.raises(ValueError, match="b_factors"):
        to_pdb(chain, tmp_path / "x.pdb", b_factors=np.zeros(3))
    assert not (tmp_path / "x.pdb").exists()

    class TwoLetterChain:
        aatype, atom_positions, atom_mask = chain.aatype, chain.atom_positions, chain.atom_mask
        chain_id = "AA"

    with pytest.raises(ValueError, match="one-character"):
        to_pdb(TwoLetterChain(), tmp_path / "y.pdb")
    (back,) = parse_structure(to_mmcif(TwoLetterChain(), tmp_path / "y.cif"))  # mmCIF has no such limit
    assert back.chain_id == "AA" and back.sequence == chain.sequence
