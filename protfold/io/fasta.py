"""FASTA query files for `protfold predict`: records, their sequences, and ids that are safe file names.

A record's id is the first word of its header. Sequences are upper-cased; a trailing `*` (the stop codon of
translated sequences) is dropped; selenocysteine `U` and pyrrolysine `O` become their parents `C` and `K`,
as the structure parser does for modified residues; `X` stands for any residue. Other letters are refused.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from protfold import constants as rc
from protfold.errors import ProtfoldInputError

log = logging.getLogger(__name__)

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")
PARENT_LETTERS = {"U": "C", "O": "K"}  # selenocysteine -> cysteine, pyrrolysine -> lysine
MAX_ID_LENGTH = 200  # leaves room for "_confidence.json" within the usual 255-byte file-name limit
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_id(name: str) -> str:
    """`name` as a file name: characters other than letters, digits, '.', '_' and '-' become '_', leading dots
    are dropped (no hidden files, no '..'), and it is cut to MAX_ID_LENGTH. Empty if nothing is left."""
    return _UNSAFE.sub("_", name).lstrip(".")[:MAX_ID_LENGTH]


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """(id, sequence) records of a FASTA file; ProtfoldInputError naming the file for anything unusable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ProtfoldInputError(path, f"cannot read FASTA: {err}") from None
    records: list[tuple[str, list[str]]] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            words = line[1:].split()
            if not words:
                raise ProtfoldInputError(path, f"line {line_no}: FASTA header without a name")
            records.append((words[0], []))
        elif not records:
            raise ProtfoldInputError(path, f"line {line_no}: sequence before the first '>' header")
        else:
            records[-1][1].append(line.upper())
    if not records:
        raise ProtfoldInputError(path, "no FASTA records")
    return [(name, _clean_sequence(path, name, "".join(parts))) for name, parts in records]


def _clean_sequence(path: Path, name: str, seq: str) -> str:
    seq = seq.removesuffix("*")
    if not seq:
        raise ProtfoldInputError(path, f"record {name!r}: empty sequence")
    mapped = sorted(set(seq) & PARENT_LETTERS.keys())
    if mapped:
        log.info("%s: record %r: %s read as %s", path, name, ", ".join(mapped),
                 ", ".join(PARENT_LETTERS[c] for c in mapped))
        seq = seq.translate(str.maketrans(PARENT_LETTERS))
    bad = sorted(set(seq) - set(rc.restypes_with_x))
    if bad:
        where = " ('*' is allowed only at the end)" if "*" in bad else ""
        raise ProtfoldInputError(path, f"record {name!r}: letters {bad} are not amino acids{where}")
    return seq
