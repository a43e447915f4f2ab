"""`protfold prepare`: structure files (+ MSAs) -> the prepared cache, one `.npz` per protein chain.

- Every `.cif`, `.cif.gz`, `.pdb`, `.pdb.gz`, `.ent`, `.ent.gz` under the input directory (recursively)
  is one task; tasks run in a process pool, largest file first, so one big file does not hold up the rest.
- Every protein chain becomes the entry `<pdb id>_<chain>`. Its MSAs are the files in
  `msa_dir/<pdb id>_<chain>/`; a chain without that folder uses the folder of another chain of the same
  file with the identical sequence (homomers), else it is single-sequence.
- An MSA file that cannot be used (its query differs from the chain's sequence, a malformed record) is
  rejected: the entry keeps the other MSA files, stays `ok`, and the reason column names the rejected file.
  `strict` turns such rejections, like skipped files, into a failed run (exit code), nothing more.
- A file that cannot be used becomes a `skipped` row with a one-line reason naming the file; no traceback.
- Re-runs: an entry whose cache file carries the same fingerprint (structure file size and mtime, the
  MSA files' names, sizes and mtimes) is not rewritten and is reported `ok` with reason `cached`. The
  structure file is still parsed to learn its chains (cheap next to MSA parsing and writing).

`out_dir/report.tsv` has one row per entry, or per input file that yielded no entry; see REPORT_COLUMNS.
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from protfold.data import cache
from protfold.errors import ProtfoldInputError
from protfold.io.atomic import write_text_atomic

logger = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".cif", ".cif.gz", ".pdb", ".pdb.gz", ".ent", ".ent.gz")
REPORT_NAME = "report.tsv"
REPORT_COLUMNS = (
    "file", "id", "chain", "status", "reason", "length", "observed", "msa_depth", "msa_files", "method", "resolution",
)
OK, SKIPPED, CACHED = "ok", "skipped", "cached"


@dataclass
class PrepareReport:
    """What `prepare` did: one row per entry (or per file without entry), as written to report.tsv."""

    rows: list[dict[str, Any]]
    report_path: Path
    elapsed_s: float
    strict: bool = False
    msa_rejections: list[str] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == OK for r in self.rows)

    @property
    def n_cached(self) -> int:
        return sum(r["status"] == OK and r["reason"].startswith(CACHED) for r in self.rows)

    @property
    def n_skipped(self) -> int:
        return sum(r["status"] == SKIPPED for r in self.rows)

    @property
    def succeeded(self) -> bool:
        """Something was prepared, and with `strict` nothing was skipped and no MSA file rejected."""
        if self.n_ok == 0:
            return False
        return not self.strict or (self.n_skipped == 0 and not self.msa_rejections)

    def summary(self) -> str:
        fresh = self.n_ok - self.n_cached
        parts = [f"{self.n_ok} entries ok ({fresh} prepared, {self.n_cached} cached)", f"{self.n_skipped} skipped"]
        if self.msa_rejections:
            parts.append(f"{len(self.msa_rejections)} MSA file(s) rejected")
        return f"{', '.join(parts)} in {self.elapsed_s:.1f} s; report: {self.report_path}"


def find_structure_files(input_dir: str | os.PathLike[str]) -> list[Path]:
    """Structure files under `input_dir` (recursive, hidden files and folders ignored), sorted."""
    root = Path(input_dir)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.name.lower().endswith(STRUCTURE_SUFFIXES):
            found.append(path)
    return sorted(found)


def prepare(
    input_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    msa_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    strict: bool = False,
    progress: bool | None = None,
) -> PrepareReport:
    """Prepare every protein chain under `input_dir` into `out_dir`; see the module docstring.

    workers: processes (default: the machine's cores; 1 runs in this process). progress: tqdm bar
    (None: only on a terminal). Raises ProtfoldInputError only if `input_dir` is not a directory.
    """
    start = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if not input_dir.is_dir():
        raise ProtfoldInputError(input_dir, "input directory does not exist")
    if msa_dir is not None and not Path(msa_dir).is_dir():
        raise ProtfoldInputError(msa_dir, "MSA directory does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.remove_stale_temporaries(out_dir)
    files = find_structure_files(input_dir)
    tasks, rows_by_file = _deduplicate(files, input_dir)
    logger.info("prepare: %d structure file(s) under %s -> %s", len(files), input_dir, out_dir)
    jobs = [(str(path), _rel(path, input_dir), str(out_dir), None if msa_dir is None else str(msa_dir)) for path in tasks]
    for rel, rows in _run(jobs, workers, progress):
        rows_by_file[rel] = rows
    rows = [row for rel in sorted(rows_by_file) for row in rows_by_file[rel]]
    _mark_duplicate_ids(rows)
    report_path = out_dir / REPORT_NAME
    _write_report(report_path, rows)
    rejections = [part for r in rows for part in r.pop("_rejected", [])]
    for row in rows:
        if row["status"] == SKIPPED:
            logger.warning("skipped %s", row["reason"])
    return PrepareReport(rows, report_path, time.perf_counter() - start, strict, rejections)


# --------------------------------------------------------------------------------------- orchestration


def _run(jobs: list[tuple], workers: int | None, progress: bool | None):
    """Yield (relative file, rows) per job as they finish."""
    workers = max(1, min(workers or _cores(), len(jobs) or 1))
    bar = tqdm(total=len(jobs), unit="file", desc="prepare", disable=False if progress else None if progress is None else True)
    try:
        if workers == 1:
            for job in jobs:
                yield job[1], _prepare_file(*job)
                bar.update()
            return
        # Largest first: long tasks start early instead of finishing last.
        order = sorted(jobs, key=lambda job: -_size(job[0]))
        context = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
            futures: dict[Future, tuple] = {pool.submit(_prepare_file, *job): job for job in order}
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield futures[future][1], _result(future, futures[future])
                        bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()


def _result(future: Future, job: tuple) -> list[dict[str, Any]]:
    try:
        return future.result()
    except BrokenProcessPool:
        return [_skip_row(job[1], f"{job[1]}: a worker process died (out of memory?) while this file was pending")]


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    warnings.simplefilter("ignore")


def _deduplicate(files: list[Path], root: Path) -> tuple[list[Path], dict[str, list[dict[str, Any]]]]:
    """One file per structure name (1abc.cif over 1abc.pdb); the others become skipped rows."""
    preference = {suffix: i for i, suffix in enumerate(STRUCTURE_SUFFIXES)}
    chosen: dict[str, Path] = {}
    for path in sorted(files, key=lambda p: (preference[_suffix(p)], str(p))):
        chosen.setdefault(_name_key(path), path)
    rows = {}
    for path in files:
        first = chosen[_name_key(path)]
        if first != path:
            rows[_rel(path, root)] = [_skip_row(_rel(path, root), f"{_rel(path, root)}: same structure as {_rel(first, root)}, not prepared twice")]
    return [p for p in files if chosen[_name_key(p)] == p], rows


def _mark_duplicate_ids(rows: list[dict[str, Any]]) -> None:
    """Two files yielding one id overwrite each other's entry: keep the first row, flag the others."""
    first: dict[str, str] = {}
    for row in rows:
        if row["status"] != OK:
            continue
        if row["id"] in first:
            row["status"] = SKIPPED
            row["reason"] = f"{row['file']}: entry {row['id']} also comes from {first[row['id']]}; cache holds either"
        else:
            first[row["id"]] = row["file"]


# ------------------------------------------------------------------------------------------ one file


def _prepare_file(path: str, rel: str, out_dir: str, msa_dir: str | None) -> list[dict[str, Any]]:
    """All chains of one structure file -> cache entries; returns report rows. Never raises an Exception."""
    from protfold.io.structure import parse_structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chains = parse_structure(path)
    except ProtfoldInputError as exc:
        return [_skip_row(rel, f"{rel}: {exc.reason}")]
    except Exception as exc:  # a parser bug must not stop the run; the reason says what happened
        return [_skip_row(rel, f"{rel}: {_one_line(exc)}")]
    if not chains:
        return [_skip_row(rel, f"{rel}: no protein chain")]
    stat = os.stat(path)
    rows = []
    for chain in chains:
        try:
            rows.append(_prepare_chain(chain, chains, rel, f"{stat.st_size}:{stat.st_mtime_ns}", out_dir, msa_dir))
        except ProtfoldInputError as exc:
            rows.append(_skip_row(rel, f"{rel}: chain {chain.chain_id}: {exc.reason}", chain))
        except Exception as exc:
            rows.append(_skip_row(rel, f"{rel}: chain {chain.chain_id}: {_one_line(exc)}", chain))
    return rows


def _prepare_chain(chain, chains, rel: str, file_stamp: str, out_dir: str, msa_dir: str | None) -> dict[str, Any]:  # noqa: ANN001
    msa_folder, borrowed_from = _msa_folder(chain, chains, msa_dir)
    msa_paths = _msa_files(msa_folder)
    stamps = ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in msa_paths)
    fingerprint = f"v{cache.CACHE_VERSION}|{rel}|{file_stamp}|{stamps}"
    target = cache.entry_path(out_dir, chain.id)
    row = _ok_row(rel, chain)
    if target.exists():
        try:
            previous = cache.read_entry(target, keys=("fingerprint", "msa_files", "msa_rejected", "msa"))
        except ProtfoldInputError:
            previous = None  # unreadable: prepare it again
        if previous is not None and previous["fingerprint"] == fingerprint:
            rejected = previous["msa_rejected"]
            reason = "; ".join([CACHED] + [f"MSA rejected: {r}" for r in rejected])
            row.update(reason=reason, msa_depth=len(previous["msa"]), msa_files=";".join(previous["msa_files"]))
            row["_rejected"] = rejected
            return row
    notes, rejected = [], []
    msa, deletions, used = None, None, []
    if msa_paths:
        msa, deletions, used, rejected = _load_msas(chain.sequence, msa_paths, msa_dir)
        if borrowed_from and used:
            notes.append(f"MSA of {borrowed_from} (identical sequence)")
    entry = cache.make_entry(
        entry_id=chain.id,
        sequence=chain.sequence,
        aatype=chain.aatype,
        all_atom_positions=chain.atom_positions,
        all_atom_mask=chain.atom_mask,
        residue_index=chain.residue_index,
        resolution=chain.resolution,
        msa=msa,
        deletion_matrix=deletions,
        method=chain.method,
        source=rel,
        msa_files=[_display(p, msa_dir) for p in used],
        msa_rejected=rejected,
        fingerprint=fingerprint,
    )
    cache.write_entry(out_dir, entry)
    notes += [f"MSA rejected: {reason}" for reason in rejected]
    row.update(reason="; ".join(notes), msa_depth=len(entry["msa"]), msa_files=";".join(entry["msa_files"]))
    row["_rejected"] = rejected
    return row


