"""Multiple sequence alignments (a3m, Stockholm, aligned FASTA) as query-aligned rows plus deletion counts.

Dimension names: N = sequences (query first), L = query length.

Every parser returns an `MSA` whose rows are aligned to the query: upper-case, '-' for gaps, length L.
Residues a row has between two query columns (a3m lower-case letters, Stockholm/FASTA residues in columns
where the query has a gap) are dropped and counted in `deletion_matrix` at the next query column, as in
AF2. Parsing is vectorised over the whole file: one byte array, no per-row Python loops over characters.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protfold import constants as rc
from protfold.errors import ProtfoldInputError

logger = logging.getLogger(__name__)

MSA_SUFFIXES: dict[str, str] = {
    ".a3m": "a3m",
    ".sto": "stockholm",
    ".stockholm": "stockholm",
    ".fasta": "fasta",
    ".fa": "fasta",
    ".afa": "fasta",
}

_GAP, _DOT = ord("-"), ord(".")
_UPPER = np.zeros(256, dtype=bool)
_UPPER[ord("A") : ord("Z") + 1] = True
_LOWER = np.zeros(256, dtype=bool)
_LOWER[ord("a") : ord("z") + 1] = True
_LEGAL = _UPPER | _LOWER
_LEGAL[[_GAP, _DOT]] = True
_STANDARD = np.zeros(256, dtype=bool)
_STANDARD[[ord(c) for c in rc.restypes]] = True


@dataclass(kw_only=True)
class MSA:
    """Query-aligned alignment. sequences: N strings of length L (query first); deletion_matrix: int32 [N, L]."""

    sequences: list[str]
    deletion_matrix: np.ndarray
    descriptions: list[str]

    def __post_init__(self) -> None:
        n = len(self.sequences)
        if n == 0:
            raise ValueError("an MSA holds at least the query")
        length = len(self.sequences[0])
        if any(len(s) != length for s in self.sequences):
            raise ValueError("all MSA rows must have the query's length")
        if self.deletion_matrix.shape != (n, length) or len(self.descriptions) != n:
            raise ValueError(f"deletion_matrix {self.deletion_matrix.shape} / descriptions do not match ({n}, {length})")

    @property
    def depth(self) -> int:
        return len(self.sequences)

    @property
    def query(self) -> str:
        return self.sequences[0]


# ----------------------------------------------------------------------------------------------- public


def single_sequence_msa(query: str) -> MSA:
    """No-MSA mode: the query alone, no deletions."""
    return MSA(sequences=[query], deletion_matrix=np.zeros((1, len(query)), dtype=np.int32), descriptions=["query"])


def find_msa_files(directory: str | os.PathLike[str]) -> list[Path]:
    """a3m / Stockholm / aligned FASTA files directly inside `directory`, sorted by name ([] if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in MSA_SUFFIXES)


def parse_msa(path: str | os.PathLike[str]) -> MSA:
    """Parse one alignment file, the format taken from its suffix."""
    path = Path(path)
    fmt = MSA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ProtfoldInputError(path, f"unknown alignment format {path.suffix!r} (want {sorted(MSA_SUFFIXES)})")
    return {"a3m": parse_a3m, "stockholm": parse_stockholm, "fasta": parse_fasta_alignment}[fmt](path)


