"""Protein chains from mmCIF and PDB files (also gzipped, `.ent`), as atom37 arrays.

Dimension names: L = residues of the full (SEQRES / entity) sequence, 37 = atom37 slots.

This module holds the `ProteinChain` record, the public entry points and what both formats share: file
reading, residue records, placement checks and the atom37 builder. The formats are read in
`protfold.io.mmcif` (MMCIF2Dict, sequence records, truncation checks) and `protfold.io.pdb` (PDBParser,
SEQRES alignment); both end in the same residue records and the same atom37 builder.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from Bio import BiopythonWarning
from Bio.Data.PDBData import protein_letters_3to1_extended

from protfold import constants as rc
from protfold.errors import ProtfoldInputError

logger = logging.getLogger(__name__)

_MMCIF_SUFFIXES = {".cif", ".mmcif"}
_PDB_SUFFIXES = {".pdb", ".ent"}
_X_ATOMS = ("N", "CA", "C", "O")
_ATOM_RENAMES = {("MSE", "SE"): "SD"}


def residue_letter(resname: str) -> str | None:
    """Three-letter (or modified) residue name -> one-letter parent, 'X' for UNK; None if not an amino acid."""
    resname = resname.strip().upper()
    if resname == "UNK":
        return "X"
    letter = protein_letters_3to1_extended.get(resname)
    if letter is None or len(letter) != 1:
        return None
    return letter if letter in rc.restype_order else "X"


@dataclass(kw_only=True)
class ProteinChain:
    """One protein chain of an experimental structure; arrays indexed by the full sequence (L)."""

    id: str  # "<pdb id>_<chain>"
    pdb_id: str
    chain_id: str  # author chain id
    sequence: str  # full sequence, one-letter, X for unknown
    aatype: np.ndarray  # int64 [L]
    atom_positions: np.ndarray  # float32 [L, 37, 3], zeros where unobserved
    atom_mask: np.ndarray  # float32 [L, 37]
    residue_index: np.ndarray  # int64 [L], 0..L-1
    b_factors: np.ndarray  # float32 [L, 37]
    resolution: float | None  # Angstrom; None for NMR / unknown
    method: str
    source: str
    author_numbering: list[str] = field(default_factory=list)  # "<num><icode>" per position, "" if unobserved

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def observed(self) -> np.ndarray:
        """bool [L]: residues with at least one kept atom (any atom37 slot, not only CA).

        This is the definition that reproduces MANIFEST.tsv's `observed_residues` (e.g. the 2xhe residue
        without backbone atoms counts as observed).
        """
        return self.atom_mask.any(axis=-1)


_Atoms = dict[str, tuple[np.ndarray, float, float]]  # atom name -> (xyz [3], B-factor, occupancy)


@dataclass
class _Residue:
    """One observed residue: author number and insertion code, atoms per residue name (microheterogeneity)."""

    number: int
    icode: str
    candidates: dict[str, _Atoms]
    label_seq: int | None = None
    entity: str | None = None
    asym: str | None = None
    position: int | None = None  # index into the full sequence, set once placed

    def choose(self, preferred: str | None = None) -> tuple[str, _Atoms]:
        """The residue name matching the sequence record if present, else the one of highest mean occupancy."""
        if preferred is not None and preferred in self.candidates:
            return preferred, self.candidates[preferred]

        def mean_occ(item: tuple[str, _Atoms]) -> float:
            return float(np.mean([a[2] for a in item[1].values()])) if item[1] else 0.0
        return max(self.candidates.items(), key=mean_occ)

    @property
    def letter(self) -> str | None:
        return residue_letter(self.choose()[0])


# ------------------------------------------------------------------------------------------- public API


def parse_structure(path: str | os.PathLike[str], chain_id: str | None = None) -> list[ProteinChain]:
    """All protein chains of an mmCIF/PDB file (first model), or only `chain_id` (author chain id).

    Raises ProtfoldInputError for unreadable or truncated files, files without a protein chain, and an
    unknown `chain_id` (the message lists the protein chains present).
    """
    path = Path(path)
    text, kind = _read_text(path)
    # The format readers build on the records and helpers of this module: imported here, not at the top,
    # so that loading the modules involves no import cycle.
    from protfold.io.mmcif import parse_mmcif
    from protfold.io.pdb import parse_pdb

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


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".cif", ".mmcif", ".pdb", ".ent"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.lower()


# ------------------------------------------------------------------------------------------- placement


def _assign_positions(
    path: Path, chain_id: str, residues: list[_Residue], positions: list[int | None], names: list[str]
) -> None:
    """Set residue positions; verify one residue per position and matching residue types."""
    taken: set[int] = set()
    for r, pos in zip(residues, positions):
        if pos is None:
            logger.debug("%s chain %s: residue %d%s not in the sequence records, ignored", path, chain_id, r.number, r.icode)
            continue
        if pos in taken:
            raise ProtfoldInputError(path, f"chain {chain_id}: two observed residues at sequence position {pos + 1}")
        if names[pos] not in r.candidates and residue_letter(names[pos]) != r.letter:
            raise ProtfoldInputError(
                path, f"chain {chain_id}: residue {r.number}{r.icode} {r.choose()[0]} does not match sequence record {names[pos]}"
            )
        taken.add(pos)
        r.position = pos


# ----------------------------------------------------------------------------------------------- atom37


def _build_chain(
    *,
    pdb_id: str,
    chain_id: str,
    seq_names: list[str],
    residues: list[_Residue],
    resolution: float | None,
    method: str,
    source: str,
) -> ProteinChain:
    """Atom37 arrays over the full sequence from the placed residues."""
    sequence = "".join(residue_letter(n) or "X" for n in seq_names)
    length = len(sequence)
    aatype = rc.sequence_to_aatype(sequence)
    positions = np.zeros((length, rc.atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((length, rc.atom_type_num), dtype=np.float32)
    b_factors = np.zeros((length, rc.atom_type_num), dtype=np.float32)
    numbering = [""] * length
    for r in residues:
        pos = r.position
        resname, atoms = r.choose(seq_names[pos])
        aa = aatype[pos]
        allowed = rc.restype_atom37_mask[aa] > 0 if aa < rc.restype_num else np.isin(rc.atom_types, _X_ATOMS)
        for name, (xyz, bfac, _) in atoms.items():
            name = _ATOM_RENAMES.get((resname, name), name)
            slot = rc.atom_order.get(name)
            if slot is None or not allowed[slot]:
                continue
            positions[pos, slot] = xyz
            mask[pos, slot] = 1.0
            b_factors[pos, slot] = bfac
        numbering[pos] = f"{r.number}{r.icode}"
    return ProteinChain(
        id=f"{pdb_id}_{chain_id}",
        pdb_id=pdb_id,
        chain_id=chain_id,
        sequence=sequence,
        aatype=aatype,
        atom_positions=positions,
        atom_mask=mask,
        residue_index=np.arange(length, dtype=np.int64),
        b_factors=b_factors,
        resolution=resolution,
        method=method,
        source=source,
        author_numbering=numbering,
    )
