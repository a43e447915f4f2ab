"""A prediction's confidence files: `<id>_confidence.json`, the PAE heat map and the per-residue pLDDT plot.

The JSON keeps protfold's `id`, `mean_plddt`, `plddt` (0-100 per residue) and, for a model with the predicted
aligned error head, adds the keys structure viewers read, named as the AlphaFold database and AlphaFold2's
`pae_json` name them: `predicted_aligned_error` (list of N rows of N values, A, 2 decimals; row i = aligned on
residue i, column j = scored residue j), `max_predicted_aligned_error` (A), and `ptm` (ColabFold's name).
The AlphaFold database wraps its object in a one-element list; ChimeraX's `alphafold pae` also reads a
top-level object with `predicted_aligned_error`, which is what this file is.

Long targets (more than `PAE_JSON_MAX_RESIDUES` residues: the JSON would hold N² values, 151 M at 12,288) get
the PAE in `<id>_pae.npz` instead: one array `pae` [N, N] of uint8 in steps of `PAE_NPZ_STEP` A (0.25 A; value
= round(PAE / 0.25), so within 0.125 A of the model's PAE; 31.75 A, the largest PAE, is 127), zip-compressed,
read back with `np.load(path)["pae"] * 0.25`; the JSON then names it under `predicted_aligned_error_file` (with
`predicted_aligned_error_step`) and keeps `max_predicted_aligned_error` and `ptm`. The plots of long targets are
drawn from a block-averaged PAE of at most `PLOT_MAX_CELLS` x `PLOT_MAX_CELLS` cells, so they take seconds.
Dimension names: N residues.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from protfold.io.atomic import atomic_write, write_text_atomic

__all__ = ["PAE_JSON_MAX_RESIDUES", "PAE_NPZ_STEP", "confidence_from_outputs", "confidence_record", "plot_pae",
           "plot_plddt", "read_pae_npz", "write_confidence", "write_pae_npz"]

PAE_JSON_MAX_RESIDUES = 2048  # above this the PAE goes to <id>_pae.npz (4.2 M values as JSON text: about 25 MB)
PAE_NPZ_STEP = 0.25  # A per uint8 step in <id>_pae.npz
PLOT_MAX_CELLS = 1024  # the PAE heat map is block-averaged down to at most this many cells a side

# AlphaFold's pLDDT bands (the colours of its database and ColabFold): very high, confident, low, very low
_PLDDT_BANDS = ((90, 100, "#0053d6", "very high"), (70, 90, "#65cbf3", "confident"), (50, 70, "#ffdb13", "low"),
                (0, 50, "#ff7d45", "very low"))


def confidence_from_outputs(outputs: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """`pae` [N, N] (numpy float32), `max_pae` and `ptm` (floats) of example `index` of a model's outputs
    (tensors or arrays), or {} when the outputs have no predicted aligned error (the head is off)."""
    if "predicted_aligned_error" not in outputs:
        return {}

    def array(value: Any) -> np.ndarray:
        value = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        return value.astype(np.float32)

    return {"pae": array(outputs["predicted_aligned_error"])[index],
            "max_pae": float(array(outputs["max_predicted_aligned_error"])),
            "ptm": float(array(outputs["ptm"])[index])}


def confidence_record(target_id: str, plddt: np.ndarray, pae: np.ndarray | None = None,
                      max_pae: float | None = None, ptm: float | None = None) -> dict[str, Any]:
    """The JSON object: plddt [N] (0-100); pae [N, N] (A), max_pae and ptm when the model predicts them."""
    record: dict[str, Any] = {"id": target_id, "mean_plddt": float(np.mean(plddt)),
                              "plddt": [round(float(x), 4) for x in plddt]}
    if pae is not None:
        record["predicted_aligned_error"] = np.round(np.asarray(pae, dtype=np.float64), 2).tolist()
        record["max_predicted_aligned_error"] = float(max_pae) if max_pae is not None else float(np.max(pae))
    if ptm is not None:
        record["ptm"] = round(float(ptm), 4)
    return record


def _canvas(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas, without pyplot (no global backend or figure state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_pae(pae: np.ndarray, path: Path | BinaryIO, *, max_pae: float, ptm: float | None = None,
             title: str = "") -> Path | BinaryIO:
    """Heat map of the predicted aligned error [N, N] (A), 0 (dark) to max_pae (white), as the AlphaFold
    database draws it; residues numbered from 1."""
    fig, ax = _canvas(5.6, 4.8)
    n = pae.shape[0]
    pae = _block_mean(np.asarray(pae, dtype=np.float32), PLOT_MAX_CELLS)
    image = ax.imshow(pae, cmap="Greens_r", vmin=0.0, vmax=max_pae, extent=(0.5, n + 0.5, n + 0.5, 0.5))
    fig.colorbar(image, ax=ax, label="expected position error (Å)")
    ax.set_xlabel("scored residue")
    ax.set_ylabel("aligned residue")
    ax.set_title(f"{title} predicted aligned error" + (f", pTM {ptm:.3f}" if ptm is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def plot_plddt(plddt: np.ndarray, path: Path | BinaryIO, *, title: str = "") -> Path | BinaryIO:
    """pLDDT (0-100) per residue, numbered from 1, over AlphaFold's four confidence bands."""
    fig, ax = _canvas(6.4, 3.2)
    residues = np.arange(1, len(plddt) + 1)
    for low, high, colour, name in _PLDDT_BANDS:
        ax.axhspan(low, high, color=colour, alpha=0.25, lw=0, label=name)
    ax.plot(residues, plddt, color="black", lw=1.2)
    ax.set_xlim(0.5, len(plddt) + 0.5)
    ax.set_ylim(0, 100)
    ax.set_xlabel("residue")
    ax.set_ylabel("pLDDT")
    ax.set_title(f"{title} pLDDT, mean {float(np.mean(plddt)):.1f}")
    ax.legend(loc="lower right", fontsize=7, ncols=4, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _block_mean(pae: np.ndarray, cells: int) -> np.ndarray:
    """pae [N, N] averaged over square blocks of ceil(N / cells) residues (the last block may be smaller): at most
    cells x cells values, for plotting; returned unchanged when N <= cells."""
    n = pae.shape[0]
    k = -(-n // cells)
    if k == 1:
        return pae
    m = -(-n // k)
    padded = np.full((m * k, m * k), np.nan, dtype=np.float32)
    padded[:n, :n] = pae
    return np.nanmean(padded.reshape(m, k, m, k), axis=(1, 3))


def write_pae_npz(path: Path, pae: np.ndarray) -> Path:
    """`pae` [N, N] (A) as uint8 steps of PAE_NPZ_STEP A (rounded to the nearest step, clipped to 0..255), zip-compressed."""
    steps = np.clip(np.rint(np.asarray(pae, dtype=np.float32) / PAE_NPZ_STEP), 0, 255).astype(np.uint8)
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, pae=steps)
    return path


def read_pae_npz(path: Path) -> np.ndarray:
    """The PAE [N, N] (A, float32) of a `<id>_pae.npz` written by `write_confidence`."""
    with np.load(path) as data:
        return data["pae"].astype(np.float32) * PAE_NPZ_STEP


def write_confidence(folder: Path, target_id: str, pred: Mapping[str, Any]) -> list[Path]:
    """Write `<id>_confidence.json` and `<id>_plddt.png`, and `<id>_pae.png` when `pred` has `pae` (with
    `max_pae` and `ptm`, as `confidence_from_outputs` gives them); `pred["plddt"]` [N] is 0-100. Each file is
    written atomically (protfold.io.atomic). Returns the paths written."""
    plddt = np.asarray(pred["plddt"])
    pae = pred.get("pae")
    long_pae = pae is not None and len(plddt) > PAE_JSON_MAX_RESIDUES
    record = confidence_record(target_id, plddt, None if long_pae else pae, pred.get("max_pae"), pred.get("ptm"))
    paths = [folder / f"{target_id}_confidence.json", folder / f"{target_id}_plddt.png"]
    if long_pae:  # N² values: uint8 steps in a compressed .npz beside the JSON (module docstring)
        npz = write_pae_npz(folder / f"{target_id}_pae.npz", pae)
        record["predicted_aligned_error_file"] = npz.name
        record["predicted_aligned_error_step"] = PAE_NPZ_STEP
        record["max_predicted_aligned_error"] = float(pred["max_pae"]) if pred.get("max_pae") is not None \
            else float(np.max(pae))
    # compact: a PAE matrix of a long chain has millions of values, one per line with indentation
    write_text_atomic(paths[0], json.dumps(record, separators=(",", ":")))
    if long_pae:
        paths.append(folder / f"{target_id}_pae.npz")
    with atomic_write(paths[1], "wb") as handle:
        plot_plddt(plddt, handle, title=target_id)
    if pae is not None:
        paths.append(folder / f"{target_id}_pae.png")
        with atomic_write(paths[-1], "wb") as handle:
            plot_pae(np.asarray(pae), handle, max_pae=record["max_predicted_aligned_error"], ptm=pred.get("ptm"),
                     title=target_id)
    return paths