def parse_a3m(path: str | os.PathLike[str]) -> MSA:
    """a3m: upper-case letters and '-' are query columns, lower-case letters insertions, '.' ignored."""
    path = Path(path)
    descriptions, rows = _read_fasta_records(path)
    lengths = np.array([len(r) for r in rows])
    data = np.frombuffer(b"".join(rows), dtype=np.uint8)
    _check_legal(path, data, lengths, descriptions)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    aligned = _UPPER[data] | (data == _GAP)
    per_row = np.bincount(row_of[aligned], minlength=len(rows))
    query_length = per_row[0]
    bad = np.flatnonzero(per_row != query_length)
    if bad.size:
        i = int(bad[0])
        raise ProtfoldInputError(
            path, f"record {i + 1} ({descriptions[i][:40]!r}) has {per_row[i]} aligned columns, query has {query_length}"
        )
    # Insertions before each aligned column: lower-case letters since the previous aligned column of the row.
    inserted = np.cumsum(_LOWER[data])
    at_aligned = inserted[aligned].reshape(len(rows), query_length)
    row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    before_row = np.where(row_start > 0, inserted[np.maximum(row_start - 1, 0)], 0)
    previous = np.concatenate([before_row[:, None], at_aligned[:, :-1]], axis=1)
    deletions = at_aligned - previous
    # The aligned letter itself is never lower-case, so `inserted` at an aligned column counts only before it.
    letters = data[aligned].reshape(len(rows), query_length)
    return _make_msa(path, letters, deletions, descriptions)


def parse_stockholm(path: str | os.PathLike[str]) -> MSA:
    """Stockholm (jackhmmer): first sequence is the query; columns where the query has a gap are dropped."""
    path = Path(path)
    order: list[str] = []
    pieces: dict[str, list[bytes]] = {}
    described: dict[str, str] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ProtfoldInputError(path, f"cannot read file ({exc.strerror or exc})") from exc
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line == b"//":
            continue
        if line.startswith(b"#"):
            if line.startswith(b"#=GS"):
                parts = line.decode("utf-8", "replace").split(maxsplit=3)
                if len(parts) == 4 and parts[2] == "DE":
                    described[parts[1]] = f"{parts[1]} {parts[3]}"
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ProtfoldInputError(path, f"line {number}: expected '<name> <aligned sequence>'")
        name = parts[0].decode("utf-8", "replace")
        if name not in pieces:
            order.append(name)
            pieces[name] = []
        pieces[name].append(parts[1])
    if not order:
        raise ProtfoldInputError(path, "no sequences in Stockholm file")
    rows = [b"".join(pieces[name]) for name in order]
    return _from_full_width(path, rows, [described.get(n, n) for n in order])


def parse_fasta_alignment(path: str | os.PathLike[str]) -> MSA:
    """Aligned FASTA: all records of equal width, first is the query; query-gap columns become deletions."""
    path = Path(path)
    descriptions, rows = _read_fasta_records(path)
    return _from_full_width(path, rows, descriptions)


def load_msas(paths: list[str | os.PathLike[str]], query: str) -> MSA:
    """Merge alignment files for one chain: query first, then rows de-duplicated by aligned sequence
    (first occurrence kept, deletions included). Each file's query must equal `query` (see `check_query`)."""
    sequences, deletions, descriptions = [query], [np.zeros(len(query), dtype=np.int32)], ["query"]
    seen = {query}
    for path in paths:
        msa = parse_msa(path)
        check_query(path, msa.query, query)
        for seq, dele, desc in zip(msa.sequences[1:], msa.deletion_matrix[1:], msa.descriptions[1:]):
            if seq not in seen:
                seen.add(seq)
                sequences.append(seq)
                deletions.append(dele)
                descriptions.append(desc)
    logger.debug("merged %d files into %d unique rows", len(paths), len(sequences))
    return MSA(sequences=sequences, deletion_matrix=np.stack(deletions).astype(np.int32), descriptions=descriptions)


def check_query(path: str | os.PathLike[str], msa_query: str, sequence: str) -> None:
    """The alignment's query must be the chain sequence. Letters outside the 20 standard ones count as X on
    both sides, and an X in the chain sequence (unknown residue) matches any letter."""
    if len(msa_query) != len(sequence):
        raise ProtfoldInputError(
            path, f"MSA query length {len(msa_query)} differs from the chain sequence length {len(sequence)}"
        )
    a = _as_x(msa_query)
    b = _as_x(sequence)
    bad = np.flatnonzero((a != b) & (b != ord("X")))
    if bad.size:
        i = int(bad[0])
        raise ProtfoldInputError(
            path, f"MSA query differs from the chain sequence at {bad.size} positions (first: {i + 1}, "
            f"{msa_query[i]} vs {sequence[i]})"
        )


