"""atomic_write: whole files or none, with the permissions the umask gives an ordinary file."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import numpy as np
import pytest

from protfold.data import cache
from protfold.io import atomic
from protfold.io.atomic import atomic_write, write_text_atomic
from protfold.io.writer import to_mmcif, to_pdb


@contextmanager
def _umask(mask: int):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_permissions(tmp_path, mask, expected):
    with _umask(mask):
        assert atomic._umask() == mask
        path = write_text_atomic(tmp_path / "sub" / "a.txt", "hello\n")
    assert path.read_text() == "hello\n"
    assert _mode(path) == expected


def test_structures_and_cache_entries_are_readable_by_others(tmp_path):
    """Predicted structures and prepared entries were written 0600 (mkstemp's mode) under umask 022."""
    n = 3
    chain = type("Chain", (), dict(id="t1", aatype=np.zeros(n, np.int64), atom_positions=np.ones((n, 37, 3)),
                                   atom_mask=np.zeros((n, 37)), residue_index=np.arange(n)))()
    chain.atom_mask[:, :3] = 1
    entry = cache.make_entry(
        entry_id="t1_A", sequence="GGG", aatype=np.full(n, 7), all_atom_positions=chain.atom_positions,
        all_atom_mask=chain.atom_mask, residue_index=np.arange(n), resolution=2.0,
        msa=cache.msa_to_ids(["GGG"], n), deletion_matrix=np.zeros((1, n), np.int32), method="X-RAY DIFFRACTION",
        source="t1.cif", msa_files=[], fingerprint="f",
    )
    with _umask(0o022):
        written = [to_pdb(chain, tmp_path / "t1.pdb"), to_mmcif(chain, tmp_path / "t1.cif"),
                   cache.write_entry(tmp_path / "cache", entry)]
    assert [_mode(path) for path in written] == [0o644] * 3


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write("new, half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_binary_mode_and_bad_mode(tmp_path):
    with atomic_write(tmp_path / "b.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "c", "a"):
            pass
