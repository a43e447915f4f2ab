"""The prepared cache: round trip, compact dtypes, corrupt files, atomic writes under interruption."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from protfold import constants as rc
from protfold.data import cache, prepare
from protfold.errors import ProtfoldInputError

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
SPEC_KEYS = {
    "id", "sequence", "aatype", "all_atom_positions", "all_atom_mask", "residue_index", "resolution", "msa",
    "deletion_matrix",
}
META_KEYS = {"method", "source", "msa_files", "msa_rejected", "fingerprint"}


def _entry(entry_id: str = "9xyz_B", length: int = 7, n_msa: int = 3, seed: int = 0, max_deletion: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWYX"), size=length))
    msa = rng.integers(0, rc.msa_gap_index + 1, size=(n_msa, length)).astype(np.int8)
    msa[0] = cache.msa_to_ids([sequence], length)[0]
    return cache.make_entry(
        entry_id=entry_id,
        sequence=sequence,
        aatype=rc.sequence_to_aatype(sequence),
        all_atom_positions=rng.normal(size=(length, 37, 3)).astype(np.float32),
        all_atom_mask=(rng.random((length, 37)) < 0.5).astype(np.float32),
        residue_index=np.arange(length),
        resolution=1.8,
        msa=msa,
        deletion_matrix=rng.integers(0, max_deletion + 1, size=(n_msa, length)).astype(np.int32),
        method="X-RAY DIFFRACTION",
        source="mmcif/9xyz.cif",
        msa_files=["9xyz_B/a.a3m"],
        fingerprint=f"seed{seed}",
    )


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray) or np.isscalar(a[key]) and not isinstance(a[key], str):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
            assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("max_deletion", [5, 300, 70_000])
def test_round_trip_keeps_values_and_dtypes(tmp_path: Path, max_deletion: int) -> None:
    entry = _entry(max_deletion=max_deletion)
    path = cache.write_entry(tmp_path, entry)
    assert path == tmp_path / "9xyz_B.npz"
    got = cache.read_entry(path)
    _assert_same(entry, got)
    assert SPEC_KEYS | META_KEYS == set(got)
    expected = {
        "aatype": np.int64, "all_atom_positions": np.float32, "all_atom_mask": np.float32,
        "residue_index": np.int64, "msa": np.int8, "deletion_matrix": np.int32, "resolution": np.float32,
    }
    for key, dtype in expected.items():
        assert np.asarray(got[key]).dtype == dtype, key
    with np.load(path, allow_pickle=False) as npz:  # compact on disk, no pickled objects
        assert npz["all_atom_mask"].dtype == np.uint8
        assert npz["deletion_matrix"].dtype.itemsize <= (1 if max_deletion < 256 else 2 if max_deletion < 65536 else 4)


def test_query_alone_without_msa_and_nan_resolution(tmp_path: Path) -> None:
    entry = cache.make_entry(
        entry_id="1abc_A", sequence="MKVB", aatype=rc.sequence_to_aatype("MKVB"),
        all_atom_positions=np.zeros((4, 37, 3)), all_atom_mask=np.zeros((4, 37)), residue_index=np.arange(4),
        resolution=None,
    )
    got = cache.read_entry(cache.write_entry(tmp_path, entry))
    assert got["msa"].shape == (1, 4) and got["deletion_matrix"].shape == (1, 4)
    assert got["msa"][0].tolist() == [rc.msa_letter_to_id(c) for c in "MKVB"]
    assert np.isnan(got["resolution"])


def test_msa_to_ids_matches_constants() -> None:
    rows = ["AC-XBZUO", "wy-ghkmn"]
    ids = cache.msa_to_ids(rows, 8)
    assert ids.dtype == np.int8
    assert ids.tolist() == [[rc.msa_letter_to_id(c) for c in r.upper()] for r in rows]


def test_shape_mismatch_is_rejected(tmp_path: Path) -> None:
    entry = _entry()
    entry["msa"] = entry["msa"][:, :-1]
    with pytest.raises(ProtfoldInputError, match="msa"):
        cache.write_entry(tmp_path, entry)


@pytest.mark.parametrize("damage", ["empty", "half", "garbage", "not_npz_entry", "one_byte_short"])
def test_corrupt_entries_raise_input_error(tmp_path: Path, damage: str) -> None:
    path = cache.write_entry(tmp_path, _entry())
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "half":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "one_byte_short":
        path.write_bytes(data[:-1])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        np.savez(path, something=np.zeros(3))
    with pytest.raises(ProtfoldInputError) as info:
        cache.read_entry(path)
    assert info.value.path == str(path)
    assert "\n" not in info.value.reason


def test_missing_entry_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(ProtfoldInputError, match="does not exist"):
        cache.read_entry(tmp_path / "nope.npz")


def _interrupt_mid_write(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """np.savez_compressed writes part of the zip, then the 'crash' happens."""
    real = np.savez_compressed

    def partial(handle, **arrays):  # noqa: ANN001
        real(handle, **{k: arrays[k] for k in list(arrays)[:4]})
        raise exc

    monkeypatch.setattr(cache.np, "savez_compressed", partial)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_interrupted_write_keeps_previous_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc) -> None:  # noqa: ANN001
    old = _entry(seed=1)
    path = cache.write_entry(tmp_path, old)
    _interrupt_mid_write(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cache.write_entry(tmp_path, _entry(seed=2))
    with pytest.raises(type(exc)):
        cache.write_entry(tmp_path, _entry(entry_id="1new_A", seed=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["9xyz_B.npz"]  # no temporary, no partial new entry
    _assert_same(old, cache.read_entry(path))
    assert cache.list_entries(tmp_path) == ["9xyz_B"]


def test_failed_rename_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(src, dst):  # noqa: ANN001
        raise OSError("rename failed")

    monkeypatch.setattr(cache.os, "replace", fail)
    with pytest.raises(OSError):
        cache.write_entry(tmp_path, _entry())
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_ignored_and_removed(tmp_path: Path) -> None:
    cache.write_entry(tmp_path, _entry())
    stale = [tmp_path / ".9xyz_B.npz.k2j4.tmp", tmp_path / ".tmp-9xyz_B-abc.part"]  # this and older versions
    for path in stale:
        path.write_bytes(b"PK\x03\x04half")
    assert cache.list_entries(tmp_path) == ["9xyz_B"]
    assert cache.remove_stale_temporaries(tmp_path) == 2
    assert not any(path.exists() for path in stale)


def test_prepare_interrupted_mid_run_leaves_complete_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the third entry write of a run: earlier entries stay whole, the rest is redone."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("1a8o.cif", "1a7g.cif", "1aki.cif", "3zee.cif"):
        shutil.copy(SAMPLES / "mmcif" / name, inputs / name)
    out = tmp_path / "cache"
    real = np.savez_compressed
    calls = {"n": 0}

    def flaky(handle, **arrays):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 3:
            real(handle, **{k: arrays[k] for k in list(arrays)[:3]})
            raise KeyboardInterrupt
        real(handle, **arrays)

    monkeypatch.setattr(cache.np, "savez_compressed", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(inputs, out, workers=1, progress=False)
    done = cache.list_entries(out)
    assert len(done) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for entry_id in done:
        cache.read_entry(out / f"{entry_id}.npz")
    monkeypatch.setattr(cache.np, "savez_compressed", real)
    report = prepare.prepare(inputs, out, workers=1, progress=False)
    assert report.n_ok == 4 and report.n_cached == 2
    with zipfile.ZipFile(out / f"{done[0]}.npz") as zf:
        assert zf.testzip() is None