# ---------------------------------------------------------------------------------------------- helpers


def _as_x(sequence: str) -> np.ndarray:
    arr = np.frombuffer(sequence.upper().encode("ascii", "replace"), dtype=np.uint8).copy()
    arr[~_STANDARD[arr]] = ord("X")
    return arr


def _read_fasta_records(path: Path) -> tuple[list[str], list[bytes]]:
    """FASTA-like records (a3m, aligned FASTA): headers and sequences (line-wrapped sequences joined)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProtfoldInputError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not data.strip():
        raise ProtfoldInputError(path, "alignment file is empty")
    descriptions: list[str] = []
    chunks: list[list[bytes]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        if line.startswith(b">"):
            if chunks and not chunks[-1]:
                raise ProtfoldInputError(path, f"record {len(chunks)} ({descriptions[-1][:40]!r}) has no sequence")
            descriptions.append(line[1:].decode("utf-8", "replace").strip())
            chunks.append([])
        elif not chunks:
            raise ProtfoldInputError(path, f"line {number}: sequence before the first '>' header")
        else:
            chunks[-1].append(line)
    if chunks and not chunks[-1]:
        raise ProtfoldInputError(path, f"record {len(chunks)} ({descriptions[-1][:40]!r}) has no sequence")
    rows = [b"".join(c) for c in chunks]
    if not rows:
        raise ProtfoldInputError(path, "no '>' records")
    return descriptions, rows


def _check_legal(path: Path, data: np.ndarray, lengths: np.ndarray, descriptions: list[str]) -> None:
    illegal = np.flatnonzero(~_LEGAL[data])
    if illegal.size:
        pos = int(illegal[0])
        record = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise ProtfoldInputError(
            path, f"record {record + 1} ({descriptions[record][:40]!r}) has illegal character {chr(data[pos])!r}"
        )


def _from_full_width(path: Path, rows: list[bytes], descriptions: list[str]) -> MSA:
    """Rows of equal width (Stockholm, aligned FASTA) -> query-aligned MSA, AF2-style deletion counts."""
    lengths = np.array([len(r) for r in rows])
    bad = np.flatnonzero(lengths != lengths[0])
    if bad.size:
        i = int(bad[0])
        raise ProtfoldInputError(path, f"record {i + 1} ({descriptions[i][:40]!r}) has width {lengths[i]}, query {lengths[0]}")
    data = np.frombuffer(b"".join(rows), dtype=np.uint8)
    _check_legal(path, data, lengths, descriptions)
    grid = data.reshape(len(rows), lengths[0])
    is_gap = (grid == _GAP) | (grid == _DOT)
    keep = ~is_gap[0]
    if not keep.any():
        raise ProtfoldInputError(path, "the query (first sequence) has no residues")
    # Residues in dropped columns, counted at the next kept column.
    dropped_residues = np.cumsum(~is_gap & ~keep[None, :], axis=1)
    at_kept = dropped_residues[:, keep]
    deletions = np.diff(at_kept, axis=1, prepend=0)
    letters = np.where(is_gap[:, keep], _GAP, grid[:, keep])
    letters = np.where(_LOWER[letters], letters - 32, letters)
    return _make_msa(path, letters, deletions, descriptions)


def _make_msa(path: Path, letters: np.ndarray, deletions: np.ndarray, descriptions: list[str]) -> MSA:
    """letters: uint8 [N, L] upper-case or '-'; deletions [N, L]."""
    if letters.shape[1] == 0:
        raise ProtfoldInputError(path, "the query has no aligned residues")
    if (letters[0] == _GAP).any():
        raise ProtfoldInputError(path, "the query (first record) has gaps in its own alignment")
    width = letters.shape[1]
    blob = np.ascontiguousarray(letters, dtype=np.uint8).tobytes().decode("ascii")
    sequences = [blob[i * width : (i + 1) * width] for i in range(letters.shape[0])]
    return MSA(sequences=sequences, deletion_matrix=deletions.astype(np.int32), descriptions=descriptions)