def _msa_folder(chain, chains, msa_dir: str | None) -> tuple[Path | None, str | None]:  # noqa: ANN001
    """This chain's MSA folder, else that of a chain of the same file with the identical sequence."""
    if msa_dir is None:
        return None, None
    own = Path(msa_dir) / chain.id
    if own.is_dir():
        return own, None
    for other in chains:
        if other is not chain and other.sequence == chain.sequence and (Path(msa_dir) / other.id).is_dir():
            return Path(msa_dir) / other.id, other.id
    return None, None


def _msa_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    from protfold.io.msa import find_msa_files

    return sorted(Path(p) for p in find_msa_files(folder))


def _load_msas(query: str, paths: list[Path], msa_dir: str | None) -> tuple[np.ndarray | None, np.ndarray | None, list[Path], list[str]]:
    """Merge the usable MSA files; a file the MSA reader rejects is dropped and the rest retried.

    Returns (msa int8 [N, L] or None, deletion_matrix int32 [N, L] or None, files used, rejection reasons).
    """
    from protfold.io.msa import load_msas

    remaining, rejected = list(paths), []
    while remaining:
        try:
            msa = load_msas(remaining, query)
        except ProtfoldInputError as exc:
            bad = next((p for p in remaining if os.path.samefile(p, exc.path)), None) if os.path.exists(exc.path) else None
            if bad is None:  # the error does not name one file: none of them can be trusted
                rejected += [f"{_display(p, msa_dir)}: {exc.reason}" for p in remaining]
                return None, None, [], rejected
            rejected.append(f"{_display(bad, msa_dir)}: {exc.reason}")
            remaining.remove(bad)
            continue
        ids = cache.msa_to_ids(list(msa.sequences), len(query))
        deletions = np.asarray(msa.deletion_matrix, dtype=np.int32)
        if not len(ids) or cache.msa_to_ids([query], len(query))[0].tolist() != ids[0].tolist():
            # row 0 must be the query; the MSA reader puts it first, but do not rely on it
            ids = np.concatenate([cache.msa_to_ids([query], len(query)), ids])
            deletions = np.concatenate([np.zeros((1, len(query)), np.int32), deletions])
        return ids, deletions, remaining, rejected
    return None, None, [], rejected


