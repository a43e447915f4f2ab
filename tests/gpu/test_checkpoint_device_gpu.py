"""A checkpoint's RNG states loaded with `map_location` onto the GPU, as `protfold predict --ckpt_path` does on a GPU
(needs CUDA; skipped without). The CPU tests in tests/train/test_checkpoint_devices.py cover the other forms."""

from __future__ import annotations

import pytest
import torch

from protfold.train.module import ProtfoldModule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_rng_states_mapped_to_the_gpu_are_restored(tmp_path) -> None:
    writer = ProtfoldModule(preset="tiny").cuda()
    ckpt: dict = {}
    writer.on_save_checkpoint(ckpt)
    assert ckpt["torch_cuda_rng"].device.type == "cpu"
    torch.save(ckpt, tmp_path / "gpu.ckpt")
    loaded = torch.load(tmp_path / "gpu.ckpt", map_location="cuda", weights_only=False)
    assert loaded["torch_rng"].is_cuda and loaded["torch_cuda_rng"].is_cuda
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.set_rng_state(ckpt["torch_rng"])
        torch.cuda.set_rng_state(ckpt["torch_cuda_rng"])
        expected = torch.rand(8), torch.rand(8, device="cuda")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        ProtfoldModule(preset="tiny").on_load_checkpoint(loaded)
        drawn = torch.rand(8), torch.rand(8, device="cuda")
    for got, want in zip(drawn, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
