"""Every shipped MSA parses to the manifest's depth with the chain's sequence as query; deletion counts
agree with a plain per-character reading of the AF2 rules; merging, FASTA and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from protfold.errors import ProtfoldInputError
from protfold.io import (
    MSA,
    find_msa_files,
    load_msas,
    parse_a3m,
    parse_fasta_alignment,
    parse_msa,
    parse_stockholm,
    single_sequence_msa,
)


def _reference_a3m(text: str) -> tuple[list[str], list[list[int]]]:
    """Character loop: lower-case letters are insertions counted at the next aligned column, '.' ignored."""
    records, sequences, deletions = [], [], []
    for line in text.splitlines():
        if line.startswith(">"):
            records.append([])
        elif line.strip():
            records[-1].append(line.strip())
    for chunks in records:
        seq, dels, pending = [], [], 0
        for ch in "".join(chunks):
            if ch.islower():
                pending += 1
            elif ch != ".":
                seq.append(ch)
                dels.append(pending)
                pending = 0
        sequences.append("".join(seq))
        deletions.append(dels)
    return sequences, deletions


def _reference_stockholm(text: str) -> tuple[list[str], list[list[int]]]:
    """Character loop: keep columns where the query (first row) is not a gap, count residues elsewhere."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and line.strip() != "//":
            name, seq = line.split()
            rows[name] = rows.get(name, "") + seq
    aligned = list(rows.values())
    query = aligned[0]
    sequences, deletions = [], []
    for row in aligned:
        seq, dels, pending = [], [], 0
        for q, ch in zip(query, row):
            if q in "-.":
                pending += ch not in "-."
                continue
            seq.append("-" if ch in "-." else ch.upper())
            dels.append(pending)
            pending = 0
        sequences.append("".join(seq))
        deletions.append(dels)
    return sequences, deletions


def test_shipped_msa_depth_and_query(msa_row, samples):
    msa = parse_msa(samples.dir / msa_row["file"])
    chain = samples.chain_of(msa_row["id"], msa_row["chain"])
    assert msa.depth == int(msa_row["msa_num_seqs"])
    assert msa.query == chain.sequence
    assert len(msa.query) == int(msa_row["length"])
    assert msa.deletion_matrix.shape == (msa.depth, len(chain.sequence))
    assert msa.deletion_matrix.dtype == np.int32
    assert all(len(s) == len(chain.sequence) for s in msa.sequences)
    assert len(msa.descriptions) == msa.depth
    assert set("".join(msa.sequences)) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ-")


@pytest.mark.parametrize(
    "relpath",
    ["msas/2crb_A/bfd_uniclust_hits.a3m", "msas/3zee_A/bfd_uniclust_hits.a3m", "msas/721p-assembly1_A/721p-assembly1A_protein.a3m"],
)
def test_a3m_matches_character_reference(relpath, samples):
    path = samples.dir / relpath
    msa = parse_a3m(path)
    sequences, deletions = _reference_a3m(path.read_text())
    assert msa.sequences == sequences
    np.testing.assert_array_equal(msa.deletion_matrix, np.array(deletions))
    assert msa.deletion_matrix.sum() > 0  # the file really has insertions


@pytest.mark.parametrize("relpath", ["msas/3u8v_A/uniref90_hits.sto", "msas/3u8v_A/mgnify_hits.sto", "msas/2crb_A/uniref90_hits.sto"])
def test_stockholm_matches_character_reference(relpath, samples):
    path = samples.dir / relpath
    msa = parse_stockholm(path)
    sequences, deletions = _reference_stockholm(path.read_text())
    assert msa.sequences == sequences
    np.testing.assert_array_equal(msa.deletion_matrix, np.array(deletions))
    assert msa.deletion_matrix.sum() > 0


def test_stockholm_descriptions_from_gs_lines(samples):
    msa = parse_stockholm(samples.dir / "msas/2q2k_A/mgnify_hits.sto")
    assert any("[subseq from]" in d for d in msa.descriptions[1:])


def test_fasta_alignment_equals_stockholm(tmp_path, samples):
    sto = samples.dir / "msas/3u8v_A/mgnify_hits.sto"
    rows: dict[str, str] = {}
    for line in sto.read_text().splitlines():
        if line.strip() and not line.startswith("#") and line.strip() != "//":
            name, seq = line.split()
            rows[name] = rows.get(name, "") + seq
    fasta = tmp_path / "mgnify.fasta"
    # wrapped at 60 columns, as FASTA writers do
    fasta.write_text("".join(f">{n}\n" + "\n".join(s[i:i + 60] for i in range(0, len(s), 60)) + "\n" for n, s in rows.items()))
    a, b = parse_fasta_alignment(fasta), parse_stockholm(sto)
    assert a.sequences == b.sequences
    np.testing.assert_array_equal(a.deletion_matrix, b.deletion_matrix)


def test_load_msas_merges_and_deduplicates(samples):
    chain = samples.chain_of("2crb", "A")
    files = find_msa_files(samples.dir / "msas/2crb_A")
    assert [f.name for f in files] == ["bfd_uniclust_hits.a3m", "mgnify_hits.sto", "uniref90_hits.sto"]
    merged = load_msas(files, chain.sequence)
    parts = [parse_msa(f) for f in files]
    expected, seen = [chain.sequence], {chain.sequence}
    for part in parts:
        for seq in part.sequences:
            if seq not in seen:
                seen.add(seq)
                expected.append(seq)
    assert merged.sequences == expected
    assert merged.depth < sum(p.depth for p in parts)  # duplicates existed and were removed
    assert merged.query == chain.sequence and not merged.deletion_matrix[0].any()
    # a kept row carries its own deletions: the first a3m hit is row 1 of both
    np.testing.assert_array_equal(merged.deletion_matrix[1], parts[0].deletion_matrix[1])


def test_load_msas_without_files_is_single_sequence():
    msa = load_msas([], "MKV")
    assert msa.sequences == ["MKV"] and msa.deletion_matrix.shape == (1, 3)
    single = single_sequence_msa("MKVLA")
    assert single.depth == 1 and single.deletion_matrix.dtype == np.int32 and not single.deletion_matrix.any()
    with pytest.raises(ValueError):
        MSA(sequences=["MKV", "MK"], deletion_matrix=np.zeros((2, 3), np.int32), descriptions=["a", "b"])


def test_all_shipped_msas_parse_fast(samples):
    start = time.perf_counter()
    total = sum(parse_msa(samples.dir / row["file"]).depth for row in samples.manifest_rows("msa"))
    elapsed = time.perf_counter() - start
    assert total == sum(int(row["msa_num_seqs"]) for row in samples.manifest_rows("msa"))
    assert elapsed < 5.0, f"parsing all MSAs took {elapsed:.1f} s"


def test_unknown_suffix_is_rejected(tmp_path):
    path = tmp_path / "hits.txt"
    path.write_text(">q\nMKV\n")
    with pytest.raises(ProtfoldInputError, match="unknown alignment format"):
        parse_msa(path)
