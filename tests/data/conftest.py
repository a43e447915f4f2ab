"""Fixtures for the data-pipeline tests: raw example dicts built from the real sample files.

Structures come from `protfold.io.structure` when it exists, else from the tiny PDB reader below
(ATOM lines plus HETATM MSE read as MET, first model, first alternate location). MSAs come from
`protfold.io.msa` when it exists, else from a minimal a3m reader; chains without an alignment get a
synthetic MSA (mutated copies of the query with gaps and deletions) so the MSA code sees real lengths.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from protfold import constants as rc
from protfold.bench.synthetic import random_msa

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
PDB_CHAINS = {"2rbg": "A", "3htn": "A", "5l33": "A", "6ehb": "A", "6mrr": "A"}


def _read_pdb_chain(path: Path, chain_id: str) -> dict[str, np.ndarray]:
    """Observed residues of one chain: aatype, atom37 positions/mask, residue_index, HELIX ranges."""
    residues: dict[tuple[int, str], dict] = {}
    order: list[tuple[int, str]] = []
    helices: list[tuple[int, int]] = []
    for line in path.read_text().splitlines():
        rec = line[:6].strip()
        if rec == "ENDMDL":
            break
        if rec == "HELIX" and line[19] == chain_id and line[31] == chain_id:
            helices.append((int(line[21:25]), int(line[33:37])))
        if rec not in ("ATOM", "HETATM") or line[21] != chain_id:
            continue
        resname = line[17:20].strip()
        if rec == "HETATM" and resname != "MSE":
            continue
        altloc = line[16]
        key = (int(line[22:26]), line[26])
        if key not in residues:
            residues[key] = {"name": "MET" if resname == "MSE" else resname, "atoms": {}, "altloc": altloc}
            order.append(key)
        res = residues[key]
        if altloc not in (" ", res["altloc"]) and res["altloc"] != " ":
            continue
        if res["altloc"] == " " and altloc != " ":
            res["altloc"] = altloc
        atom = line[12:16].strip()
        atom = "SD" if (resname == "MSE" and atom == "SE") else atom
        if atom in rc.atom_order and atom not in res["atoms"]:
            res["atoms"][atom] = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
    n = len(order)
    pos = np.zeros((n, 37, 3), dtype=np.float32)
    mask = np.zeros((n, 37), dtype=np.float32)
    aatype = np.zeros(n, dtype=np.int64)
    for i, key in enumerate(order):
        res = residues[key]
        aatype[i] = rc.restype_order.get(rc.restype_3to1.get(res["name"], "X"), rc.unk_restype_index)
        for atom, xyz in res["atoms"].items():
            pos[i, rc.atom_order[atom]] = xyz
            mask[i, rc.atom_order[atom]] = 1.0
    resnum = np.array([k[0] for k in order], dtype=np.int64)
    return {"aatype": aatype, "all_atom_positions": pos, "all_atom_mask": mask, "resnum": resnum, "helices": helices}


def _helix_positions(helices: list[tuple[int, int]], numbers: list[int | None]) -> list[np.ndarray]:
    """HELIX ranges (author numbers) -> array positions of the observed residues inside each range."""
    out = []
    for first, last in helices:
        pos = [i for i, n in enumerate(numbers) if n is not None and first <= n <= last]
        if pos:
            out.append(np.asarray(pos))
    return out


def _author_number(label: str) -> int | None:
    digits = label.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    return int(digits) if digits and label == digits else None  # residues with insertion codes are skipped


def _load_structure(pdb_id: str, chain_id: str) -> dict:
    """One sample chain as arrays, via protfold.io when it is there (else the tiny reader above)."""
    path = SAMPLES / "pdb" / f"{pdb_id}.pdb"
    own = _read_pdb_chain(path, chain_id)
    try:
        from protfold.io.structure import parse_structure
    except ImportError:
        parse_structure = None
    if parse_structure is None:
        numbers = [int(n) for n in own["resnum"]]
        return {
            "aatype": own["aatype"],
            "all_atom_positions": own["all_atom_positions"],
            "all_atom_mask": own["all_atom_mask"],
            "residue_index": own["resnum"] - 1,
            "resolution": np.float32(np.nan),
            "helices": _helix_positions(own["helices"], numbers),
        }
    chain = parse_structure(path, chain_id)[0]
    numbers = [_author_number(n) if n else None for n in chain.author_numbering] or [None] * len(chain.aatype)
    return {
        "aatype": np.asarray(chain.aatype, dtype=np.int64),
        "all_atom_positions": np.asarray(chain.atom_positions, dtype=np.float32),
        "all_atom_mask": np.asarray(chain.atom_mask, dtype=np.float32),
        "residue_index": np.asarray(chain.residue_index, dtype=np.int64),
        "resolution": np.float32(np.nan if chain.resolution is None else chain.resolution),
        "helices": _helix_positions(own["helices"], numbers),
    }


def _read_a3m(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows, dels = [], []
    seqs, cur = [], []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            if cur:
                seqs.append("".join(cur))
            cur = []
        elif line.strip():
            cur.append(line.strip())
    if cur:
        seqs.append("".join(cur))
    for s in seqs:
        ids, d, count = [], [], 0
        for ch in s:
            if ch.islower():
                count += 1
                continue
            ids.append(rc.msa_letter_to_id(ch))
            d.append(count)
            count = 0
        rows.append(ids)
        dels.append(d)
    return np.asarray(rows, dtype=np.int8), np.asarray(dels, dtype=np.int32)


def raw_example(pdb_id: str, n_msa: int = 64, seed: int = 0) -> dict:
    s = _load_structure(pdb_id, PDB_CHAINS[pdb_id])
    msa, deletions = random_msa(s["aatype"], n_msa, np.random.default_rng(seed))
    return {
        "id": f"{pdb_id}_{PDB_CHAINS[pdb_id]}",
        "sequence": rc.aatype_to_sequence(s["aatype"]),
        "aatype": s["aatype"],
        "all_atom_positions": s["all_atom_positions"],
        "all_atom_mask": s["all_atom_mask"],
        "residue_index": s["residue_index"],
        "resolution": s["resolution"],
        "msa": msa,
        "deletion_matrix": deletions,
    }


@functools.lru_cache(maxsize=None)
def _cached_structure(pdb_id: str) -> dict:
    return _load_structure(pdb_id, PDB_CHAINS[pdb_id])


@pytest.fixture(scope="session")
def structures() -> dict[str, dict]:
    """All PDB-format sample chains (with HELIX ranges) keyed by PDB id."""
    return {k: _cached_structure(k) for k in PDB_CHAINS}


@pytest.fixture(scope="session")
def raw_6mrr() -> dict:
    return raw_example("6mrr", n_msa=64, seed=1)


@pytest.fixture(scope="session")
def raw_6ehb() -> dict:
    return raw_example("6ehb", n_msa=200, seed=2)


@pytest.fixture(scope="session")
def real_msa_3zee() -> tuple[np.ndarray, np.ndarray]:
    """The real 3zee_A HHblits alignment (837 rows) as 23-class ids and deletions."""
    path = SAMPLES / "msas" / "3zee_A" / "bfd_uniclust_hits.a3m"
    try:
        from protfold.io.msa import parse_a3m
    except ImportError:
        return _read_a3m(path)
    m = parse_a3m(path)
    msa = np.array([[rc.msa_letter_to_id(c) for c in seq.upper()] for seq in m.sequences], dtype=np.int8)
    return msa, np.asarray(m.deletion_matrix, dtype=np.int32)