# ----------------------------------------------------------------------------------------------- rows


def _ok_row(rel: str, chain) -> dict[str, Any]:  # noqa: ANN001
    return {
        "file": rel,
        "id": chain.id,
        "chain": chain.chain_id,
        "status": OK,
        "reason": "",
        "length": len(chain.sequence),
        "observed": int(np.asarray(chain.observed).sum()),
        "msa_depth": 1,
        "msa_files": "",
        "method": chain.method,
        "resolution": "" if chain.resolution is None else f"{chain.resolution:.2f}",
    }


def _skip_row(rel: str, reason: str, chain=None) -> dict[str, Any]:  # noqa: ANN001
    row = dict.fromkeys(REPORT_COLUMNS, "")
    row.update(file=rel, status=SKIPPED, reason=reason)
    if chain is not None:
        row.update(id=chain.id, chain=chain.chain_id, length=len(chain.sequence))
    return row


def _write_report(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, delimiter="\t", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _one_line(v) if isinstance(v, str) else v for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def read_report(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a report.tsv as dicts of strings."""
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# ---------------------------------------------------------------------------------------------- small


def _one_line(value: Any) -> str:
    text = value if isinstance(value, str) else f"{type(value).__name__}: {value}"
    return " ".join(text.split())[:500]


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _display(path: Path, msa_dir: str | None) -> str:
    return path.relative_to(msa_dir).as_posix() if msa_dir is not None else path.name


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return max((s for s in STRUCTURE_SUFFIXES if name.endswith(s)), key=len)


def _name_key(path: Path) -> str:
    return path.name.lower()[: -len(_suffix(path))]


def _cores() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
