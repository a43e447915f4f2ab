"""`protfold predict`: sequences (FASTA, a folder of FASTA, or a prepared cache) -> PDB, mmCIF, confidence."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from protfold import constants as rc
from protfold.config import DataConfig, MemoryConfig
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.data.targets import Target
from protfold.errors import ProtfoldInputError
from protfold.io.confidence import confidence_from_outputs, write_confidence
from protfold.io.writer import to_mmcif, to_pdb
from protfold.metrics import plddt_from_logits

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_target(module, target: Target, *, device: torch.device, data: DataConfig) -> dict:
    """Run the model (EMA weights, inference memory settings) on one target; returns arrays for writing."""
    raw = target.entry()
    length = len(raw["aatype"])
    cfg = replace(data, crop_size=max(length, 1))  # prediction never crops
    example = make_example(raw, cfg, seed=0, train=False)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate([example]).items()}
    outputs = module.model(batch, n_recycles=module.model_cfg.eval_recycles, memory=module.inference_memory)
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
    """Write `<out_dir>/<target_id>/<target_id>.pdb|.cif|_confidence.json`; returns the PDB path."""
    folder = out_dir / target_id
    if folder.resolve().parent != out_dir.resolve():  # ids are made safe file names (safe_id); never trust one
        raise ProtfoldInputError(folder, f"output of {target_id!r} would be outside {out_dir}")
    chain = SimpleNamespace(chain_id="A", id=target_id,
                            **{k: pred[k] for k in ("aatype", "atom_positions", "atom_mask", "residue_index")})
    b_factors = pred["plddt"]  # pLDDT on the 0-100 scale, i.e. pLDDT x 100
    pdb = to_pdb(chain, folder / f"{target_id}.pdb", b_factors=b_factors)
    to_mmcif(chain, folder / f"{target_id}.cif", b_factors=b_factors)
    write_confidence(folder, target_id, pred)  # <id>_confidence.json, <id>_plddt.png and <id>_pae.png
    return pdb


@dataclass
class PredictReport:
    """What a run did: PDB files written, targets skipped because their outputs exist, targets that failed."""

    written: list[Path] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "<id>: <reason>"


def run_predict(*, ckpt_path: str, targets: list[Target], out: str, overwrite: bool = False,
                device: str | None = None, memory: MemoryConfig | None = None,
                max_msa_clusters: int = 128, max_extra_msa: int = 1024,
                model_config: str | None = None) -> PredictReport:
    """Predict every target (`protfold.data.targets.collect_targets`); skip those whose outputs exist unless
    `overwrite`. `ckpt_path` is a protfold checkpoint or AF2 / OpenFold weights, for the model `model_config`
    names (see `load_module`); it is checked before the model is built. A target whose MSA cannot be used
    fails alone (reported)."""
    from protfold.train.module import load_module

    out_dir = Path(out)
    todo = [t for t in targets if overwrite or not (out_dir / t.id / f"{t.id}.pdb").exists()]
    report = PredictReport(existing=[t.id for t in targets if t not in todo])
    for target_id in report.existing:
        log.info("%s: %s exists, skipped (use --overwrite)", target_id, out_dir / target_id / f"{target_id}.pdb")
    if not todo:
        return report
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load_module(ckpt_path, map_location=dev, model_config=model_config)
    module.eval().to(dev)
    if memory is not None:
        module.inference_memory = memory
    data = DataConfig(max_msa_clusters=max_msa_clusters, max_extra_msa=max_extra_msa)
    module.on_predict_epoch_start()
    try:
        for target in todo:
            try:
                pred = predict_target(module, target, device=dev, data=data)
            except ProtfoldInputError as err:
                log.error("%s: skipped: %s", target.id, err)
                report.failed.append(f"{target.id}: {err}")
                continue
            report.written.append(write_prediction(out_dir, target.id, pred))
            log.info("%s: wrote %s", target.id, report.written[-1])
    finally:
        module.on_predict_epoch_end()
    return report
