"""Loading a checkpoint elsewhere than where it was written: its saved RNG states arrive in another form.

A checkpoint written on a GPU and loaded with `map_location` onto a GPU (what `protfold predict` does) hands
`on_load_checkpoint` a CPU RNG state that lives on the GPU, which `torch.set_rng_state` refuses ("RNG state must
be a torch.ByteTensor"). A CPU has no second device, so these tests give the state the other forms it can take
on the way: another dtype and a non-contiguous view; the GPU case itself is in tests/gpu/.
"""

from __future__ import annotations

import logging

import pytest
import torch

from protfold.train.module import ProtfoldModule


def _draw_after(state: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        return torch.rand(8)


@pytest.mark.parametrize("form", ["int64", "non-contiguous"])
def test_rng_state_in_another_form_is_restored(pretrained, tmp_path, form: str) -> None:
    ckpt = torch.load(pretrained, map_location="cpu", weights_only=False)
    saved = ckpt["torch_rng"].clone()
    if form == "int64":
        ckpt["torch_rng"] = saved.long()
    else:
        ckpt["torch_rng"] = torch.stack([saved, saved], dim=-1)[:, 0]
        assert not ckpt["torch_rng"].is_contiguous()
    path = tmp_path / f"{form}.ckpt"
    torch.save(ckpt, path)
    with torch.random.fork_rng(devices=[]):
        ProtfoldModule.load_from_checkpoint(path, map_location="cpu", init_from=None)
        drawn = torch.rand(8)
    torch.testing.assert_close(drawn, _draw_after(saved), rtol=0, atol=0)


def test_cuda_rng_state_skipped_without_cuda(pretrained, tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt = torch.load(pretrained, map_location="cpu", weights_only=False)
    ckpt["torch_cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    path = tmp_path / "gpu_written.ckpt"
    torch.save(ckpt, path)
    with caplog.at_level(logging.INFO, logger="protfold.train.module"), torch.random.fork_rng(devices=[]):
        ProtfoldModule.load_from_checkpoint(path, map_location="cpu", init_from=None)
        drawn = torch.rand(8)
    assert "CUDA RNG state" in caplog.text and "not restored" in caplog.text
    torch.testing.assert_close(drawn, _draw_after(ckpt["torch_rng"]), rtol=0, atol=0)
