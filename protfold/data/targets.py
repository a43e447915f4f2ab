"""Prediction targets: the sequences of FASTA files, of a folder of them, or of a prepared cache.

Every input is read and checked before a model is loaded, so a mistake in the inputs is reported at once.
Output names come from the ids: an id that is not a safe file name is made one (`safe_id`, and the run says
so), and two inputs with the same output name are refused, naming both, so no prediction is lost.
MSAs are read target by target (`Target.entry`), when the target is predicted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protfold import constants as rc
from protfold.data.cache import list_entries, msa_to_ids, read_entry
from protfold.errors import ProtfoldInputError
from protfold.io.fasta import FASTA_SUFFIXES, read_fasta, safe_id
from protfold.io.msa import find_msa_files, load_msas

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One sequence to predict: `id` names its outputs; `name` is the id as the input wrote it."""

    id: str
    name: str
    origin: Path  # the FASTA file or cache entry it came from
    sequence: str | None = None  # FASTA targets; cache targets read theirs from `origin`
    msa_dir: Path | None = None

    def entry(self) -> dict:
        """The cache-style entry (see protfold.data.cache) the pipeline makes features from."""
        if self.sequence is None:
            return read_entry(self.origin)
        return _sequence_entry(self.id, self.sequence, self.msa_dir)


def collect_targets(source: str | os.PathLike[str], msa_dir: str | os.PathLike[str] | None = None) -> list[Target]:
    """All targets of `source` (FASTA file, folder of FASTA files, or prepared cache), checked; raises
    ProtfoldInputError naming the file for unreadable inputs, ids that cannot be file names and duplicates."""
    source = Path(source)
    msa_path = Path(msa_dir) if msa_dir else None
    if msa_path is not None and not msa_path.is_dir():
        raise ProtfoldInputError(msa_path, "MSA folder not found")
    if not source.exists():
        raise ProtfoldInputError(source, "no such file or folder")
    if source.is_dir() and list_entries(source):
        found = [(name, source / f"{name}.npz", None) for name in list_entries(source)]
    else:
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in FASTA_SUFFIXES) if source.is_dir() else [source]
        if not files:
            raise ProtfoldInputError(source, "no FASTA files (.fasta, .fa, .faa, .fas) and no prepared entries")
        found = [(name, path, seq) for path in files for name, seq in read_fasta(path)]
    targets: list[Target] = []
    seen: dict[str, Target] = {}
    for name, origin, sequence in found:
        target = Target(id=_output_id(name, origin), name=name, origin=origin, sequence=sequence, msa_dir=msa_path)
        first = seen.setdefault(target.id, target)
        if first is not target:
            raise ProtfoldInputError(origin, f"record {name!r} has the output name {target.id!r} of record "
                                             f"{first.name!r} in {first.origin}: ids must be unique in one run")
        targets.append(target)
    return targets


def _output_id(name: str, origin: Path) -> str:
    safe = safe_id(name)
    if not safe:
        raise ProtfoldInputError(origin, f"record {name!r}: the id has no character usable in a file name")
    if safe != name:
        log.warning("%s: record %r is written as %r (ids become file names)", origin, name, safe)
    return safe


def _sequence_entry(name: str, sequence: str, msa_dir: Path | None) -> dict:
    length = len(sequence)
    msa, deletions = None, None
    folder = msa_dir / name if msa_dir is not None else None
    files = find_msa_files(folder) if folder is not None and folder.is_dir() else []
    if msa_dir is not None and (msa_dir / f"{name}.a3m").is_file():
        files.append(msa_dir / f"{name}.a3m")
    if files:
        alignment = load_msas(files, sequence)
        msa, deletions = msa_to_ids(alignment.sequences, length), alignment.deletion_matrix
    if msa is None:
        msa = msa_to_ids([sequence], length)
        deletions = np.zeros((1, length), dtype=np.int32)
    return {
        "id": name, "sequence": sequence, "aatype": rc.sequence_to_aatype(sequence),
        "all_atom_positions": np.zeros((length, rc.atom_type_num, 3), np.float32),
        "all_atom_mask": np.zeros((length, rc.atom_type_num), np.float32),
        "residue_index": np.arange(length, dtype=np.int64), "resolution": np.float32(np.nan),
        "msa": msa, "deletion_matrix": deletions,
    }
