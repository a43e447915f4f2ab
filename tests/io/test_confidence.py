"""Confidence files of a prediction: the JSON layout viewers read, and the two PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from protfold.io.confidence import confidence_from_outputs, confidence_record, write_confidence

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 7


def _png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header; the file must start with the PNG signature and an IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_record_layout_and_rounding() -> None:
    rng = np.random.default_rng(0)
    plddt, pae = 100 * rng.random(N), 31.75 * rng.random((N, N))
    record = confidence_record("t", plddt, pae, 31.75, 0.123456)
    assert record["id"] == "t" and record["mean_plddt"] == pytest.approx(plddt.mean())
    rows = record["predicted_aligned_error"]
    assert len(rows) == N and all(len(row) == N for row in rows)
    np.testing.assert_allclose(np.asarray(rows), pae, atol=0.005 + 1e-12)
    assert all(round(v, 2) == v for row in rows for v in row)
    assert record["max_predicted_aligned_error"] == 31.75 and record["ptm"] == 0.1235
    assert set(confidence_record("t", plddt)) == {"id", "mean_plddt", "plddt"}


def test_from_outputs_reads_example_and_skips_without_head() -> None:
    import torch

    outputs = {"predicted_aligned_error": torch.rand(2, N, N, dtype=torch.float64),
               "max_predicted_aligned_error": torch.tensor(31.75), "ptm": torch.tensor([0.2, 0.7])}
    got = confidence_from_outputs(outputs, index=1)
    assert got["pae"].shape == (N, N) and got["pae"].dtype == np.float32
    np.testing.assert_allclose(got["pae"], outputs["predicted_aligned_error"][1].numpy(), rtol=1e-6)
    assert got["max_pae"] == 31.75 and got["ptm"] == pytest.approx(0.7)
    assert confidence_from_outputs({"plddt_logits": torch.zeros(1, N, 50)}) == {}


@pytest.mark.parametrize("with_pae", [True, False])
def test_write_confidence_files(tmp_path, with_pae: bool) -> None:
    rng = np.random.default_rng(1)
    pred = {"plddt": 100 * rng.random(N)}
    if with_pae:
        pred.update(pae=31.75 * rng.random((N, N)).astype(np.float32), max_pae=31.75, ptm=0.42)
    paths = write_confidence(tmp_path, "toy", pred)
    names = {"toy_confidence.json", "toy_plddt.png"} | ({"toy_pae.png"} if with_pae else set())
    assert {p.name for p in paths} == names == {p.name for p in tmp_path.iterdir()}  # no temporary files left
    record = json.loads((tmp_path / "toy_confidence.json").read_text())
    assert ("predicted_aligned_error" in record) == ("ptm" in record) == with_pae
    for png in (p for p in paths if p.suffix == ".png"):
        width, height = _png_size(png)
        assert width > 300 and height > 200


def test_long_target_pae_goes_to_a_compact_npz(tmp_path, monkeypatch) -> None:
    """Above PAE_JSON_MAX_RESIDUES the JSON names `<id>_pae.npz`: uint8 steps of 0.25 A (within 0.125 A)."""
    from protfold.io import confidence

    monkeypatch.setattr(confidence, "PAE_JSON_MAX_RESIDUES", 8)
    monkeypatch.setattr(confidence, "PLOT_MAX_CELLS", 4)  # the heat map is drawn from 4 x 4 block means
    rng = np.random.default_rng(1)
    n = 9
    pae = (31.75 * rng.random((n, n))).astype(np.float32)
    paths = write_confidence(tmp_path, "long", {"plddt": 100 * rng.random(n), "pae": pae, "max_pae": 31.75, "ptm": 0.5})
    assert sorted(p.name for p in paths) == ["long_confidence.json", "long_pae.npz", "long_pae.png", "long_plddt.png"]
    record = json.loads((tmp_path / "long_confidence.json").read_text())
    assert "predicted_aligned_error" not in record
    assert record["predicted_aligned_error_file"] == "long_pae.npz" and record["predicted_aligned_error_step"] == 0.25
    assert record["max_predicted_aligned_error"] == 31.75 and record["ptm"] == 0.5
    back = confidence.read_pae_npz(tmp_path / "long_pae.npz")
    assert back.shape == (n, n) and np.abs(back - pae).max() <= 0.125 + 1e-6
    assert np.load(tmp_path / "long_pae.npz")["pae"].dtype == np.uint8
    means = confidence._block_mean(pae, 4)  # 3 x 3 blocks of 3 residues
    assert means.shape == (3, 3) and means[0, 0] == pytest.approx(pae[:3, :3].mean())
