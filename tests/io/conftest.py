"""Fixtures and raw-text helpers for the io tests. Expected values come from MANIFEST.tsv and from the
sample files' own text, read here independently of the code under test."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest

from protfold.io import ProteinChain, parse_structure

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`structure_row` / `msa_row` arguments run once per MANIFEST.tsv row of that kind."""
    for name, kind in (("structure_row", "structure"), ("msa_row", "msa")):
        if name in metafunc.fixturenames:
            rows = manifest_rows(kind)
            metafunc.parametrize(name, rows, ids=[f"{r['id']}_{r['chain']}:{Path(r['file']).name}" for r in rows])


def manifest_rows(kind: str) -> list[dict[str, str]]:
    with open(SAMPLES / "MANIFEST.tsv", newline="") as handle:
        return [row for row in csv.DictReader(handle, delimiter="\t") if row["kind"] == kind]


def structure_file(pdb_id: str) -> Path:
    (row,) = [r for r in manifest_rows("structure") if r["id"] == pdb_id]
    return SAMPLES / row["file"]


@functools.lru_cache(maxsize=None)
def parsed(pdb_id: str) -> tuple[ProteinChain, ...]:
    """All protein chains of a shipped structure, parsed once per session (callers must not mutate)."""
    return tuple(parse_structure(structure_file(pdb_id)))


def chain_of(pdb_id: str, chain_id: str) -> ProteinChain:
    (chain,) = [c for c in parsed(pdb_id) if c.chain_id == chain_id]
    return chain


def raw_atom_site(path: Path) -> list[dict[str, str]]:
    """The _atom_site loop of an mmCIF file as dicts, by whitespace splitting (no quoted values there)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("_atom_site."))
    names, i = [], start
    while lines[i].startswith("_atom_site."):
        names.append(lines[i].split()[0][len("_atom_site."):])
        i += 1
    rows = []
    while i < len(lines) and not lines[i].startswith(("#", "_", "loop_")):
        values = lines[i].split()
        assert len(values) == len(names), lines[i]
        rows.append(dict(zip(names, values)))
        i += 1
    return rows


def raw_pdb_atoms(path: Path) -> list[dict]:
    """ATOM/HETATM records of a PDB file by fixed columns (first model)."""
    atoms = []
    for line in path.read_text().splitlines():
        if line.startswith("ENDMDL"):
            break
        if line.startswith(("ATOM  ", "HETATM")):
            atoms.append({
                "name": line[12:16].strip(), "alt": line[16].strip(), "resname": line[17:20].strip(),
                "chain": line[21], "number": int(line[22:26]), "icode": line[26].strip(),
                "xyz": (float(line[30:38]), float(line[38:46]), float(line[46:54])),
                "occupancy": float(line[54:60]), "b": float(line[60:66]),
            })
    return atoms


class IoSamples:
    """The helpers above, handed to tests as the `samples` fixture."""

    dir = SAMPLES
    manifest_rows = staticmethod(manifest_rows)
    structure_file = staticmethod(structure_file)
    parsed = staticmethod(parsed)
    chain_of = staticmethod(chain_of)
    raw_atom_site = staticmethod(raw_atom_site)
    raw_pdb_atoms = staticmethod(raw_pdb_atoms)


@pytest.fixture(scope="session")
def samples() -> IoSamples:
    return IoSamples()
