"""PDB reading: Biopython's `PDBParser` for the atoms, SEQRES and header records read from the text, and
the alignment of the observed residues to SEQRES."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
from Bio.Align import PairwiseAligner
from Bio.PDB import PDBParser

from protfold.errors import ProtfoldInputError
from protfold.io.residues import (
    ProteinChain,
    _assign_positions,
    _Atoms,
    _build_chain,
    _Residue,
    _stem,
    residue_letter,
)

logger = logging.getLogger(__name__)


def parse_pdb(path: Path, text: str) -> list[ProteinChain]:
    """Protein chains of a PDB text (first model); chains without observed atoms are left to the caller."""
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
