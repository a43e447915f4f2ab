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


class _Long:
    """A chain-like of `n` residues of one type with every atom of that type, numbered from `first` (0-based)."""

    def __init__(self, n: int, restype: str = "W", first: int = 0, chain_id: str = "A") -> None:
        from protfold import constants as rc

        self.aatype = np.full(n, rc.restype_order[restype])
        self.atom_mask = rc.restype_atom37_mask[self.aatype]
        self.atom_positions = np.random.default_rng(0).uniform(-50, 50, (n, 37, 3)) * self.atom_mask[..., None]
        self.residue_index = np.arange(first, first + n)
        self.chain_id = chain_id


@pytest.mark.parametrize(("chain", "words"), [
    (_Long(7_200), "100,800 atoms"),  # 14 atoms per TRP: past the 99,999 serials
    (_Long(3, first=9_998), "residue numbers 9999..10001"),
    (_Long(3, chain_id="AB"), "one-character chain ids"),
])
def test_pdb_limits_are_refused_in_one_line_and_mmcif_holds_them(tmp_path, chain, words) -> None:
    from protfold.io.writer import PDBFormatLimitError

    with pytest.raises(PDBFormatLimitError, match=words) as info:
        to_pdb(chain, tmp_path / "x.pdb")
    assert "\n" not in str(info.value) and "x.pdb" in str(info.value) and "mmCIF" in str(info.value)
    assert not (tmp_path / "x.pdb").exists()
    text = to_mmcif(chain, tmp_path / "x.cif").read_text()  # every atom, with its residue number and chain id
    assert text.count("\nATOM ") == int(chain.atom_mask.sum())
    assert f" {chain.residue_index[-1] + 1} TRP {chain.chain_id} " in text


def test_pdb_limits_at_the_edge_are_written(tmp_path) -> None:
    """9,999 as the last residue number and 99,999 serials (atoms plus the TER record) still fit."""
    to_pdb(_Long(2, first=9_997), tmp_path / "a.pdb")
    chain = _Long(7_143)  # 100,002 atoms: 4 taken from the last residue leave 99,998 + TER
    chain.atom_mask = chain.atom_mask.copy()
    chain.atom_mask[-1, np.nonzero(chain.atom_mask[-1])[0][-4:]] = 0
    assert int(chain.atom_mask.sum()) == 99_998
    text = to_pdb(chain, tmp_path / "b.pdb").read_text()
    assert "TER   99999" in text
