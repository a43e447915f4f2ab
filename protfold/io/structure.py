"""Protein chains from mmCIF and PDB files (also gzipped, `.ent`), as atom37 arrays.

Dimension names: L = residues of the full (SEQRES / entity) sequence, 37 = atom37 slots.

This module holds the public entry points and file reading. The formats are read in `protfold.io.mmcif`
(MMCIF2Dict, sequence records, truncation checks) and `protfold.io.pdb` (PDBParser, SEQRES alignment);
both end in the residue records, placement checks and atom37 builder of `protfold.io.residues`, which also
holds the `ProteinChain` record (re-exported here).

Choices (see also `ProteinChain.observed`):
- first model only; alternate locations: per atom the highest occupancy (first on ties); residue-level
  microheterogeneity: the residue name matching the sequence record, else the highest occupancy;
- modified residues become their parent (Biopython's extended 3->1 table), MSE's SE is stored as SD;
  atoms a parent residue does not have (hydrogens, OXT, phosphates, ...) are dropped; X residues keep
  backbone N, CA, C, O only;
- waters, ligands and non-protein polymers are ignored; a chain with no observed protein atom is no chain.
"""
from __future__ import annotations

import gzip
import logging
import os
import warnings
from pathlib import Path

from Bio import BiopythonWarning

from protfold.errors import ProtfoldInputError
from protfold.io.mmcif import parse_mmcif
from protfold.io.pdb import parse_pdb
from protfold.io.residues import ProteinChain, residue_letter

__all__ = ["ProteinChain", "list_protein_chains", "parse_structure", "residue_letter"]

logger = logging.getLogger(__name__)

_MMCIF_SUFFIXES = {".cif", ".mmcif"}
_PDB_SUFFIXES = {".pdb", ".ent"}


# ------------------------------------------------------------------------------------------- public API


def parse_structure(path: str | os.PathLike[str], chain_id: str | None = None) -> list[ProteinChain]:
    """All protein chains of an mmCIF/PDB file (first model), or only `chain_id` (author chain id).

    Raises ProtfoldInputError for unreadable or truncated files, files without a protein chain, and an
    unknown `chain_id` (the message lists the protein chains present).
    """
    path = Path(path)
    text, kind = _read_text(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiopythonWarning)
        try:
            chains = parse_mmcif(path, text) if kind == "mmcif" else parse_pdb(path, text)
        except ProtfoldInputError:
            raise
        except Exception as exc:  # whatever Biopython or a malformed record throws deep inside
            raise ProtfoldInputError(path, f"cannot parse {kind} file ({type(exc).__name__}: {exc})") from exc
    chains = [c for c in chains if c.observed.any()]
    if not chains:
        raise ProtfoldInputError(path, "no protein chain with observed atoms in the first model")
    if chain_id is None:
        return chains
    selected = [c for c in chains if c.chain_id == chain_id]
    if not selected:
        available = ", ".join(c.chain_id for c in chains)
        raise ProtfoldInputError(path, f"chain {chain_id!r} not found; protein chains: {available}")
    return selected


def list_protein_chains(path: str | os.PathLike[str]) -> list[str]:
    """Author ids of the protein chains that `parse_structure` returns, in file order."""
    return [c.chain_id for c in parse_structure(path)]


# ------------------------------------------------------------------------------------------- file level


def _read_text(path: Path) -> tuple[str, str]:
    """Raw file -> (text, "mmcif" | "pdb"); gzip is recognised by its magic bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProtfoldInputError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ProtfoldInputError(path, "file is empty")
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ProtfoldInputError(path, f"corrupt or truncated gzip data ({exc})") from exc
    if b"\x00" in data:
        raise ProtfoldInputError(path, "binary data (NUL bytes), not an mmCIF or PDB text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtfoldInputError(path, "binary data (not UTF-8 text), not an mmCIF or PDB file") from None
    if not text.strip():
        raise ProtfoldInputError(path, "file is empty (only whitespace)")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _MMCIF_SUFFIXES:
        return text, "mmcif"
    if suffix in _PDB_SUFFIXES:
        return text, "pdb"
    return text, ("mmcif" if text.lstrip()[:5].lower() == "data_" else "pdb")
