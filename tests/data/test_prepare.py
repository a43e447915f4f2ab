"""`prepare` over the shipped samples and over samples mixed with bad files."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from protfold import constants as rc
from protfold.data import cache, prepare

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "data" / "samples"


def _manifest() -> list[dict[str, str]]:
    with open(SAMPLES_DIR / "MANIFEST.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _rows_by_id(cache_dir: Path) -> dict[str, dict[str, str]]:
    rows = prepare.read_report(cache_dir / "report.tsv")
    assert set(prepare.REPORT_COLUMNS) <= set(rows[0])
    return {r["id"]: r for r in rows if r["id"]}


def test_samples_prepare_within_a_minute(prepared_samples) -> None:  # noqa: ANN001
    assert prepared_samples.returncode == 0, prepared_samples.stderr
    assert prepared_samples.elapsed_s < 60, f"prepare took {prepared_samples.elapsed_s:.1f} s"
    assert "Traceback" not in prepared_samples.stderr
    assert "0 skipped" in prepared_samples.stdout and "report.tsv" in prepared_samples.stdout


def test_report_matches_manifest(prepared_samples) -> None:  # noqa: ANN001
    rows = _rows_by_id(prepared_samples.cache_dir)
    manifest = _manifest()
    structures = [m for m in manifest if m["kind"] == "structure"]
    with_msa = {f"{m['id']}_{m['chain']}" for m in manifest if m["kind"] == "msa"}
    assert len(structures) == 26
    for m in structures:
        entry_id = f"{m['id']}_{m['chain']}"
        row = rows[entry_id]
        assert row["status"] == "ok", row
        assert row["file"] == m["file"]
        assert int(row["length"]) == int(m["length"]), entry_id
        assert int(row["observed"]) == int(m["observed_residues"]), entry_id
        if entry_id in with_msa:
            assert int(row["msa_depth"]) > 1, entry_id
        else:
            assert int(row["msa_depth"]) == 1, entry_id
    # every protein chain is an entry (5yh2 C, homodimer partners, ...), and all are readable
    assert {"5yh2_C", "2q2k_B", "3u8v_B", "4zhl_P"} <= set(rows)
    assert all(r["status"] == "ok" for r in rows.values())
    assert sorted(rows) == cache.list_entries(prepared_samples.cache_dir)


@pytest.mark.parametrize("entry_id", ["1psm_A", "721p-assembly1_A", "2q2k_A", "5yh2_C", "2d0f_A"])
def test_entries_hold_what_the_report_says(prepared_samples, entry_id: str) -> None:  # noqa: ANN001
    row = _rows_by_id(prepared_samples.cache_dir)[entry_id]
    entry = cache.read_entry(prepared_samples.cache_dir / f"{entry_id}.npz")
    length = int(row["length"])
    assert entry["id"] == entry_id and len(entry["sequence"]) == length
    assert entry["all_atom_positions"].shape == (length, 37, 3)
    assert int(entry["all_atom_mask"].any(-1).sum()) == int(row["observed"])
    assert entry["msa"].shape == (int(row["msa_depth"]), length) == entry["deletion_matrix"].shape
    assert entry["msa"][0].tolist() == [rc.msa_letter_to_id(c) for c in entry["sequence"]]
    assert entry["deletion_matrix"][0].sum() == 0
    assert entry["msa"].min() >= 0 and entry["msa"].max() <= rc.msa_gap_index
    assert entry["source"] == row["file"]


def test_homomer_partner_borrows_msa(prepared_samples) -> None:  # noqa: ANN001
    rows = _rows_by_id(prepared_samples.cache_dir)
    assert rows["2q2k_B"]["msa_depth"] == rows["2q2k_A"]["msa_depth"]
    assert "2q2k_A" in rows["2q2k_B"]["reason"]


def test_rerun_skips_finished_entries(prepared_samples, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "cache"
    shutil.copytree(prepared_samples.cache_dir, out)
    (out / "1aki_A.npz").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    report = prepare.prepare(SAMPLES_DIR, out, msa_dir=SAMPLES_DIR / "msas", workers=2, progress=False)
    rows = {r["id"]: r for r in report.rows}
    assert rows["1aki_A"]["status"] == "ok" and rows["1aki_A"]["reason"] == ""
    assert all(r["reason"] == "cached" for k, r in rows.items() if k != "1aki_A")
    assert report.n_cached == len(rows) - 1 and report.n_skipped == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in stamps} == stamps
    # a changed MSA folder invalidates the cached entry (here: no MSA directory at all)
    report = prepare.prepare(SAMPLES_DIR, out, workers=2, progress=False)
    rows = {r["id"]: r for r in report.rows}
    assert rows["1psm_A"]["reason"] == "" and rows["1psm_A"]["msa_depth"] == 1
    assert rows["1aki_A"]["reason"] == "cached"


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory, prepare_kit):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs, msas = prepare_kit.make_bad_input_tree(root)
    report = prepare.prepare(inputs, root / "cache", msa_dir=msas, workers=2, progress=False)
    return report


def test_bad_structure_files_are_skipped_with_reason(bad_run, prepare_kit) -> None:  # noqa: ANN001
    skipped = {r["file"]: r for r in bad_run.rows if r["status"] == "skipped"}
    assert set(skipped) == set(prepare_kit.bad_structures)
    for name, row in skipped.items():
        assert row["reason"].startswith(f"{name}: "), row
        assert "\n" not in row["reason"] and "Traceback" not in row["reason"]
    assert "truncat" in skipped["bad/truncated.cif"]["reason"]
    assert "empty" in skipped["bad/empty.cif"]["reason"]
    assert "protein" in skipped["bad/dnaonly.pdb"]["reason"]
    assert bad_run.n_ok == 40  # the real samples are all still prepared
    assert bad_run.succeeded and not prepare.PrepareReport(bad_run.rows, bad_run.report_path, 0, True, bad_run.msa_rejections).succeeded


def test_bad_msa_files_are_rejected_and_others_kept(bad_run, prepare_kit) -> None:  # noqa: ANN001
    rows = {r["id"]: r for r in bad_run.rows}
    for rel in prepare_kit.bad_msas:
        entry_id = rel.split("/")[0]
        assert rows[entry_id]["status"] == "ok"
        assert f"MSA rejected: {rel}: " in rows[entry_id]["reason"]
        assert rel not in rows[entry_id]["msa_files"]
    assert rows["1aki_A"]["msa_depth"] == 1
    assert rows["1psm_A"]["msa_depth"] > 1 and rows["1psm_A"]["msa_files"].count(";") == 2
    assert len(bad_run.msa_rejections) == 2
    on_disk = {r["id"]: r for r in prepare.read_report(bad_run.report_path)}
    assert "query" in on_disk["1aki_A"]["reason"] and "no sequence" in on_disk["1psm_A"]["reason"]


def test_nothing_prepared(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.cif").write_text("data_x\n#\n")
    report = prepare.prepare(tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert report.n_ok == 0 and report.n_skipped == 1 and not report.succeeded
    assert (tmp_path / "out" / "report.tsv").exists()


def test_find_structure_files_suffixes(tmp_path: Path) -> None:
    names = ["a.cif", "b.CIF.GZ", "c.pdb", "d.pdb.gz", "sub/e.ent", "sub/f.ent.gz", "g.txt", "h.a3m", ".hidden/i.cif"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in prepare.find_structure_files(tmp_path)]
    assert found == ["a.cif", "b.CIF.GZ", "c.pdb", "d.pdb.gz", "sub/e.ent", "sub/f.ent.gz"]


def test_same_structure_in_two_formats_is_prepared_once(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(SAMPLES_DIR / "pdb" / "6mrr.pdb", tmp_path / "in" / "6mrr.pdb")
    shutil.copy(SAMPLES_DIR / "pdb" / "6mrr.pdb", tmp_path / "in" / "6mrr.ent")
    report = prepare.prepare(tmp_path / "in", tmp_path / "out", workers=1, progress=False)
    assert [r["status"] for r in report.rows] == ["skipped", "ok"]
    assert "same structure as 6mrr.pdb" in report.rows[0]["reason"]
    assert np.isfinite(cache.read_entry(tmp_path / "out" / "6mrr_A.npz")["resolution"])
