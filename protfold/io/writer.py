"""Write atom37 chains as PDB or mmCIF, with per-atom B-factors (predictions put pLDDT x 100 there).

Dimension names: L = residues, 37 = atom37 slots.

A "chain-like" is anything with `aatype` [L] and `atom_positions` [L, 37, 3] and `atom_mask` [L, 37]
(numpy arrays or CPU/GPU tensors); optional: `residue_index` [L] (0-based; written as number + 1),
`b_factors` [L, 37], `chain_id`, `sequence`, `pdb_id`/`id`, `method`, `resolution`. `ProteinChain` is one.
Only residues with at least one atom are written as atoms; the full sequence goes into SEQRES /
`_entity_poly_seq` so a parser recovers unobserved residues. Files are written to a temporary file in the
same directory and moved into place with `os.replace`, so readers never see half a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protfold import constants as rc
from protfold.io.atomic import write_text_atomic

_MAX_PDB_COORD = 9999.999
_MIN_PDB_COORD = -999.999
PDB_MAX_ATOMS = 99_999  # the atom serial field has 5 columns
PDB_MAX_RESIDUE_NUMBER = 9_999  # the residue number field has 4 columns


class PDBFormatLimitError(ValueError):
    """A structure the PDB format cannot hold (too many atoms, residue numbers past 9,999, long chain ids,
    coordinates beyond its columns); the message is one line and names the limit. mmCIF holds all of these."""


@dataclass(frozen=True, kw_only=True)
class _Chain:
    chain_id: str
    sequence: str
    aatype: np.ndarray  # int64 [L]
    positions: np.ndarray  # float [L, 37, 3]
    mask: np.ndarray  # bool [L, 37]
    numbers: np.ndarray  # int64 [L], author numbers written to the file
    b_factors: np.ndarray  # float [L, 37]


def to_pdb(
    chain_like: Any | Sequence[Any],
    path: str | os.PathLike[str],
    b_factors: Any | None = None,
) -> Path:
    """Write one chain-like (or a list of them) as PDB. b_factors: [L] or [L, 37], overrides the chain's."""
    chains, first = _normalise(chain_like, b_factors)
    _check_pdb_limits(chains, path)
    lines = []
    pdb_id = str(getattr(first, "pdb_id", "") or "")
    if len(pdb_id) == 4:
        lines.append(f"HEADER    {'':<40}{'':9}   {pdb_id.upper():4}")
    method = getattr(first, "method", None)
    if method:
        lines.append(f"EXPDTA    {method}")
    resolution = getattr(first, "resolution", None)
    if resolution is not None:
        lines.append("REMARK   2")
        lines.append(f"REMARK   2 RESOLUTION. {float(resolution):7.2f} ANGSTROMS.")
    for chain in chains:
        lines.extend(_seqres_lines(chain))
    serial = 1
    for chain in chains:
        last = None
        for i, slot in zip(*np.nonzero(chain.mask)):
            resname = rc.resnames[chain.aatype[i]]
            name = rc.atom_types[slot]
            x, y, z = chain.positions[i, slot]
            field = f" {name:<3}" if len(name) < 4 else name
            lines.append(
                f"ATOM  {serial:5d} {field}{'':1}{resname:>3} {chain.chain_id}{chain.numbers[i]:4d}{'':1}   "
                f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{chain.b_factors[i, slot]:6.2f}          {name[0]:>2}  "
            )
            serial += 1
            last = i
        if last is not None:
            lines.append(f"TER   {serial:5d}      {rc.resnames[chain.aatype[last]]:>3} {chain.chain_id}{chain.numbers[last]:4d}")
            serial += 1
    lines.append("END")
    return write_text_atomic(path, "\n".join(lines) + "\n")


