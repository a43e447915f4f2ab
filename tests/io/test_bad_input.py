"""Bad files, made in tmp_path from the real samples, raise ProtfoldInputError naming the file, never a
bare KeyError/IndexError/ValueError, and never parse as a shorter protein."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from protfold.errors import ProtfoldInputError
from protfold.io import load_msas, parse_a3m, parse_msa, parse_stockholm, parse_structure


def _raises_naming_file(func, path, match: str | None = None) -> ProtfoldInputError:
    with pytest.raises(ProtfoldInputError) as info:
        func(path)
    assert type(info.value) is ProtfoldInputError
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert "\n" not in info.value.reason
    if match is not None:
        assert match in info.value.reason, info.value.reason
    return info.value


def _atom_lines(text: str) -> list[int]:
    return [i for i, line in enumerate(text.splitlines(keepends=True)) if line.startswith(("ATOM ", "HETATM "))]


@pytest.mark.parametrize(
    "cut", ["mid_token", "before_last_column", "after_first_token", "before_last_column_newline",
            "mid_row_closed_by_hash"]
)
def test_truncated_mmcif_mid_atom_table(cut, tmp_path, samples):
    """A file that ends inside an atom row is refused, whether or not a '#' follows the cut row."""
    text = samples.structure_file("1aki").read_text()
    lines = text.splitlines(keepends=True)
    atom_rows = _atom_lines(text)
    row = atom_rows[len(atom_rows) // 2]  # in the middle of the protein's atoms
    head, line = "".join(lines[:row]), lines[row]
    tail = {
        "mid_token": line[: line.index(".", 40) + 2],  # inside a coordinate
        "before_last_column": line.rstrip().rsplit(maxsplit=1)[0] + " ",
        "after_first_token": "ATOM ",
        # ends with a line break, so only the short last row shows the cut
        "before_last_column_newline": line.rstrip().rsplit(maxsplit=1)[0] + "\n",
        # the end-of-file check cannot see this one: the loop is closed, but its last row lacks values
        "mid_row_closed_by_hash": line.rstrip().rsplit(maxsplit=3)[0] + "\n#\n",
    }[cut]
    path = tmp_path / "1aki_truncated.cif"
    path.write_text(head + tail)
    error = _raises_naming_file(parse_structure, path)
    assert ("incomplete" if cut.endswith("_newline") or cut.endswith("_hash") else "ends inside a row") in error.reason


def test_mmcif_whose_last_table_ends_at_end_of_file_is_valid(tmp_path, samples):
    """CIF lets the end of the file close the last loop: no '#' after it is not truncation."""
    text = samples.structure_file("1aki").read_text()
    stripped = text.rstrip()
    assert stripped.endswith("#")
    path = tmp_path / "1aki_open_end.cif"
    path.write_text(stripped[:-1].rstrip() + "\n")
    (ours,), (reference,) = parse_structure(path), parse_structure(samples.structure_file("1aki"))
    assert ours.sequence == reference.sequence
    np.testing.assert_array_equal(ours.atom_mask, reference.atom_mask)
    np.testing.assert_array_equal(ours.atom_positions, reference.atom_positions)


def test_mmcif_cut_after_a_whole_atom_row_keeps_the_full_sequence(tmp_path, samples):
    """Cut at a row boundary the file is valid CIF; the residues after the cut are unobserved (masked), and
    the sequence stays whole (from _entity_poly_seq), so nothing is silently shortened."""
    text = samples.structure_file("1aki").read_text()
    lines = text.splitlines(keepends=True)
    row = _atom_lines(text)[len(_atom_lines(text)) // 2]
    path = tmp_path / "1aki_cut.cif"
    path.write_text("".join(lines[:row]))
    (cut,), (full,) = parse_structure(path), parse_structure(samples.structure_file("1aki"))
    assert cut.sequence == full.sequence
    assert 0 < cut.atom_mask.sum() < full.atom_mask.sum()


def test_truncated_gzip(tmp_path, samples):
    data = gzip.compress(samples.structure_file("1aki").read_bytes())
    path = tmp_path / "1aki.cif.gz"
    path.write_bytes(data[: len(data) // 2])
    _raises_naming_file(parse_structure, path, "gzip")


@pytest.mark.parametrize("suffix", ["cif", "pdb"])
def test_empty_file(suffix, tmp_path):
    path = tmp_path / f"empty.{suffix}"
    path.write_bytes(b"")
    _raises_naming_file(parse_structure, path, "empty")


@pytest.mark.parametrize("suffix", ["cif", "pdb", "ent"])
def test_random_bytes(suffix, tmp_path):
    path = tmp_path / f"garbage.{suffix}"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises_naming_file(parse_structure, path, "binary")


def test_text_that_is_not_a_structure(tmp_path):
    cif, pdb = tmp_path / "notes.cif", tmp_path / "notes.pdb"
    cif.write_text("hello, this is not an mmCIF file\n")
    pdb.write_text("hello, this is not a PDB file\n")
    _raises_naming_file(parse_structure, cif, "data_")
    _raises_naming_file(parse_structure, pdb, "no ATOM/HETATM")


def test_dna_only_structure(tmp_path, samples):
    """2q2k with only the DNA chain F's atom rows left (entity tables still list protein chains A, B)."""
    text = samples.structure_file("2q2k").read_text()
    names = [line.split()[0] for line in text.splitlines() if line.startswith("_atom_site.")]
    chain_col = names.index("_atom_site.auth_asym_id")
    kept = [
        line for line in text.splitlines(keepends=True)
        if not line.startswith(("ATOM ", "HETATM ")) or line.split()[chain_col] == "F"
    ]
    assert sum(line.startswith(("ATOM ", "HETATM ")) for line in kept) > 100  # the DNA atoms are there
    path = tmp_path / "2q2k_dna_only.cif"
    path.write_text("".join(kept))
    _raises_naming_file(parse_structure, path, "no protein chain")


