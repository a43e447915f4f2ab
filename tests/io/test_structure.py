"""Every shipped structure parses to the manifest's numbers; coordinates equal the files' own text;
the awkward entries (MSE, insertion codes, negative numbers, NMR models, DNA, alt locs) behave."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from protfold import constants as rc
from protfold.errors import ProtfoldInputError
from protfold.io import list_protein_chains, parse_structure


def _position(chain, number: int | str) -> int:
    return chain.author_numbering.index(str(number))


def _atom(chain, number, atom: str) -> np.ndarray:
    i = _position(chain, number)
    assert chain.atom_mask[i, rc.atom_order[atom]] == 1.0
    return chain.atom_positions[i, rc.atom_order[atom]]


def test_shipped_structure_matches_manifest(structure_row, samples):
    row = structure_row
    chain = samples.chain_of(row["id"], row["chain"])
    assert chain.id == f"{row['id']}_{row['chain']}"
    assert len(chain.sequence) == int(row["length"])
    assert int(chain.observed.sum()) == int(row["observed_residues"])
    assert chain.method == row["method"]
    expected = float(row["resolution_A"]) if row["resolution_A"] else None
    assert chain.resolution == pytest.approx(expected)
    length = len(chain.sequence)
    assert chain.aatype.dtype == np.int64 and chain.aatype.shape == (length,)
    assert chain.atom_positions.shape == (length, 37, 3) and chain.atom_positions.dtype == np.float32
    assert chain.atom_mask.shape == (length, 37) and chain.b_factors.shape == (length, 37)
    np.testing.assert_array_equal(chain.residue_index, np.arange(length))
    assert rc.aatype_to_sequence(chain.aatype) == chain.sequence
    # only atoms the residue type has, and nothing stored where unobserved
    assert np.all(chain.atom_mask <= rc.restype_atom37_mask[chain.aatype] + (chain.aatype == 20)[:, None])
    assert np.all(chain.atom_positions[chain.atom_mask == 0] == 0)
    # an observed residue without CA exists only where the manifest says so (2xhe)
    assert int((chain.atom_mask[:, rc.atom_order["CA"]] > 0).sum()) == int(row["observed_residues"]) - (row["id"] == "2xhe")


def test_coordinates_equal_raw_mmcif_text_with_insertion_codes(samples):
    path = samples.structure_file("1gbt")
    chain = samples.chain_of("1gbt", "A")
    rows = [r for r in samples.raw_atom_site(path) if r["auth_asym_id"] == "A" and r["pdbx_PDB_ins_code"] != "?"]
    assert len({(r["auth_seq_id"], r["pdbx_PDB_ins_code"]) for r in rows}) == 4  # 65A, 184A, 188A, 221A
    for r in rows:
        if r["label_atom_id"] not in rc.atom_order or r["label_alt_id"] != ".":
            continue
        got = _atom(chain, r["auth_seq_id"] + r["pdbx_PDB_ins_code"], r["label_atom_id"])
        np.testing.assert_allclose(got, [float(r["Cartn_x"]), float(r["Cartn_y"]), float(r["Cartn_z"])], atol=1e-4)
    # 1gbt line "ATOM   355  C  CA  . ARG A 1 49  A 57.067 12.222  34.584 ... 65  ARG A CA  1": 65A is seq 49
    chain_index = _position(chain, "65A")
    assert chain_index == 48 and chain.sequence[chain_index] == "R"
    np.testing.assert_allclose(_atom(chain, "65A", "CA"), [57.067, 12.222, 34.584], atol=1e-4)


def test_coordinates_equal_raw_pdb_text_negative_numbers(samples):
    path = samples.structure_file("5l33")
    chain = samples.chain_of("5l33", "A")
    atoms = [a for a in samples.raw_pdb_atoms(path) if a["chain"] == "A" and a["number"] <= 2 and not a["alt"]]
    assert any(a["number"] == -1 for a in atoms)
    for a in atoms:
        np.testing.assert_allclose(_atom(chain, a["number"], a["name"]), a["xyz"], atol=1e-4)
        assert chain.b_factors[_position(chain, a["number"]), rc.atom_order[a["name"]]] == pytest.approx(a["b"], abs=1e-3)
    # SEQRES starts GLY SER HIS MET PRO; HIS is numbered -1, so positions 0-1 are unobserved
    assert chain.sequence.startswith("GSHMP") and _position(chain, -1) == 2
    assert not chain.observed[:2].any()


@pytest.mark.parametrize("pdb_id", ["4zey", "1a8o"])
def test_selenomethionine_is_methionine_with_se_as_sd(pdb_id, samples):
    path = samples.structure_file(pdb_id)
    chain = samples.chain_of(pdb_id, "A")
    se_rows = [r for r in samples.raw_atom_site(path)
               if r["label_comp_id"] == "MSE" and r["label_atom_id"] == "SE" and r["auth_asym_id"] == "A"]
    assert len(se_rows) >= 3
    for r in se_rows:
        i = _position(chain, r["auth_seq_id"])
        assert chain.sequence[i] == "M"
        if r["label_alt_id"] == ".":
            np.testing.assert_allclose(chain.atom_positions[i, rc.atom_order["SD"]],
                                       [float(r["Cartn_x"]), float(r["Cartn_y"]), float(r["Cartn_z"])], atol=1e-4)
    assert "X" not in chain.sequence


def test_4zey_numbering_jump_follows_sequence_scheme(samples):
    chain = samples.chain_of("4zey", "A")
    # _pdbx_poly_seq_scheme: GLY seq 1 is author 0, MSE seq 2 is author 4 (file line "A 1 2  MSE 2  4  4 ...")
    assert chain.author_numbering[:3] == ["0", "4", "5"]
    np.testing.assert_allclose(_atom(chain, 4, "CA"), [8.488, 23.827, 5.435], atol=1e-4)  # 4zey.cif HETATM 6


def test_insertion_codes_4zhl(samples):
    chain = samples.chain_of("4zhl", "U")
    with_icode = [n for n in chain.author_numbering if n and not n.lstrip("-").isdigit()]
    assert len(with_icode) >= 3
    assert len(set(chain.author_numbering) - {""}) == int(chain.observed.sum())  # no two residues merged


def test_negative_residue_numbers_1o1z(samples):
    chain = samples.chain_of("1o1z", "A")
    rows = [r for r in samples.raw_atom_site(samples.structure_file("1o1z"))
            if r["auth_asym_id"] == "A" and int(r["auth_seq_id"]) < 0 and r["label_atom_id"] == "CA"]
    assert rows
    for r in rows:
        np.testing.assert_allclose(_atom(chain, r["auth_seq_id"], "CA"),
                                   [float(r["Cartn_x"]), float(r["Cartn_y"]), float(r["Cartn_z"])], atol=1e-4)


def test_first_model_of_nmr_ensemble_2crb(samples):
    rows = [r for r in samples.raw_atom_site(samples.structure_file("2crb")) if r["label_atom_id"] == "CA" and r["auth_seq_id"] == "10"]
    assert len(rows) == 20
    model1 = np.array([float(rows[0][k]) for k in ("Cartn_x", "Cartn_y", "Cartn_z")])
    model2 = np.array([float(rows[1][k]) for k in ("Cartn_x", "Cartn_y", "Cartn_z")])
    assert rows[0]["pdbx_PDB_model_num"] == "1" and np.abs(model1 - model2).max() > 0.01
    np.testing.assert_allclose(_atom(samples.chain_of("2crb", "A"), 10, "CA"), model1, atol=1e-4)


def test_alternate_locations_take_highest_occupancy(samples):
    rows = [r for r in samples.raw_atom_site(samples.structure_file("1o1z")) if r["label_alt_id"] != "." and r["auth_asym_id"] == "A"]
    by_atom: dict[tuple, list] = {}
    for r in rows:
        by_atom.setdefault((r["auth_seq_id"], r["label_atom_id"], r["label_comp_id"]), []).append(r)
    checked = 0
    for (num, atom, _), alts in by_atom.items():
        occupancies = [float(a["occupancy"]) for a in alts]
        if atom not in rc.atom_order or len(alts) < 2 or occupancies.count(max(occupancies)) > 1:
            continue
        best = alts[int(np.argmax(occupancies))]
        np.testing.assert_allclose(_atom(samples.chain_of("1o1z", "A"), num, atom),
                                   [float(best[k]) for k in ("Cartn_x", "Cartn_y", "Cartn_z")], atol=1e-4)
        checked += 1
    assert checked >= 3


def test_dna_chain_is_not_a_protein_chain_2q2k(samples):
    path = samples.structure_file("2q2k")
    assert list_protein_chains(path) == ["A", "B"]
    assert samples.chain_of("2q2k", "A").sequence == samples.chain_of("2q2k", "B").sequence
    with pytest.raises(ProtfoldInputError, match=r"'F' not found; protein chains: A, B"):
        parse_structure(path, "F")


def test_missing_chain_lists_existing_chains(samples):
    with pytest.raises(ProtfoldInputError) as info:
        parse_structure(samples.structure_file("5yh2"), chain_id="Q")
    assert str(samples.structure_file("5yh2")) in str(info.value)
    assert "A, C, B, D" in str(info.value)


def test_assembly_without_entity_poly_seq_ignores_labelled_ligands(samples):
    chain = samples.chain_of("721p-assembly1", "A")  # GNP and MG carry chain label A in this file
    assert len(chain.sequence) == 166 and "X" not in chain.sequence and chain.sequence.startswith("MTEYKLVVVG")


def test_gzip_gives_same_chain(tmp_path, samples):
    dest = tmp_path / "4zey.cif.gz"
    with open(samples.structure_file("4zey"), "rb") as src, gzip.open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    (got,) = parse_structure(dest)
    want = samples.chain_of("4zey", "A")
    assert got.id == want.id and got.sequence == want.sequence
    np.testing.assert_array_equal(got.atom_positions, want.atom_positions)


def test_pdb_numbering_not_matching_seqres_is_aligned(tmp_path, samples):
    """5l33 with residues 60-62 deleted and residues >= 63 renumbered +100: no offset fits SEQRES, the
    placement must still put every residue where the original file has it."""
    lines = []
    for line in samples.structure_file("5l33").read_text().splitlines():
        if line.startswith(("ATOM  ", "HETATM", "ANISOU")) and line[21] == "A":
            number = int(line[22:26])
            if 60 <= number <= 62:
                continue
            if number >= 63:
                line = line[:22] + f"{number + 100:4d}" + line[26:]
        lines.append(line)
    path = tmp_path / "5l33_renumbered.pdb"
    path.write_text("\n".join(lines) + "\n")
    (got,) = parse_structure(path)
    want = samples.chain_of("5l33", "A")
    assert got.sequence == want.sequence
    removed = [_position(want, n) for n in (60, 61, 62)]
    expected_mask = want.atom_mask.copy()
    expected_mask[removed] = 0
    np.testing.assert_array_equal(got.atom_mask, expected_mask)
    np.testing.assert_array_equal(got.atom_positions[expected_mask > 0], want.atom_positions[expected_mask > 0])