def to_mmcif(
    chain_like: Any | Sequence[Any],
    path: str | os.PathLike[str],
    b_factors: Any | None = None,
) -> Path:
    """Write one chain-like (or a list) as mmCIF with entity, sequence scheme and atom tables."""
    chains, first = _normalise(chain_like, b_factors)
    entry = str(getattr(first, "pdb_id", "") or getattr(first, "id", "") or "protfold").replace(" ", "_")
    out = [f"data_{entry}", "#", f"_entry.id {_cif(entry)}", "#"]
    method = getattr(first, "method", None)
    if method:
        out += [f"_exptl.entry_id {_cif(entry)}", f"_exptl.method {_cif(method)}", "#"]
    resolution = getattr(first, "resolution", None)
    if resolution is not None:
        out += [f"_refine.entry_id {_cif(entry)}", f"_refine.ls_d_res_high {float(resolution):.2f}", "#"]
    out += ["loop_", "_entity.id", "_entity.type"] + [f"{k + 1} polymer" for k in range(len(chains))] + ["#"]
    out += ["loop_", "_entity_poly.entity_id", "_entity_poly.type", "_entity_poly.pdbx_strand_id"]
    out += [f"{k + 1} polypeptide(L) {_cif(c.chain_id)}" for k, c in enumerate(chains)] + ["#"]
    out += ["loop_", "_entity_poly_seq.entity_id", "_entity_poly_seq.num", "_entity_poly_seq.mon_id", "_entity_poly_seq.hetero"]
    for k, c in enumerate(chains):
        out += [f"{k + 1} {i + 1} {rc.resnames[a]} n" for i, a in enumerate(c.aatype)]
    out += ["#", "loop_"] + [f"_pdbx_poly_seq_scheme.{n}" for n in (
        "asym_id", "entity_id", "seq_id", "mon_id", "pdb_seq_num", "auth_seq_num",
        "pdb_mon_id", "auth_mon_id", "pdb_strand_id", "pdb_ins_code", "hetero")]
    for k, c in enumerate(chains):
        observed = c.mask.any(axis=-1)
        for i, a in enumerate(c.aatype):
            name, num = rc.resnames[a], int(c.numbers[i])
            auth = (str(num), name) if observed[i] else ("?", "?")
            out.append(f"{_asym(k)} {k + 1} {i + 1} {name} {num} {auth[0]} {auth[1]} {auth[1]} {_cif(c.chain_id)} . n")
    out += ["#", "loop_"] + [f"_atom_site.{n}" for n in (
        "group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id", "label_asym_id",
        "label_entity_id", "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
        "B_iso_or_equiv", "auth_seq_id", "auth_comp_id", "auth_asym_id", "auth_atom_id", "pdbx_PDB_model_num")]
    serial = 1
    for k, c in enumerate(chains):
        for i, slot in zip(*np.nonzero(c.mask)):
            resname, name = rc.resnames[c.aatype[i]], rc.atom_types[slot]
            x, y, z = c.positions[i, slot]
            out.append(
                f"ATOM {serial} {name[0]} {name} . {resname} {_asym(k)} {k + 1} {i + 1} ? "
                f"{x:.3f} {y:.3f} {z:.3f} 1.00 {c.b_factors[i, slot]:.2f} {c.numbers[i]} {resname} "
                f"{_cif(c.chain_id)} {name} 1"
            )
            serial += 1
    out.append("#")
    return write_text_atomic(path, "\n".join(out) + "\n")


# ---------------------------------------------------------------------------------------------- helpers