def test_mmcif_without_atom_records(tmp_path, samples):
    lines = samples.structure_file("1aki").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("_atom_site."))
    end = start
    while not lines[end].startswith("#"):
        end += 1
    path = tmp_path / "1aki_no_atoms.cif"
    path.write_text("".join(lines[: start - 1] + lines[end + 1 :]))  # drop 'loop_' and the table
    _raises_naming_file(parse_structure, path, "_atom_site")


def test_mmcif_with_non_numeric_coordinate(tmp_path, samples):
    text = samples.structure_file("1aki").read_text()
    lines = text.splitlines(keepends=True)
    row = _atom_lines(text)[10]
    values = lines[row].split()
    values[10] = "12.3x4"  # Cartn_x of 1aki's 11th atom
    lines[row] = " ".join(values) + "\n"
    path = tmp_path / "1aki_bad_coordinate.cif"
    path.write_text("".join(lines))
    _raises_naming_file(parse_structure, path)


def test_msa_query_differs_from_chain(tmp_path, samples):
    chain = samples.chain_of("2crb", "A")
    lines = (samples.dir / "msas/2crb_A/bfd_uniclust_hits.a3m").read_text().splitlines(keepends=True)
    query_line = 1
    assert lines[query_line].strip() == chain.sequence
    mutated = chain.sequence[:10] + ("A" if chain.sequence[10] != "A" else "G") + chain.sequence[11:]
    lines[query_line] = mutated + "\n"
    path = tmp_path / "bfd_uniclust_hits.a3m"
    path.write_text("".join(lines))
    good = samples.dir / "msas/2crb_A/uniref90_hits.sto"
    error = _raises_naming_file(lambda p: load_msas([good, p], chain.sequence), path, "position")
    assert "first: 11" in error.reason
    # a query of a different chain (same length is not required to fail the length check)
    other = samples.dir / "msas/4zey_A/bfd_uniclust_hits.a3m"
    _raises_naming_file(lambda p: load_msas([p], chain.sequence), other, "length")


@pytest.mark.parametrize("defect", ["extra_column", "missing_column", "header_without_sequence", "illegal_character", "no_header"])
def test_malformed_a3m_record(defect, tmp_path, samples):
    lines = (samples.dir / "msas/1psm_A/bfd_uniclust_hits.a3m").read_text().splitlines(keepends=True)
    row = 5  # sequence line of the third record
    assert lines[row - 1].startswith(">") and not lines[row].startswith(">")
    if defect == "extra_column":
        lines[row] = lines[row].rstrip("\n") + "K\n"
    elif defect == "missing_column":
        lines[row] = lines[row][1:]
    elif defect == "header_without_sequence":
        del lines[row]
    elif defect == "illegal_character":
        lines[row] = lines[row][:5] + "*" + lines[row][6:]
    else:
        lines = ["MKV\n"] + lines
    path = tmp_path / "bad.a3m"
    path.write_text("".join(lines))
    _raises_naming_file(parse_a3m, path)


def test_ragged_stockholm(tmp_path, samples):
    lines = (samples.dir / "msas/1psm_A/mgnify_hits.sto").read_text().splitlines(keepends=True)
    seq_rows = [i for i, line in enumerate(lines) if line.strip() and not line.startswith(("#", "//"))]
    lines[seq_rows[3]] = lines[seq_rows[3]].rstrip("\n")[:-2] + "\n"
    path = tmp_path / "bad.sto"
    path.write_text("".join(lines))
    _raises_naming_file(parse_stockholm, path, "width")


@pytest.mark.parametrize("suffix", ["a3m", "sto", "fasta"])
def test_empty_msa(suffix, tmp_path):
    path = tmp_path / f"empty.{suffix}"
    path.write_text("")
    _raises_naming_file(parse_msa, path)
