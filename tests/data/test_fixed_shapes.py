"""Training examples have fixed shapes (residues, MSA rows, extra rows padded with zero masks), so compiled blocks
compile once per run; the padded rows change no loss and no gradient, because the model masks them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protfold.config import DataConfig, LossConfig, MemoryConfig, model_preset
from protfold.data.pipeline import make_example, training_sizes
from protfold.model.alphafold import AlphaFold
from protfold.train.step import training_loss

CFG = DataConfig(crop_size=16, max_msa_clusters=12, max_extra_msa=20)


def _raw(n_res: int, n_rows: int, seed: int = 0) -> dict:
    """A raw cache entry with a shallow alignment (fewer rows than the fixed depth)."""
    rng = np.random.default_rng(seed)
    aatype = rng.integers(0, 20, n_res)
    msa = rng.integers(0, 22, (n_rows, n_res))
    msa[0] = aatype
    positions = rng.normal(scale=8.0, size=(n_res, 37, 3)).astype(np.float32)
    mask = np.zeros((n_res, 37), np.float32)
    mask[:, :5] = 1.0  # N, CA, C, CB, O
    return {"aatype": aatype, "all_atom_positions": positions, "all_atom_mask": mask,
            "residue_index": np.arange(n_res), "resolution": 2.0, "msa": msa,
            "deletion_matrix": rng.integers(0, 3, (n_rows, n_res)), "id": "shallow"}


@pytest.mark.parametrize("n_rows", [1, 5, 40])
def test_training_examples_have_the_fixed_depth(n_rows: int) -> None:
    ex = make_example(_raw(10, n_rows), CFG, seed=3, train=True)
    sizes = training_sizes(CFG)
    assert ex["msa_feat"].shape[:2] == (sizes["S"], sizes["N"])
    assert ex["extra_msa_feat"].shape[:2] == (sizes["E"], sizes["N"])
    real = min(n_rows, CFG.max_msa_clusters)
    extra = min(max(n_rows - CFG.max_msa_clusters, 0), CFG.max_extra_msa)
    assert ex["msa_mask"][real:].abs().sum() == 0 and ex["msa_mask"][:real, :10].all()
    assert ex["extra_msa_mask"][extra:].abs().sum() == 0 and ex["bert_mask"][real:].abs().sum() == 0
    evaluated = make_example(_raw(10, n_rows), CFG, seed=3, train=False)  # evaluation is not padded
    assert evaluated["msa_feat"].shape[0] == real
    if n_rows == 5:
        assert evaluated["extra_msa_feat"].shape[0] < CFG.max_extra_msa


def _trim(batch: dict, rows: int, extra: int) -> dict:
    out = dict(batch)
    for key in ("msa_feat", "msa_mask", "true_msa", "bert_mask"):
        out[key] = batch[key][:, :rows]
    for key in ("extra_msa_feat", "extra_msa_mask"):
        out[key] = batch[key][:, :extra]
    return out


def test_padded_rows_change_no_loss_and_no_gradient() -> None:
    torch.manual_seed(0)
    model = AlphaFold(cfg=model_preset("tiny", msa_dropout=0.0, pair_dropout=0.0)).double()
    ex = make_example(_raw(14, 17), CFG, seed=5, train=True)  # 12 cluster rows, 5 of the 20 extra rows real
    batch = {k: (v[None].double() if v.is_floating_point() else v[None]) for k, v in ex.items() if k != "id"}
    trimmed = _trim(batch, 12, 5)
    results = []
    for b in (batch, trimmed):
        model.zero_grad()
        torch.manual_seed(1)  # the structure module's dropout draws the same masks in both runs
        loss, terms = training_loss(model, b, n_recycles=1, loss_cfg=LossConfig(), clamped_fape=True,
                                      memory=MemoryConfig())
        loss.backward()
        results.append((loss.detach(), terms, {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (loss_p, terms_p, grads_p), (loss_t, terms_t, grads_t) = results
    assert batch["extra_msa_feat"].shape[1] == 20 and trimmed["extra_msa_feat"].shape[1] == 5
    torch.testing.assert_close(loss_p, loss_t, rtol=1e-10, atol=1e-12)
    for name in terms_t:
        torch.testing.assert_close(terms_p[name], terms_t[name], rtol=1e-10, atol=1e-12, msg=name)
    assert grads_p.keys() == grads_t.keys() and len(grads_t) > 20
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-9, atol=1e-12, msg=name)
