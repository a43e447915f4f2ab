"""`protfold bench` measures the step `protfold fit` takes: for one batch, one set of weights, the same recycling
count and the same dropout seed, the bench's seeded step (`run_mode`, kind "train") and
`ProtfoldModule.training_step` run by a Lightning Trainer give the same loss and the same gradients (before
clipping). fp32 on the CPU, tiny preset; the batch has padded residues, unobserved atoms and a random BERT mask
over the MSA, so every mask of the loss is a real one.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor

from protfold.bench import workloads
from protfold.bench.synthetic import synthetic_raw
from protfold.bench.workloads import Network, Point, Settings, run_mode
from protfold.config import DataConfig, LossConfig, MemoryConfig, model_preset
from protfold.data.crop import collate
from protfold.data.pipeline import make_example
from protfold.train.module import ProtfoldModule

FIT_SEED = 5  # ProtfoldModule seed whose first step draws one recycling pass and clamped FAPE (checked below)
N_RES, CROP, ROWS, EXTRA = 13, 16, 3, 5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch() -> dict:
    """One training example of 13 residues padded to 16, a fifth of its atoms unobserved, with masked MSA."""
    raw = synthetic_raw(N_RES, ROWS + EXTRA + 4, seed=3)
    rng = np.random.default_rng(4)
    raw["all_atom_mask"] = raw["all_atom_mask"] * (rng.random(raw["all_atom_mask"].shape) > 0.2)
    cfg = DataConfig(crop_size=CROP, max_msa_clusters=ROWS, max_extra_msa=EXTRA)
    out = collate([make_example(raw, cfg, seed=5, train=True)])
    assert out["seq_mask"][0, N_RES:].sum() == 0 and out["seq_mask"][0, :N_RES].all()
    assert 0 < out["all_atom_mask"].sum() < out["atom37_atom_exists"].sum()
    assert out["bert_mask"].sum() > 0
    return out


@pytest.fixture(scope="module")
def net() -> Network:
    """The bench's network with noise on every weight: AF2's zero-initialised final layers would otherwise
    leave most gradients of a first step exactly zero, on both sides."""
    net = Network.build("train", model_preset("tiny"), seed=0, device=CPU)
    gen = torch.Generator().manual_seed(1)
    net.state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in net.state.items()}
    return net


class _Gradients(pl.Callback):
    """The gradients after backward (before clipping and the update) and the step's loss."""

    def on_after_backward(self, trainer: pl.Trainer, module: ProtfoldModule) -> None:
        self.grads = {name: p.grad.detach().clone() for name, p in module.model.named_parameters()
                      if p.grad is not None}

    def on_train_batch_end(self, trainer: pl.Trainer, module: ProtfoldModule, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"] if isinstance(outputs, dict) else outputs


@pytest.fixture(scope="module")
def fit_step(batch: dict, net: Network) -> dict:
    """`protfold fit`'s first step from the bench network's weights: loss, gradients, recycles, dropout seed."""
    module = ProtfoldModule(preset="tiny", seed=FIT_SEED)
    module.model.load_state_dict(net.state)
    n_recycles, clamped = module.draw_step_settings()
    assert (n_recycles, clamped) == (1, True), "FIT_SEED must draw a recycling pass and clamped FAPE"
    seed = module.dropout_seed(0)
    probe = _Gradients()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1 and module.last_n_recycles == n_recycles
    return {"loss": probe.loss, "grads": probe.grads, "recycles": n_recycles, "dropout_seed": seed}


def bench_step(net: Network, batch: dict, *, recycles: int, dropout_seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The bench's training step for mode `none`: its seeded reference step's loss and gradients."""
    point = Point(kind="train", preset="tiny", precision="fp32", crop=CROP, rows=ROWS, extra_rows=EXTRA,
                  recycles=recycles)
    settings = Settings(device=CPU, steps=1, warmup=1, seed=dropout_seed, infer=False)
    result = run_mode(point, MemoryConfig(), net, settings, batch)
    assert result.fields["status"] == "ok", result.fields
    return result.loss, result.grads


def assert_same_step(fit: dict, loss: Tensor, grads: dict[str, Tensor]) -> None:
    torch.testing.assert_close(loss, fit["loss"], rtol=1e-5, atol=1e-6)
    assert set(grads) == set(fit["grads"]), set(grads) ^ set(fit["grads"])
    for name, grad in fit["grads"].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bench_and_fit_give_the_same_loss_and_gradients(fit_step: dict, net: Network, batch: dict) -> None:
    loss, grads = bench_step(net, batch, recycles=fit_step["recycles"], dropout_seed=fit_step["dropout_seed"])
    nonzero = [name for name, g in grads.items() if bool(g.abs().sum() > 0)]
    assert len(nonzero) > len(grads) // 2, f"only {len(nonzero)} of {len(grads)} gradients are nonzero"
    assert_same_step(fit_step, loss, grads)


@pytest.mark.parametrize("change", ["loss weight", "recycles", "dropout seed"])
def test_the_comparison_fails_when_the_bench_step_differs(fit_step: dict, net: Network, batch: dict,
                                                          monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """The test above can fail: a bench that weighted one loss term otherwise, recycled once more, or drew
    other dropout masks would be caught."""
    recycles, seed = fit_step["recycles"], fit_step["dropout_seed"]
    if change == "loss weight":
        monkeypatch.setattr(workloads, "LossConfig", lambda: LossConfig(distogram=0.31))
    elif change == "recycles":
        recycles += 1
    else:
        seed += 1
    loss, grads = bench_step(net, batch, recycles=recycles, dropout_seed=seed)
    with pytest.raises(AssertionError):
        assert_same_step(fit_step, loss, grads)