def _check_pdb_limits(chains: list[_Chain], path: str | os.PathLike[str]) -> None:
    """Raise PDBFormatLimitError (one line, naming the file and the limit) for what the PDB format cannot hold."""
    atoms = sum(int(c.mask.sum()) for c in chains)
    serials = atoms + sum(bool(c.mask.any()) for c in chains)  # each chain's TER record takes a serial too
    problem = None
    if serials > PDB_MAX_ATOMS:
        problem = (f"{atoms:,} atoms ({serials:,} numbered records with TER), more than the {PDB_MAX_ATOMS:,} the "
                   "PDB format can number")
    for chain in chains:
        if problem:
            break
        if len(chain.chain_id) != 1:
            problem = f"chain id {chain.chain_id!r}: the PDB format holds one-character chain ids"
        elif chain.numbers.size and (chain.numbers.max() > PDB_MAX_RESIDUE_NUMBER or chain.numbers.min() < -999):
            problem = (f"chain {chain.chain_id}: residue numbers {int(chain.numbers.min())}..{int(chain.numbers.max())}"
                       f" do not fit the PDB format's 4 columns (-999..{PDB_MAX_RESIDUE_NUMBER})")
        else:
            coords = chain.positions[chain.mask]
            if coords.size and (coords.max() > _MAX_PDB_COORD or coords.min() < _MIN_PDB_COORD):
                problem = f"chain {chain.chain_id}: coordinates do not fit the PDB format's 8.3f columns"
    if problem:
        raise PDBFormatLimitError(f"{path}: not written: {problem}; the mmCIF file holds it")


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on GPU or requiring grad
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _normalise(chain_like: Any | Sequence[Any], b_factors: Any | None) -> tuple[list[_Chain], Any]:
    """The chains to write, checked and as numpy, and the first chain-like (its pdb_id, method, resolution)."""
    items = list(chain_like) if isinstance(chain_like, (list, tuple)) else [chain_like]
    if not items:
        raise ValueError("nothing to write")
    if b_factors is not None and len(items) != 1:
        raise ValueError("b_factors override is for a single chain; set b_factors on each chain instead")
    used_ids: set[str] = set()
    chains = []
    for k, item in enumerate(items):
        aatype = _as_numpy(item.aatype).astype(np.int64)
        length = aatype.shape[0]
        positions = _as_numpy(item.atom_positions).astype(np.float64)
        mask = _as_numpy(item.atom_mask) > 0.5
        if positions.shape != (length, rc.atom_type_num, 3) or mask.shape != (length, rc.atom_type_num):
            raise ValueError(f"expected atom_positions [L, 37, 3] and atom_mask [L, 37] with L={length}, "
                             f"got {positions.shape} and {mask.shape}")
        residue_index = getattr(item, "residue_index", None)
        numbers = _as_numpy(residue_index).astype(np.int64) + 1 if residue_index is not None else np.arange(1, length + 1)
        bf = b_factors if b_factors is not None else getattr(item, "b_factors", None)
        bf = np.zeros((length, rc.atom_type_num)) if bf is None else _as_numpy(bf).astype(np.float64)
        if bf.shape == (length,):
            bf = np.repeat(bf[:, None], rc.atom_type_num, axis=1)
        if bf.shape != (length, rc.atom_type_num):
            raise ValueError(f"b_factors must be [L] or [L, 37] with L={length}, got {bf.shape}")
        chain_id = str(getattr(item, "chain_id", "") or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[k % 26])
        if chain_id in used_ids:
            raise ValueError(f"duplicate chain id {chain_id!r}")
        used_ids.add(chain_id)
        chains.append(_Chain(chain_id=chain_id, sequence=rc.aatype_to_sequence(aatype), aatype=aatype,
                             positions=positions, mask=mask, numbers=numbers, b_factors=bf))
    return chains, items[0]


def _seqres_lines(chain: _Chain) -> list[str]:
    names = [rc.resnames[a] for a in chain.aatype]
    return [
        f"SEQRES {n + 1:3d} {chain.chain_id} {len(names):4d}  " + " ".join(names[13 * n : 13 * n + 13])
        for n in range((len(names) + 12) // 13)
    ]


def _asym(k: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[k % 26] * (k // 26 + 1)


def _cif(value: str) -> str:
    """Quote an mmCIF value if it has whitespace or starts with a special character."""
    value = str(value)
    if not value or any(ch.isspace() for ch in value) or value[0] in "_#$'\";[]" or value in {".", "?"}:
        return "'" + value + "'" if "'" not in value else '"' + value + '"'
    return value


