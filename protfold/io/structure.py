"""Protein chains from mmCIF and PDB files (also gzipped, `.ent`), as atom37 arrays.

Dimension names: L = residues of the full (SEQRES / entity) sequence, 37 = atom37 slots.

mmCIF is tokenised once with Biopython's `MMCIF2Dict`; the `_atom_site` table is then read here rather
than through `MMCIFParser`, because (a) `MMCIFParser` silently builds a shorter protein from a ragged,
truncated atom table, (b) it builds every NMR model although we keep the first, and (c) we need the
`label_*` columns it drops. PDB files go through Biopython's `PDBParser`; their SEQRES and header records
are read from the text. Both paths end in the same residue records and the same atom37 builder.

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
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from Bio import BiopythonWarning
from Bio.Align import PairwiseAligner
from Bio.Data.PDBData import protein_letters_3to1_extended
from Bio.PDB import PDBParser
from Bio.PDB.MMCIF2Dict import MMCIF2Dict

from protfold import constants as rc
from protfold.errors import ProtfoldInputError

logger = logging.getLogger(__name__)

_MMCIF_SUFFIXES = {".cif", ".mmcif"}
_PDB_SUFFIXES = {".pdb", ".ent"}
_UNSET = {".", "?", ""}
_X_ATOMS = ("N", "CA", "C", "O")
_ATOM_RENAMES = {("MSE", "SE"): "SD"}
_WATERS = {"HOH", "WAT", "DOD", "H2O"}


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiopythonWarning)
        try:
            chains = _parse_mmcif(path, text) if kind == "mmcif" else _parse_pdb(path, text)
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


# ------------------------------------------------------------------------------------------------ mmCIF


def _parse_mmcif(path: Path, text: str) -> list[ProteinChain]:
    _check_mmcif_complete(path, text)
    d = MMCIF2Dict(io.StringIO(text))
    atoms = _table(path, d, "_atom_site.")
    if atoms is None or not atoms.get("Cartn_x"):
        raise ProtfoldInputError(path, "no _atom_site records (no atoms)")
    for col in ("Cartn_x", "Cartn_y", "Cartn_z", "label_comp_id", "label_atom_id"):
        if col not in atoms:
            raise ProtfoldInputError(path, f"_atom_site table has no {col} column")
    header = {
        "pdb_id": (_first(d, "_entry.id") or _stem(path)).lower(),
        "method": ", ".join(v for v in d.get("_exptl.method", []) if v not in _UNSET) or "UNKNOWN",
        "resolution": _mmcif_resolution(d),
        "source": str(path),
    }
    poly_types = dict(zip(d.get("_entity_poly.entity_id", []), (t.lower() for t in d.get("_entity_poly.type", []))))
    scheme = _table(path, d, "_pdbx_poly_seq_scheme.")
    entity_seq = _table(path, d, "_entity_poly_seq.")
    chains = []
    for chain_id, residues in _mmcif_residues(path, atoms).items():
        entities = {r.entity for r in residues if r.entity in poly_types}
        if entities and not any("polypeptide" in poly_types[e] for e in entities):
            continue  # nucleic acid or other non-protein polymer
        residues = [r for r in residues if r.letter is not None]
        protein_entities = {r.entity for r in residues if "polypeptide" in poly_types.get(r.entity, "")}
        if not residues:
            continue
        seq_names = _place_mmcif(path, chain_id, residues, protein_entities, scheme, entity_seq)
        if seq_names is None:  # no sequence records: the observed residues are the sequence
            logger.info("%s chain %s: no sequence records, using the observed residues", path, chain_id)
            seq_names = [r.choose()[0] for r in residues]
            for i, r in enumerate(residues):
                r.position = i
        placed = [r for r in residues if r.position is not None]
        chains.append(_build_chain(chain_id=chain_id, seq_names=seq_names, residues=placed, **header))
    return chains


def _mmcif_resolution(d: dict) -> float | None:
    for key in ("_refine.ls_d_res_high", "_reflns.d_resolution_high", "_em_3d_reconstruction.resolution"):
        value = _first(d, key)
        if value is not None:
            try:
                return float(value)
            except ValueError:
                continue
    return None


def _check_mmcif_complete(path: Path, text: str) -> None:
    """A file cut after a whole atom row parses as a shorter protein. wwPDB files (and our writer) close
    every table with a '#' line, so an `_atom_site` loop running to the end of the file means truncation."""
    if not text.lstrip().lower().startswith("data_"):
        raise ProtfoldInputError(path, "not an mmCIF file (does not start with data_)")
    last_tag = text.rfind("\n_")
    if last_tag >= 0 and text.startswith("_atom_site.", last_tag + 1) and not re.search(r"\n#\s*\Z", text):
        raise ProtfoldInputError(path, "truncated mmCIF: the _atom_site table is not closed by '#' at end of file")


def _table(path: Path, d: dict, prefix: str) -> dict[str, list[str]] | None:
    """Columns of one mmCIF category (prefix stripped); raises if the rows are ragged (a cut loop)."""
    cols = {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
    if not cols:
        return None
    lengths = {len(v) for v in cols.values()}
    if len(lengths) != 1:
        raise ProtfoldInputError(
            path, f"{prefix.rstrip('.')} table is incomplete (columns hold {sorted(lengths)} values): truncated file?"
        )
    return cols


def _first(d: dict, key: str) -> str | None:
    values = d.get(key)
    if not values or values[0] in _UNSET:
        return None
    return values[0]


def _mmcif_residues(path: Path, t: dict[str, list[str]]) -> dict[str, list[_Residue]]:
    """First-model, non-water atoms of `_atom_site`, grouped into residues per author chain (file order)."""
    n = len(t["Cartn_x"])

    def col(*names: str) -> list[str]:
        for name in names:
            if name in t:
                return t[name]
        return ["?"] * n

    models, chains = col("pdbx_PDB_model_num"), col("auth_asym_id", "label_asym_id")
    nums, icodes = col("auth_seq_id", "label_seq_id"), col("pdbx_PDB_ins_code")
    comps, names, alts = t["label_comp_id"], col("auth_atom_id", "label_atom_id"), col("label_alt_id")
    label_seqs, entities, asyms = col("label_seq_id"), col("label_entity_id"), col("label_asym_id")
    try:
        xyz = np.array([t["Cartn_x"], t["Cartn_y"], t["Cartn_z"]], dtype=np.float64).T
        occ = np.array([1.0 if v in _UNSET else float(v) for v in col("occupancy")])
        bfac = np.array([0.0 if v in _UNSET else float(v) for v in col("B_iso_or_equiv")])
    except ValueError as exc:
        raise ProtfoldInputError(path, f"non-numeric coordinate, occupancy or B-factor ({exc})") from None
    grouped: dict[str, dict[tuple[int, str], _Residue]] = {}
    for i in range(n):
        if models[i] != models[0] or comps[i].upper() in _WATERS:
            continue
        try:
            number = int(nums[i])
        except ValueError:
            raise ProtfoldInputError(path, f"bad residue number {nums[i]!r} in _atom_site row {i + 1}") from None
        icode = "" if icodes[i] in _UNSET else icodes[i]
        key = (number, icode)
        residue = grouped.setdefault(chains[i], {}).get(key)
        if residue is None:
            label_seq = int(label_seqs[i]) if label_seqs[i].lstrip("-").isdigit() else None
            residue = _Residue(
                number=number, icode=icode, candidates={}, label_seq=label_seq, entity=entities[i], asym=asyms[i]
            )
            grouped[chains[i]][key] = residue
        atoms = residue.candidates.setdefault(comps[i].upper(), {})
        name = names[i].strip('"')
        if name not in atoms or occ[i] > atoms[name][2]:  # alternate locations: highest occupancy wins
            atoms[name] = (xyz[i], float(bfac[i]), float(occ[i]))
    return {chain: list(res.values()) for chain, res in grouped.items()}


def _place_mmcif(
    path: Path,
    chain_id: str,
    residues: list[_Residue],
    entities: set[str | None],
    scheme: dict[str, list[str]] | None,
    entity_seq: dict[str, list[str]] | None,
) -> list[str] | None:
    """Full sequence (residue names) of a chain and each residue's position in it; None without records.

    `_pdbx_poly_seq_scheme` maps seq_id to the author number + insertion code used in `_atom_site`;
    without it, `_entity_poly_seq` with `label_seq_id` is used.
    """
    if scheme is not None and {"seq_id", "mon_id"} <= scheme.keys():
        n = len(scheme["seq_id"])
        strand, asym = scheme.get("pdb_strand_id"), scheme.get("asym_id")
        if strand is not None:
            rows = [i for i in range(n) if strand[i] == chain_id]
        else:  # e.g. 721p-assembly1: no strand column, select by the label asym ids of the chain's residues
            asyms = {r.asym for r in residues}
            rows = [i for i in range(n) if asym is not None and asym[i] in asyms]
        if rows:
            names, by_seq_id, by_auth = [], {}, {}
            nums = scheme.get("pdb_seq_num") or scheme.get("auth_seq_num")
            icodes = scheme.get("pdb_ins_code")
            for i in rows:
                seq_id = scheme["seq_id"][i]
                if seq_id not in by_seq_id:  # microheterogeneity: the first listed residue defines the sequence
                    by_seq_id[seq_id] = len(names)
                    names.append(scheme["mon_id"][i].upper())
                if nums is not None and nums[i] not in _UNSET:
                    icode = "" if icodes is None or icodes[i] in _UNSET else icodes[i]
                    by_auth[(int(nums[i]), icode)] = by_seq_id[seq_id]
            if by_auth:
                positions = [by_auth.get((r.number, r.icode)) for r in residues]
            else:
                positions = [by_seq_id.get(str(r.label_seq)) for r in residues]
            _assign_positions(path, chain_id, residues, positions, names)
            return names
    if entity_seq is not None and len(entities) == 1 and {"entity_id", "num", "mon_id"} <= entity_seq.keys():
        (entity,) = entities
        rows = [i for i, e in enumerate(entity_seq["entity_id"]) if e == entity]
        by_num: dict[int, int] = {}
        names = []
        for i in rows:
            num = int(entity_seq["num"][i])
            if num not in by_num:
                by_num[num] = len(names)
                names.append(entity_seq["mon_id"][i].upper())
        _assign_positions(path, chain_id, residues, [by_num.get(r.label_seq) for r in residues], names)
        return names
    return None


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


# ----------------------------------------------------------------------------------------------- PDB


def _parse_pdb(path: Path, text: str) -> list[ProteinChain]:
    lines = text.splitlines()
    if not any(line.startswith(("ATOM  ", "HETATM")) for line in lines):
        raise ProtfoldInputError(path, "no ATOM/HETATM records (not a PDB file, or no atoms)")
    header = {"pdb_id": _stem(path), "method": "UNKNOWN", "resolution": None, "source": str(path)}
    seqres: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("HEADER") and line[62:66].strip():
            header["pdb_id"] = line[62:66].strip().lower()
        elif line.startswith("EXPDTA"):
            header["method"] = line[10:].strip().rstrip(";").replace(";", ",") or "UNKNOWN"
        elif line.startswith("REMARK   2 RESOLUTION."):
            match = re.search(r"RESOLUTION\.\s+([0-9.]+)\s+ANGSTROM", line)
            header["resolution"] = float(match.group(1)) if match else None
        elif line.startswith("SEQRES"):
            seqres.setdefault(line[11].strip(), []).extend(line[19:].split())
    structure = PDBParser(QUIET=True).get_structure(header["pdb_id"], io.StringIO(text))
    models = list(structure)
    if not models:
        raise ProtfoldInputError(path, "no model with atoms")
    chains = []
    for chain in models[0]:
        residues = _pdb_chain_residues(chain)
        if not residues:
            continue
        names = seqres.get(chain.id)
        if names is not None and sum(residue_letter(n) is not None for n in names) * 2 < len(names):
            continue  # nucleic acid chain (DNA/RNA SEQRES)
        if names is None:
            logger.info("%s chain %s: no SEQRES, using the observed residues", path, chain.id)
            names = [r.choose()[0] for r in residues]
            positions: list[int | None] = list(range(len(residues)))
        else:
            positions = _align_seqres(path, chain.id, names, residues)
        _assign_positions(path, chain.id, residues, positions, names)
        placed = [r for r in residues if r.position is not None]
        chains.append(_build_chain(chain_id=chain.id, seq_names=names, residues=placed, **header))
    return chains


def _pdb_chain_residues(chain) -> list[_Residue]:  # noqa: ANN001 (Bio.PDB.Chain)
    """Amino-acid residues of a Biopython chain, alternate locations resolved by occupancy."""
    residues = []
    for residue in chain:
        if residue.id[0] == "W":
            continue
        members = [residue.child_dict[n] for n in residue.disordered_get_id_list()] if residue.is_disordered() == 2 else [residue]
        candidates: dict[str, _Atoms] = {}
        for member in members:
            atoms: _Atoms = {}
            for atom in member:
                variants = atom.disordered_get_list() if atom.is_disordered() else [atom]
                best = max(variants, key=lambda a: a.get_occupancy() or 0.0)  # first on ties
                atoms[atom.get_id()] = (best.coord.astype(np.float64), float(best.get_bfactor()), float(best.get_occupancy() or 0.0))
            candidates[member.get_resname().upper()] = atoms
        r = _Residue(number=residue.id[1], icode=residue.id[2].strip(), candidates=candidates)
        if r.letter is not None:
            residues.append(r)
    return residues


def _align_seqres(path: Path, chain_id: str, names: list[str], residues: list[_Residue]) -> list[int | None]:
    """Position of each observed residue in SEQRES.

    First try a constant offset between author numbering and SEQRES index (the usual case, exact and
    unambiguous); otherwise a global alignment, end gaps free, gaps in the observed residues cheap and
    gaps in SEQRES prohibitive, verified afterwards (>= 90% identity on aligned pairs).
    """
    full = "".join(residue_letter(n) or "X" for n in names)
    obs = "".join(r.letter or "X" for r in residues)
    numbers = np.array([r.number for r in residues])
    if all(not r.icode for r in residues) and np.all(np.diff(numbers) > 0):
        full_arr, obs_arr = np.frombuffer(full.encode(), np.uint8), np.frombuffer(obs.encode(), np.uint8)
        for start in _offset_candidates(numbers, len(full)):
            idx = numbers - start
            if np.array_equal(full_arr[idx], obs_arr):
                return [int(i) for i in idx]
    logger.info("%s chain %s: numbering does not match SEQRES by an offset; aligning", path, chain_id)
    positions = _place_segments(full, obs, residues)
    if _identity(full, obs, positions) < 0.9:
        positions = _pairwise_align(full, obs)
    identity = _identity(full, obs, positions)
    if identity < 0.9:
        raise ProtfoldInputError(path, f"chain {chain_id}: SEQRES does not match the observed residues ({identity:.0%} identity)")
    return [p if p is not None and full[p] == obs[q] else None for q, p in enumerate(positions)]


def _identity(full: str, obs: str, positions: list[int | None]) -> float:
    """Matching observed residues over all observed residues."""
    return sum(p is not None and full[p] == obs[q] for q, p in enumerate(positions)) / max(len(obs), 1)


def _place_segments(full: str, obs: str, residues: list[_Residue]) -> list[int | None]:
    """Alignment that respects numbering: runs of consecutively numbered residues are placed unbroken, in
    order and without overlap, maximising identity; among equal placements the one whose gap equals the
    numbering jump wins. Dynamic programme over (segment, start), O(segments x L x segment length)."""
    cuts = [0] + [
        q for q in range(1, len(residues))
        if not (residues[q].number - residues[q - 1].number == 1 or residues[q].icode or residues[q - 1].icode)
    ] + [len(residues)]
    segments = list(zip(cuts[:-1], cuts[1:]))
    target = np.frombuffer(full.encode(), np.uint8)
    query = np.frombuffer(obs.encode(), np.uint8)
    bonus = 0.5 / len(segments)  # tie-break only: all bonuses together are worth less than one match
    totals, backs = [], []
    for k, (s, e) in enumerate(segments):
        if e - s > len(target):
            return [None] * len(residues)
        score = (np.lib.stride_tricks.sliding_window_view(target, e - s) == query[s:e]).sum(axis=1).astype(float)
        back = np.full(score.shape, -1)
        if k > 0:
            prev, prev_len = totals[-1], segments[k - 1][1] - segments[k - 1][0]
            jump = residues[s].number - residues[s - 1].number - 1
            best_idx = np.maximum.accumulate(np.where(prev == np.maximum.accumulate(prev), np.arange(prev.size), 0))
            score_new = np.full(score.shape, -np.inf)
            for p in range(score.size):
                last = p - prev_len  # latest start of the previous segment
                if last < 0:
                    continue
                cand, arg = prev[best_idx[min(last, prev.size - 1)]], best_idx[min(last, prev.size - 1)]
                exact = last - jump
                if 0 <= exact <= min(last, prev.size - 1) and prev[exact] + bonus > cand:
                    cand, arg = prev[exact] + bonus, exact
                score_new[p], back[p] = score[p] + cand, arg
            score = score_new
        totals.append(score)
        backs.append(back)
    positions: list[int | None] = [None] * len(residues)
    start = int(np.argmax(totals[-1]))
    if not np.isfinite(totals[-1][start]):
        return positions
    for k in range(len(segments) - 1, -1, -1):
        s, e = segments[k]
        positions[s:e] = range(start, start + e - s)
        start = int(backs[k][start])
    return positions


def _pairwise_align(full: str, obs: str) -> list[int | None]:
    """Global alignment, end gaps free; gaps in the observed residues cheap, gaps in SEQRES prohibitive."""
    aligner = PairwiseAligner(mode="global", match_score=1.0, mismatch_score=-1.0)
    aligner.target_gap_score = -100.0  # an observed residue absent from SEQRES
    aligner.query_internal_open_gap_score, aligner.query_internal_extend_gap_score = -3.0, -0.01
    aligner.query_end_gap_score = 0.0
    alignment = aligner.align(full, obs)[0]
    positions: list[int | None] = [None] * len(obs)
    for (t0, t1), (q0, _) in zip(*alignment.aligned):
        positions[q0 : q0 + t1 - t0] = range(t0, t1)
    return positions


def _offset_candidates(numbers: np.ndarray, length: int) -> list[int]:
    """Offsets `start` with SEQRES index = number - start inside the sequence; SEQRES-numbering from 1 first."""
    lo, hi = int(numbers[-1]) - length + 1, int(numbers[0])
    return sorted(range(lo, hi + 1), key=lambda s: abs(s - 1))


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
