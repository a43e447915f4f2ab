"""Residue records shared by the mmCIF and PDB readers: `ProteinChain`, observed residues, their placement
in the full sequence and the atom37 builder (modified residues become their parent, MSE's SE is stored as SD;
atoms a parent residue lacks are dropped; X residues keep backbone N, CA, C, O only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from Bio.Data.PDBData import protein_letters_3to1_extended

from protfold import constants as rc
from protfold.errors import ProtfoldInputError

logger = logging.getLogger(__name__)

_X_ATOMS = ("N", "CA", "C", "O")
_ATOM_RENAMES = {("MSE", "SE"): "SD"}
_RARE_PARENTS = {"SEC": "C", "PYL": "K"}  # the 21st and 22nd amino acids, which Biopython's table leaves out

def residue_letter(resname: str) -> str | None:
    """Three-letter (or modified) residue name -> one-letter parent, 'X' for UNK; None if not an amino acid."""
    resname = resname.strip().upper()
    if resname == "UNK":
        return "X"
    if resname in _RARE_PARENTS:
        return _RARE_PARENTS[resname]
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
