"""The prepared cache: one compressed `.npz` file per chain, `<cache>/<id>.npz`.

Keys of an entry (what `read_entry` returns; L residues, N_msa alignment rows, row 0 the query):

  id                  str
  sequence            str, length L
  aatype              int64   [L]
  all_atom_positions  float32 [L, 37, 3]
  all_atom_mask       float32 [L, 37]
  residue_index       int64   [L]
  resolution          float32 scalar, nan if unknown
  msa                 int8    [N_msa, L]   ids of `constants.msa_letter_to_id`; the query alone without MSA
  deletion_matrix     int32   [N_msa, L]
  method, source      str     experimental method, structure file the entry came from
  msa_files           list[str] alignment files merged into `msa` (empty without MSA)
  msa_rejected        list[str] alignment files left out, each 'file: reason'
  fingerprint         str     what `prepare` compares on re-runs (structure file size/mtime, MSA files)

On disk the mask is uint8, residue_index int32 and deletion_matrix the smallest unsigned type that
holds it; `read_entry` restores the dtypes above. Arrays are stored without pickle.

Writes are atomic (`protfold.io.atomic`): the entry is written to a hidden temporary file in the cache
directory, flushed and fsync'ed, then renamed over `<id>.npz` with `os.replace`. An interrupted write (crash, Ctrl-C, full disk)
leaves either the previous complete entry or none, never a partial one; stale temporaries are removed
by `remove_stale_temporaries` (called by `prepare`).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from protfold import constants as rc
from protfold.errors import ProtfoldInputError
from protfold.io.atomic import atomic_write

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
SUFFIX = ".npz"
_ARRAY_KEYS = ("aatype", "all_atom_positions", "all_atom_mask", "residue_index", "msa", "deletion_matrix")
_STR_KEYS = ("id", "sequence", "method", "source", "fingerprint")
_LIST_KEYS = ("msa_files", "msa_rejected")
_METADATA_DEFAULTS = {"method": "", "source": "", "fingerprint": "", "msa_files": "[]", "msa_rejected": "[]"}
_ON_DISK_KEYS = _ARRAY_KEYS + _STR_KEYS + _LIST_KEYS + ("resolution", "cache_version")

# byte value of an upper-case alignment letter or '-' -> MSA class id (others -> X)
_MSA_LUT = np.array([rc.msa_letter_to_id(chr(b)) for b in range(256)], dtype=np.int8)


def entry_path(cache_dir: str | os.PathLike[str], entry_id: str) -> Path:
    """`<cache_dir>/<entry_id>.npz`."""
    if not entry_id or "/" in entry_id or os.sep in entry_id or entry_id.startswith("."):
        raise ValueError(f"entry id {entry_id!r} cannot be a file name")
    return Path(cache_dir) / f"{entry_id}{SUFFIX}"


def list_entries(cache_dir: str | os.PathLike[str]) -> list[str]:
    """Ids of the complete entries in a cache directory, sorted (temporaries are hidden and skipped)."""
    return sorted(p.name[: -len(SUFFIX)] for p in Path(cache_dir).glob(f"*{SUFFIX}") if not p.name.startswith("."))


def msa_to_ids(sequences: list[str], length: int) -> np.ndarray:
    """Aligned sequences (each `length` letters, '-' for gaps) -> int8 [N, length] MSA class ids."""
    if not sequences:
        return np.zeros((0, length), dtype=np.int8)
    joined = "".join(sequences).upper().encode("ascii", errors="replace")
    if len(joined) != len(sequences) * length:
        raise ValueError(f"aligned sequences must all have length {length}")
    return _MSA_LUT[np.frombuffer(joined, dtype=np.uint8)].reshape(len(sequences), length)


def make_entry(
    *,
    entry_id: str,
    sequence: str,
    aatype: np.ndarray,
    all_atom_positions: np.ndarray,
    all_atom_mask: np.ndarray,
    residue_index: np.ndarray,
    resolution: float | None,
    msa: np.ndarray | None = None,
    deletion_matrix: np.ndarray | None = None,
    method: str = "",
    source: str = "",
    msa_files: list[str] | None = None,
    msa_rejected: list[str] | None = None,
    fingerprint: str = "",
) -> dict[str, Any]:
    """An entry dict in the in-memory dtypes; without `msa` the query alone is the alignment."""
    length = len(sequence)
    if msa is None:
        msa = msa_to_ids([sequence], length)
        deletion_matrix = np.zeros((1, length), dtype=np.int32)
    elif deletion_matrix is None:
        deletion_matrix = np.zeros(msa.shape, dtype=np.int32)
    entry = {
        "id": entry_id,
        "sequence": sequence,
        "aatype": np.asarray(aatype, dtype=np.int64),
        "all_atom_positions": np.asarray(all_atom_positions, dtype=np.float32),
        "all_atom_mask": np.asarray(all_atom_mask, dtype=np.float32),
        "residue_index": np.asarray(residue_index, dtype=np.int64),
        "resolution": np.float32(np.nan if resolution is None else resolution),
        "msa": np.asarray(msa, dtype=np.int8),
        "deletion_matrix": np.asarray(deletion_matrix, dtype=np.int32),
        "method": method,
        "source": source,
        "msa_files": list(msa_files or []),
        "msa_rejected": list(msa_rejected or []),
        "fingerprint": fingerprint,
    }
    _check_shapes(entry, source or entry_id)
    return entry


def write_entry(cache_dir: str | os.PathLike[str], entry: dict[str, Any]) -> Path:
    """Write one entry atomically to `<cache_dir>/<id>.npz`; returns the path."""
    _check_shapes(entry, entry["id"])
    path = entry_path(cache_dir, entry["id"])
    arrays = _to_disk(entry)
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    _fsync_dir(path.parent)
    return path


def read_entry(path: str | os.PathLike[str], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load an entry (all keys, or only `keys`); ProtfoldInputError if the file is missing, corrupt or truncated."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            wanted = keys or _ON_DISK_KEYS
            missing = [k for k in wanted if k not in npz.files and k not in _METADATA_DEFAULTS]
            if missing:
                raise ProtfoldInputError(path, f"not a protfold cache entry (missing {', '.join(missing)})")
            raw = {k: npz[k] if k in npz.files else np.array(_METADATA_DEFAULTS[k]) for k in wanted}
    except ProtfoldInputError:
        raise
    except FileNotFoundError:
        raise ProtfoldInputError(path, "cache entry does not exist") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ProtfoldInputError(path, f"corrupt or truncated cache entry ({type(exc).__name__}: {exc})") from None
    if "cache_version" in raw and int(raw["cache_version"]) != CACHE_VERSION:
        raise ProtfoldInputError(path, f"cache version {int(raw['cache_version'])}, expected {CACHE_VERSION}: re-run prepare")
    entry = _from_disk(raw)
    if keys is None:
        _check_shapes(entry, path)
    return entry


def remove_stale_temporaries(cache_dir: str | os.PathLike[str]) -> int:
    """Delete temporaries left by interrupted writes; returns how many. Not safe while another writer runs."""
    count = 0
    # `.<name>.*.tmp` from atomic_write; `.tmp-*.part` from caches written by earlier protfold versions
    for pattern in (".*.tmp", ".tmp-*.part"):
        for tmp in Path(cache_dir).glob(pattern):
            tmp.unlink(missing_ok=True)
            count += 1
    if count:
        logger.info("removed %d temporary file(s) of interrupted writes in %s", count, cache_dir)
    return count


def _to_disk(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    deletions = np.asarray(entry["deletion_matrix"])
    top = int(deletions.max()) if deletions.size else 0
    if deletions.size and int(deletions.min()) < 0:
        raise ValueError("deletion_matrix has negative counts")
    del_dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.int32
    return {
        "id": np.array(entry["id"]),
        "sequence": np.array(entry["sequence"]),
        "aatype": np.asarray(entry["aatype"], dtype=np.int8),
        "all_atom_positions": np.asarray(entry["all_atom_positions"], dtype=np.float32),
        "all_atom_mask": np.asarray(entry["all_atom_mask"]).astype(np.uint8),
        "residue_index": np.asarray(entry["residue_index"], dtype=np.int32),
        "resolution": np.asarray(entry["resolution"], dtype=np.float32),
        "msa": np.asarray(entry["msa"], dtype=np.int8),
        "deletion_matrix": deletions.astype(del_dtype),
        "method": np.array(entry.get("method", "")),
        "source": np.array(entry.get("source", "")),
        "msa_files": np.array(json.dumps(list(entry.get("msa_files", [])))),
        "msa_rejected": np.array(json.dumps(list(entry.get("msa_rejected", [])))),
        "fingerprint": np.array(entry.get("fingerprint", "")),
        "cache_version": np.array(CACHE_VERSION, dtype=np.int32),
    }


def _from_disk(raw: dict[str, np.ndarray]) -> dict[str, Any]:
    dtypes = {
        "aatype": np.int64,
        "all_atom_positions": np.float32,
        "all_atom_mask": np.float32,
        "residue_index": np.int64,
        "msa": np.int8,
        "deletion_matrix": np.int32,
    }
    entry: dict[str, Any] = {}
    for key, value in raw.items():
        if key in dtypes:
            entry[key] = value.astype(dtypes[key], copy=False)
        elif key in _STR_KEYS:
            entry[key] = str(value)
        elif key == "resolution":
            entry[key] = np.float32(value)
        elif key in _LIST_KEYS:
            entry[key] = list(json.loads(str(value)))
    return entry


def _check_shapes(entry: dict[str, Any], where: str | os.PathLike[str]) -> None:
    length = len(entry["sequence"])
    expected = {
        "aatype": (length,),
        "all_atom_positions": (length, rc.atom_type_num, 3),
        "all_atom_mask": (length, rc.atom_type_num),
        "residue_index": (length,),
    }
    for key, shape in expected.items():
        if np.shape(entry[key]) != shape:
            raise ProtfoldInputError(where, f"{key} has shape {np.shape(entry[key])}, expected {shape}")
    msa, deletions = np.shape(entry["msa"]), np.shape(entry["deletion_matrix"])
    if len(msa) != 2 or msa[0] < 1 or msa[1] != length or deletions != msa:
        raise ProtfoldInputError(where, f"msa {msa} / deletion_matrix {deletions} do not fit length {length}")


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
