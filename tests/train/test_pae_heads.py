"""The PAE head in training: trained only when its loss weight is on, and a weight without the head refused."""

from __future__ import annotations

import pytest

from protfold.config import LossConfig
from protfold.train.module import ProtfoldModule


def _head_trainable(module: ProtfoldModule) -> bool:
    return all(p.requires_grad for p in module.model.heads.predicted_aligned_error.parameters())


def test_pae_head_trained_only_with_its_loss() -> None:
    assert not _head_trainable(ProtfoldModule(preset="tiny_ptm"))  # AF2's initial training: weight 0
    assert _head_trainable(ProtfoldModule(preset="tiny_ptm", loss=LossConfig(pae=0.1)))
    assert ProtfoldModule(preset="tiny").model.heads.predicted_aligned_error is None


def test_pae_loss_needs_the_head_and_its_bins() -> None:
    with pytest.raises(ValueError, match="loss.pae=0.1 needs the predicted aligned error head"):
        ProtfoldModule(preset="tiny", loss=LossConfig(pae=0.1))
    with pytest.raises(ValueError, match="must bin errors as the head does"):
        ProtfoldModule(preset="tiny_ptm", loss=LossConfig(pae=0.1, pae_max_bin=20.0))
