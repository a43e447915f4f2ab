"""`--model.memory auto`: the fastest memory preset whose predicted peak fits the card, before the first step.

A preset fits when its predicted peak, raised by its worst under-prediction on the measured points (the table's
`peak_margin`), is within the budget: the card's free memory less `SAFETY_FRACTION` of it and `SAFETY_GIB`
(allocator fragmentation and cached blocks, which `max_memory_allocated` does not count), or a budget given
by the user. Among those that fit, the lowest predicted step time wins. Presets without a fitted cost (no
measured training step: `none`, `triangle`, `low_host`) are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protfold.config import ModelConfig
from protfold.plan.cost import GIB, Prediction, Shape, load_table, predict

__all__ = ["CPU_DEFAULT", "NothingFits", "PlanRow", "SAFETY_FRACTION", "SAFETY_GIB", "card_budget", "choose",
           "largest_fitting_crop", "plan"]

SAFETY_FRACTION, SAFETY_GIB = 0.10, 1.0
TIE_BAND = 0.05  # predicted times this close are a tie, broken by the lower peak (`choose`)
CPU_DEFAULT = "none"  # the plain path: what a CPU run without a budget gets
CROP_STEP = 32


class NothingFits(ValueError):
    """No fitted preset's predicted peak is within the budget."""


@dataclass(frozen=True)
class PlanRow:
    pred: Prediction
    needed_bytes: float | None  # predicted peak raised by the preset's margin
    fits: bool | None  # None: no prediction

    @property
    def mode(self) -> str:
        return self.pred.mode


def usable_bytes(free_bytes: float) -> float:
    """What a training step may plan to use of `free_bytes`: less the safety margin (a fraction and a constant)."""
    return free_bytes * (1 - SAFETY_FRACTION) - SAFETY_GIB * GIB


def card_budget(device_index: int = 0) -> tuple[float, str]:
    """(budget bytes, how it was found) from the card's free memory, less the safety margin."""
    import torch

    free, total = torch.cuda.mem_get_info(device_index)
    budget = usable_bytes(free)
    return budget, (f"cuda:{device_index} free {free / GIB:.2f} of {total / GIB:.2f} GiB, less "
                    f"{SAFETY_FRACTION:.0%} and {SAFETY_GIB:g} GiB")


def plan(cfg: ModelConfig, shape: Shape, *, n_params: int, budget_bytes: float, optim_state: str = "fp32",
         ema: bool = False, modes: list[str] | None = None, table: dict | None = None) -> list[PlanRow]:
    """Every preset's prediction at `shape` and whether it fits `budget_bytes` (table order: by name)."""
    table = table or load_table()
    rows = []
    for mode in modes or sorted(table["modes"]):
        pred = predict(mode, cfg, shape, n_params=n_params, optim_state=optim_state, ema=ema, table=table)
        if pred.peak_bytes is None:
            rows.append(PlanRow(pred, None, None))
            continue
        needed = pred.peak_bytes * (1 + table["modes"][mode].get("peak_margin", 0.0))
        rows.append(PlanRow(pred, needed, needed <= budget_bytes))
    return rows


def choose(rows: list[PlanRow]) -> PlanRow | None:
    """The fitting row with the lowest predicted time, or None when none fits. Rows predicted within TIE_BAND of
    that time count as tied (the model's time error on measured points is of that order, and single measured steps
    differ by as much), and of those the one with the lowest predicted peak is taken: the same speed, more room."""
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return None
    fastest = min(r.pred.time_s for r in fitting)
    tied = [r for r in fitting if r.pred.time_s <= fastest * (1 + TIE_BAND)]
    return min(tied, key=lambda r: (r.needed_bytes, r.pred.time_s))


def largest_fitting_crop(cfg: ModelConfig, shape: Shape, *, n_params: int, budget_bytes: float,
                         **kwargs) -> tuple[int, str] | None:
    """(largest crop below shape.crop, in steps of CROP_STEP, at which some preset fits; that preset) or None."""
    for crop in range((shape.crop - 1) // CROP_STEP * CROP_STEP, 0, -CROP_STEP):
        best = choose(plan(cfg, replace(shape, crop=crop), n_params=n_params, budget_bytes=budget_bytes, **kwargs))
        if best is not None:
            return crop, best.mode
    return None


def nothing_fits_message(rows: list[PlanRow], cfg: ModelConfig, shape: Shape, *, n_params: int,
                         budget_bytes: float, **kwargs) -> str:
    """One line: the smallest predicted peak, the budget, and the crop that would fit."""
    known = [r for r in rows if r.needed_bytes is not None]
    if not known:
        return "memory auto: no preset has a fitted cost model"
    low = min(known, key=lambda r: r.needed_bytes)
    found = largest_fitting_crop(cfg, shape, n_params=n_params, budget_bytes=budget_bytes, **kwargs)
    hint = (f"crop {found[0]} would fit (with {found[1]})" if found else
            f"no crop from {CROP_STEP} up fits: the weights, gradients and optimizer state alone exceed it")
    return (f"memory auto: no memory preset fits at crop {shape.crop}: the smallest predicted peak is "
            f"{low.needed_bytes / GIB:.2f} GiB ({low.mode}), budget {budget_bytes / GIB:.2f} GiB; {hint}")


def resolve(cfg: ModelConfig, shape: Shape, *, n_params: int, budget_bytes: float | None, budget_note: str,
            **kwargs) -> tuple[str, str]:
    """(preset name, one line saying what was chosen and why). Raises NothingFits with the one-line reason.

    `budget_bytes` None (no card, no budget given): the plain preset CPU_DEFAULT.
    """
    if budget_bytes is None:
        return CPU_DEFAULT, (f"memory auto: {CPU_DEFAULT} ({budget_note}; the cost model predicts GPU steps, "
                             "so the plain path is used)")
    rows = plan(cfg, shape, n_params=n_params, budget_bytes=budget_bytes, **kwargs)
    best = choose(rows)
    if best is None:
        raise NothingFits(nothing_fits_message(rows, cfg, shape, n_params=n_params, budget_bytes=budget_bytes,
                                               **kwargs))
    return best.mode, (f"memory auto: {best.mode}, predicted peak {best.pred.peak_gib:.2f} GiB and "
                       f"{best.pred.time_s:.2f} s per step at crop {shape.crop} / {shape.rows} / {shape.extra_rows}"
                       f" ({shape.precision}), budget {budget_bytes / GIB:.2f} GiB ({budget_note})")
