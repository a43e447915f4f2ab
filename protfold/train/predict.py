"""`protfold predict`: sequences (FASTA, a folder of FASTA, or a prepared cache) -> PDB, mmCIF, confidence."""

from __future__ import annotations

import contextlib
import logging
import time
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
from protfold.io.writer import PDBFormatLimitError, to_mmcif, to_pdb
from protfold.metrics import plddt_from_logits
from protfold.model.inference_plan import available_host_bytes, plan_inference

log = logging.getLogger(__name__)


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def memory_budget_bytes(device: torch.device, budget_gib: float | None = None) -> int:
    """The bytes a plan may use: `budget_gib` if given, else the card's free memory (`torch.cuda.mem_get_info`,
    after releasing the allocator's cache), else on the CPU the host's available memory."""
    if budget_gib is not None:
        return int(budget_gib * 2**30)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_bytes()


def plan_memory(module, batch: dict, *, device: torch.device, budget_gib: float | None, precision: str,
                target_id: str, attention: str | None = None) -> str:
    """Plan the inference memory for this batch's shapes (`plan_inference`), make it the module's inference
    memory (what it passes to the model), return the plan's one-line description. `attention`: the kernel every
    plan runs (default naive; the planner counts the Triton kernel's transients, and the naive kernel's logits for
    the others)."""
    n_seq, n_res = batch["msa_feat"].shape[-3:-1]
    n_extra = batch["extra_msa_feat"].shape[-3]
    # on the CPU the "device" is the host: an edge moved to host memory would save nothing, so no such plans
    mem, _, text = plan_inference(n_res, n_seq, n_extra, memory_budget_bytes(device, budget_gib),
                                  module.model_cfg, _PRECISIONS[precision],
                                  host_bytes=0 if device.type == "cpu" else None, attention=attention or "naive")
    module.inference_memory = mem
    return f"{target_id}: memory plan: {text}"


@torch.no_grad()
def predict_target(module, target: Target, *, device: torch.device, data: DataConfig, plan: bool = False,
                   budget_gib: float | None = None, precision: str = "fp32", attention: str | None = None) -> dict:
    """Run the model (EMA weights, inference memory settings) on one target; returns arrays for writing.
    `plan`: choose the memory settings for this target's shapes first (`plan_memory`; printed).
    `precision` "bf16": under bf16 autocast (CUDA)."""
    raw = target.entry()
    length = len(raw["aatype"])
    cfg = replace(data, crop_size=max(length, 1))  # prediction never crops
    example = make_example(raw, cfg, seed=0, train=False)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate([example]).items()}
    if plan:
        text = plan_memory(module, batch, device=device, budget_gib=budget_gib, precision=precision,
                           target_id=target.id, attention=attention)
        print(f"protfold predict: {text}", flush=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
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
    """Write `<out_dir>/<target_id>/<target_id>.cif|.pdb|_confidence.json`; returns the mmCIF path. The mmCIF is
    written first and always; a structure the PDB format cannot hold (`PDBFormatLimitError`) gets no PDB file,
    logged in one line."""
    folder = out_dir / target_id
    if folder.resolve().parent != out_dir.resolve():  # ids are made safe file names (safe_id); never trust one
        raise ProtfoldInputError(folder, f"output of {target_id!r} would be outside {out_dir}")
    chain = SimpleNamespace(chain_id="A", id=target_id,
                            **{k: pred[k] for k in ("aatype", "atom_positions", "atom_mask", "residue_index")})
    b_factors = pred["plddt"]  # pLDDT on the 0-100 scale, i.e. pLDDT x 100
    cif = to_mmcif(chain, folder / f"{target_id}.cif", b_factors=b_factors)
    try:
        to_pdb(chain, folder / f"{target_id}.pdb", b_factors=b_factors)
    except PDBFormatLimitError as err:
        log.warning("%s", err)
    write_confidence(folder, target_id, pred)  # <id>_confidence.json, <id>_plddt.png, <id>_pae.png (+ _pae.npz)
    return cif


@dataclass
class PredictReport:
    """What a run did: PDB files written, targets skipped because their outputs exist, targets that failed."""

    written: list[Path] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "<id>: <reason>"


def run_predict(*, ckpt_path: str, targets: list[Target], out: str, overwrite: bool = False,
                device: str | None = None, memory: MemoryConfig | None = None,
                max_msa_clusters: int = 128, max_extra_msa: int = 1024,
                model_config: str | None = None, memory_budget_gib: float | None = None,
                precision: str = "fp32", attention: str | None = None) -> PredictReport:
    """Predict every target (`protfold.data.targets.collect_targets`); skip those whose outputs exist unless
    `overwrite`. `ckpt_path` is a protfold checkpoint or AF2 / OpenFold weights, for the model `model_config`
    names (see `load_module`); it is checked before the model is built. A target whose MSA cannot be used
    fails alone (reported). Without `memory`, each target's memory settings are planned from its shapes and
    the free memory of the device (or `memory_budget_gib`) by `plan_inference`, and the plan is printed.
    `precision`: "fp32" or "bf16" (autocast). `attention`: the attention kernel, in the planned memory or in
    `memory`. Each target's time (and, on CUDA, peak memory) is logged."""
    from protfold.train.module import load_module

    out_dir = Path(out)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    if memory is not None and memory.pair_storage == "bf16" and precision != "bf16":
        raise ValueError("the inference memory's pair_storage 'bf16' keeps z in bf16, which only bf16 autocast reads: "
                         "add --precision bf16 or set pair_storage: fp32")
    # the mmCIF is written for every target (a PDB file only where the format holds the structure)
    todo = [t for t in targets if overwrite or not (out_dir / t.id / f"{t.id}.cif").exists()]
    report = PredictReport(existing=[t.id for t in targets if t not in todo])
    for target_id in report.existing:
        log.info("%s: %s exists, skipped (use --overwrite)", target_id, out_dir / target_id / f"{target_id}.cif")
    if not todo:
        return report
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load_module(ckpt_path, map_location=dev, model_config=model_config)
    module.eval().to(dev)
    if memory is not None:
        module.inference_memory = memory if attention is None else replace(memory, attention=attention)
    data = DataConfig(max_msa_clusters=max_msa_clusters, max_extra_msa=max_extra_msa)
    module.on_predict_epoch_start()
    try:
        for target in todo:
            try:
                start = time.perf_counter()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                pred = predict_target(module, target, device=dev, data=data, plan=memory is None,
                                      budget_gib=memory_budget_gib, precision=precision, attention=attention)
                peak = f", peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""
                print(f"protfold predict: {target.id}: {len(pred['aatype'])} residues in "
                      f"{time.perf_counter() - start:.1f} s{peak}", flush=True)
            except ProtfoldInputError as err:
                log.error("%s: skipped: %s", target.id, err)
                report.failed.append(f"{target.id}: {err}")
                continue
            report.written.append(write_prediction(out_dir, target.id, pred))
            log.info("%s: wrote %s", target.id, report.written[-1])
    finally:
        module.on_predict_epoch_end()
    return report
