"""`protfold predict`: sequences (FASTA, a folder of FASTA, or a prepared cache) -> PDB, mmCIF, confidence."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from protfold import constants as rc
from protfold.config import DataConfig, MemoryConfig
from protfold.data.cache import list_entries, msa_to_ids, read_entry
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.errors import ProtfoldInputError
from protfold.io.confidence import confidence_from_outputs, write_confidence
from protfold.io.msa import find_msa_files, load_msas
from protfold.io.writer import to_mmcif, to_pdb
from protfold.metrics import plddt_from_logits

log = logging.getLogger(__name__)
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")


@dataclass
class Target:
    id: str
    raw: dict  # a cache-style entry (see protfold.data.cache)


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """(id, sequence) records of a FASTA file; the id is the first word of the header."""
    records: list[tuple[str, list[str]]] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ProtfoldInputError(path, f"cannot read FASTA: {err}") from None
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(">"):
            name = line[1:].split()[0] if line[1:].split() else ""
            if not name:
                raise ProtfoldInputError(path, f"line {line_no}: FASTA header without a name")
            records.append((name, []))
        elif not records:
            raise ProtfoldInputError(path, f"line {line_no}: sequence before the first '>' header")
        else:
            records[-1][1].append(line.upper())
    out = [(name, "".join(parts)) for name, parts in records]
    for name, seq in out:
        bad = sorted(set(seq) - set(rc.restypes_with_x))
        if not seq or bad:
            raise ProtfoldInputError(path, f"record {name!r}: " + (f"letters {bad} are not amino acids" if bad else "empty sequence"))
    if not out:
        raise ProtfoldInputError(path, "no FASTA records")
    return out


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


def iter_targets(source: str | os.PathLike[str], msa_dir: str | os.PathLike[str] | None = None) -> Iterator[Target]:
    """FASTA file, folder of FASTA files, or a prepared cache folder (`*.npz` entries)."""
    source = Path(source)
    msa_path = Path(msa_dir) if msa_dir else None
    if source.is_dir() and list_entries(source):
        for entry_id in list_entries(source):
            yield Target(entry_id, read_entry(source / f"{entry_id}.npz"))
        return
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in FASTA_SUFFIXES) if source.is_dir() else [source]
    if not files:
        raise ProtfoldInputError(source, "no FASTA files (.fasta, .fa, .faa, .fas) and no prepared entries")
    for path in files:
        if not path.exists():
            raise ProtfoldInputError(path, "no such file")
        for name, seq in read_fasta(path):
            yield Target(name, _sequence_entry(name, seq, msa_path))


@torch.no_grad()
def predict_target(module, target: Target, *, device: torch.device, data: DataConfig) -> dict:
    """Run the model (EMA weights, inference memory settings) on one target; returns arrays for writing."""
    length = len(target.raw["aatype"])
    cfg = replace(data, crop_size=max(length, 1))  # prediction never crops
    example = make_example(target.raw, cfg, seed=0, train=False)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate([example]).items()}
    outputs = module.model(batch, n_recycles=module.model_cfg.eval_recycles)
    plddt = plddt_from_logits(outputs["plddt_logits"].float())[0].cpu().numpy()  # 0..100
    aatype = batch["aatype"][0].cpu().numpy()
    return {
        "aatype": aatype,
        "atom_positions": outputs["final_atom37"][0].float().cpu().numpy(),
        "atom_mask": rc.restype_atom37_mask[aatype],
        "residue_index": batch["residue_index"][0].cpu().numpy(),
        "plddt": plddt,
        **confidence_from_outputs(outputs),  # pae, max_pae, ptm: with the predicted aligned error head
    }


def write_prediction(out_dir: Path, target_id: str, pred: dict) -> Path:
    folder = out_dir / target_id
    chain = SimpleNamespace(chain_id="A", **{k: pred[k] for k in ("aatype", "atom_positions", "atom_mask", "residue_index")})
    b_factors = pred["plddt"]  # pLDDT on the 0-100 scale, i.e. pLDDT x 100
    pdb = to_pdb(chain, folder / f"{target_id}.pdb", b_factors=b_factors)
    to_mmcif(chain, folder / f"{target_id}.cif", b_factors=b_factors)
    write_confidence(folder, target_id, pred)  # <id>_confidence.json, <id>_plddt.png and <id>_pae.png
    return pdb


def run_predict(*, ckpt_path: str, source: str, out: str, msa_dir: str | None = None, overwrite: bool = False,
                device: str | None = None, memory: MemoryConfig | None = None,
                max_msa_clusters: int = 128, max_extra_msa: int = 1024, model_config: str | None = None) -> list[Path]:
    """Predict every target; skip those whose outputs exist unless `overwrite`. Returns written PDB paths.
    `ckpt_path` may also be AF2 / OpenFold weights, for the model `model_config` names (see `load_module`)."""
    from protfold.train.module import load_module

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not Path(ckpt_path).is_file():
        raise ProtfoldInputError(ckpt_path, "checkpoint not found")
    module = load_module(ckpt_path, map_location=dev, model_config=model_config)
    module.eval().to(dev)
    if memory is not None:
        module.inference_memory = memory
    data = DataConfig(max_msa_clusters=max_msa_clusters, max_extra_msa=max_extra_msa)
    written: list[Path] = []
    out_dir = Path(out)
    module.on_predict_epoch_start()
    try:
        for target in iter_targets(source, msa_dir):
            pdb = out_dir / target.id / f"{target.id}.pdb"
            if pdb.exists() and not overwrite:
                log.info("%s: %s exists, skipped (use --overwrite)", target.id, pdb)
                continue
            written.append(write_prediction(out_dir, target.id, predict_target(module, target, device=dev, data=data)))
            log.info("%s: wrote %s", target.id, written[-1])
    finally:
        module.on_predict_epoch_end()
    return written
