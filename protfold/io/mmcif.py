"""mmCIF reading: `_atom_site` into residue records, placed on the `_pdbx_poly_seq_scheme` /
`_entity_poly_seq` sequence, with checks for truncated files.

mmCIF is tokenised once with Biopython's `MMCIF2Dict`; the `_atom_site` table is then read here rather
than through `MMCIFParser`, because (a) `MMCIFParser` silently builds a shorter protein from a ragged,
truncated atom table, (b) it builds every NMR model although we keep the first, and (c) we need the
`label_*` columns it drops.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
from Bio.PDB.MMCIF2Dict import MMCIF2Dict

from protfold.errors import ProtfoldInputError
from protfold.io.residues import ProteinChain, _assign_positions, _build_chain, _Residue, _stem

logger = logging.getLogger(__name__)

_UNSET = {".", "?", ""}
_WATERS = {"HOH", "WAT", "DOD", "H2O"}


def parse_mmcif(path: Path, text: str) -> list[ProteinChain]:
    """Protein chains of an mmCIF text (first model); chains without observed atoms are left to the caller."""
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
    """The end of the file may end the last table (CIF needs no closing '#'), but not inside a row: a table
    running to the end of the file must end with a line break. A row cut between values is caught later,
    by its table's ragged columns (`_table`)."""
    if not text.lstrip().lower().startswith("data_"):
        raise ProtfoldInputError(path, "not an mmCIF file (does not start with data_)")
    if text.endswith(("\n", "\r")) or re.search(r"\n#\s*\Z", text):
        return
    last_loop, last_hash = text.rfind("\nloop_"), text.rfind("\n#")
    if last_loop > last_hash:
        raise ProtfoldInputError(path, "truncated mmCIF: the file ends inside a row of its last table (no line end)")


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
    comps, names = t["label_comp_id"], col("auth_atom_id", "label_atom_id")  # alt ids: occupancy decides
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
