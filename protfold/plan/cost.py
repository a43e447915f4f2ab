"""A training step's peak memory and time per memory preset, predicted from the run's shapes.

The model follows what a step holds and does, with a few coefficients per preset fitted to the measured H200
bench records (`protfold.plan.fit`, table in `protfold/resources/cost_model.json`):

    peak = resident + sum_k a_k * P_k(shape)          resident: weights, gradients, optimizer state, EMA
    time = (1 + RECYCLE_COST * recycles) * sum_k b_k * T_k(shape)

P: GiB of the tensors whose copies a preset keeps: pair [N, N, c_z], triangle attention logits
[N, H, N, N], MSA row attention logits [S + E, H, N, N], MSA activations [S, N, c_m] + [E, N, c_e] (fp32 bytes).
T: dispatch count (blocks; launch-bound chunked modes) and TFLOP of the triangle updates and attention (N^3)
and of the MSA attention (S * N^2, E * N^2). The coefficients absorb the constants (how many copies, bf16 or
fp32 storage, kernel efficiency); they are fitted on the `af2` preset only, so other presets are an
extrapolation along these terms (their fewer blocks are not scaled down: predictions are conservative).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from protfold.config import ModelConfig

__all__ = ["COST_TABLE", "RECYCLE_COST", "Shape", "Prediction", "peak_terms", "predict", "resident_bytes",
           "time_terms", "load_table", "count_parameters"]

GIB = 2**30
COST_TABLE = Path(__file__).resolve().parents[1] / "resources" / "cost_model.json"
# one no-grad recycling pass against the grad pass of a recomputed step (forward, forward again, backward ~ 2
# forwards): about a quarter; fixed, since the records vary recycles at only one crop
RECYCLE_COST = 0.25
# bytes per parameter of the optimizer state (Adam's two moments) per OptimConfig.state
OPTIM_STATE_BYTES = {"fp32": 8.0, "8bit": 2.0, "4bit": 1.0, "cpu_offload": 0.0}
PEAK_TERMS = ("pair", "tri_logits", "msa_logits", "msa")
TIME_TERMS = ("launch", "tri_tflop", "msa_tflop")


@dataclass(frozen=True)
class Shape:
    """What a step's cost depends on: crop N, MSA clusters S, extra rows E, recycles, precision."""

    crop: int
    rows: int
    extra_rows: int
    recycles: float = 0.0
    precision: str = "bf16"  # "bf16" | "fp32"
    batch: int = 1  # examples per step: activations and time scale with it (measured at 1 only)


@dataclass(frozen=True)
class Prediction:
    mode: str
    peak_bytes: float | None  # None: the preset has no fitted coefficients
    time_s: float | None
    note: str = ""

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / GIB


def peak_terms(cfg: ModelConfig, shape: Shape) -> dict[str, float]:
    """GiB of the tensors a step keeps copies of (fp32 bytes; the coefficients absorb storage and counts)."""
    n, s, e = shape.crop, shape.rows, shape.extra_rows
    e_heads = cfg.extra_msa_heads if cfg.extra_msa_enabled else 0
    return {
        "pair": n * n * cfg.c_z * 4 / GIB,
        "tri_logits": n**3 * cfg.pair_heads * 4 / GIB,
        "msa_logits": n * n * (s * cfg.msa_heads + e * e_heads) * 4 / GIB,
        "msa": n * (s * cfg.c_m + (e * cfg.c_e if cfg.extra_msa_enabled else 0)) * 4 / GIB,
    }


def time_terms(cfg: ModelConfig, shape: Shape) -> dict[str, float]:
    """Dispatch count (in af2's 52 blocks) and TFLOP of the N^3 and MSA-attention work of one forward."""
    n, s, e = shape.crop, shape.rows, shape.extra_rows
    extra = cfg.n_extra_msa_blocks if cfg.extra_msa_enabled else 0
    tri = n**3 * (cfg.tri_mul_hidden + cfg.pair_heads * cfg.pair_head_dim) * cfg.n_evoformer_blocks
    msa = n * n * (s * cfg.msa_heads * cfg.msa_head_dim * cfg.n_evoformer_blocks
                   + e * cfg.extra_msa_heads * cfg.extra_msa_head_dim * extra)
    return {"launch": (cfg.n_evoformer_blocks + extra) / 52.0, "tri_tflop": tri / 1e12, "msa_tflop": msa / 1e12}


def resident_bytes(n_params: int, *, optim_state: str = "fp32", ema: bool = False) -> float:
    """Weights and gradients (fp32), the optimizer's moments (per `optim_state`), and the fp32 EMA copy."""
    if optim_state not in OPTIM_STATE_BYTES:
        raise ValueError(f"optimizer state {optim_state!r} has no cost entry; known: {', '.join(OPTIM_STATE_BYTES)}")
    return n_params * (8.0 + OPTIM_STATE_BYTES[optim_state] + (4.0 if ema else 0.0))


@lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict:
    """The fitted coefficients (`protfold/resources/cost_model.json`, written by `scripts/fit_cost_model.py`)."""
    file = Path(path) if path else COST_TABLE
    try:
        table = json.loads(file.read_text())
        table["modes"], table["precision"]  # noqa: B018 - the two keys every prediction reads
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{file}: not a cost model table ({err})") from None
    return table


def _dot(coefs: dict[str, float], terms: dict[str, float]) -> float:
    return sum(coefs.get(k, 0.0) * v for k, v in terms.items())


def predict(mode: str, cfg: ModelConfig, shape: Shape, *, n_params: int, optim_state: str = "fp32",
            ema: bool = False, table: dict | None = None) -> Prediction:
    """Predicted absolute peak (bytes, as `max_memory_allocated` counts it) and step time of preset `mode`."""
    table = table or load_table()
    entry = table["modes"].get(mode)
    if entry is None or entry.get("peak") is None:
        note = entry.get("note", "no measured training step") if entry else "not in the cost table"
        return Prediction(mode, None, None, note)
    factors = table["precision"].get(shape.precision, {"peak": 1.0, "time": 1.0})
    peak = resident_bytes(n_params, optim_state=optim_state, ema=ema)
    peak += shape.batch * factors["peak"] * _dot(entry["peak"], peak_terms(cfg, shape)) * GIB
    time = shape.batch * factors["time"] * (1 + RECYCLE_COST * shape.recycles) * _dot(entry["time"],
                                                                                       time_terms(cfg, shape))
    return Prediction(mode, peak, time, entry.get("note", ""))


@lru_cache(maxsize=16)
def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of AlphaFold(cfg), built on the meta device (no memory, about a second for af2)."""
    import torch

    from protfold.model.alphafold import AlphaFold

    with torch.device("meta"):
        model = AlphaFold(cfg=cfg)
    return sum(p.numel() for p in model.parameters())
