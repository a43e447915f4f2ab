"""Fixtures for the model tests: seeded RNG, the tiny preset, odd-sized inputs with real masks."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from protfold.config import MemoryConfig, ModelConfig, model_preset
from protfold.model.plan import MemoryPlan, resolve

# Odd sizes so that a transposition bug changes a shape or a value.
B, N_SEQ, N_RES, N_EXTRA = 2, 5, 7, 3


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded RNG; one intra-op thread (tiny tensors: extra threads only add contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return model_preset("tiny")


@pytest.fixture
def tiny_cfg_no_dropout() -> ModelConfig:
    return model_preset("tiny", msa_dropout=0.0, pair_dropout=0.0)


def real_mask(*shape: int, p: float = 0.25) -> Tensor:
    """A float 0/1 mask with some zeros and some ones (redrawn until both occur)."""
    while True:
        mask = (torch.rand(*shape) > p).float()
        if 0 < mask.sum() < mask.numel():
            return mask


@dataclass
class TrunkInputs:
    m: Tensor  # [B, S, N, c_m]
    z: Tensor  # [B, N, N, c_z]
    e: Tensor  # [B, E, N, c_e]
    msa_mask: Tensor  # [B, S, N]
    extra_msa_mask: Tensor  # [B, E, N]
    pair_mask: Tensor  # [B, N, N]

    def leaves(self) -> TrunkInputs:
        """Fresh leaf copies of m, z, e that require grad (so input gradients can be compared too)."""
        return TrunkInputs(*(t.detach().clone().requires_grad_(True) for t in (self.m, self.z, self.e)),
                           self.msa_mask, self.extra_msa_mask, self.pair_mask)


def make_trunk_inputs(cfg: ModelConfig, *, batch: int = B, n_seq: int = N_SEQ, n_res: int = N_RES,
                      n_extra: int = N_EXTRA, dtype: torch.dtype = torch.float32) -> TrunkInputs:
    seq_mask = real_mask(batch, n_res, p=0.2)
    return TrunkInputs(
        m=torch.randn(batch, n_seq, n_res, cfg.c_m, dtype=dtype),
        z=torch.randn(batch, n_res, n_res, cfg.c_z, dtype=dtype),
        e=torch.randn(batch, n_extra, n_res, cfg.c_e, dtype=dtype),
        msa_mask=real_mask(batch, n_seq, n_res).to(dtype),
        extra_msa_mask=real_mask(batch, n_extra, n_res).to(dtype),
        pair_mask=(seq_mask[..., :, None] * seq_mask[..., None, :]).to(dtype),
    )


@pytest.fixture
def trunk_inputs(tiny_cfg: ModelConfig) -> TrunkInputs:
    return make_trunk_inputs(tiny_cfg)


def randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Overwrite every parameter with random values.

    AF2's "final" and "gating" initialisers start at zero, which would make most gradients zero and an
    equivalence test on them vacuous; random weights exercise every path.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
        for sub in module.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.weight.add_(1.0)
    return module


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    return randomize_


@pytest.fixture
def inputs_factory() -> Callable[..., TrunkInputs]:
    return make_trunk_inputs


@pytest.fixture
def mask_factory() -> Callable[..., Tensor]:
    return real_mask


class Planned:
    """Test helper: `module` called with `plan=resolve(memory, ...)` for the grad mode and device of each call, as
    `AlphaFold.forward` passes it down. Everything else (parameters, train(), state_dict) is the module's own."""

    def __init__(self, module: nn.Module, memory: MemoryConfig) -> None:
        self.module, self.memory = module, memory

    def plan(self, device: torch.device | str = "cpu") -> MemoryPlan:
        return resolve(self.memory, grad=torch.is_grad_enabled(), device=device)

    def __call__(self, *args, **kwargs):
        device = next((t.device for t in args if isinstance(t, Tensor)), torch.device("cpu"))
        return self.module(*args, plan=self.plan(device), **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def _same(self, name: str):
        def call(*args, **kwargs):
            getattr(self.module, name)(*args, **kwargs)
            return self

        return call

    def __getattribute__(self, name: str):
        if name in ("train", "eval", "double", "float", "bfloat16", "to", "requires_grad_", "zero_grad"):
            return object.__getattribute__(self, "_same")(name)
        return object.__getattribute__(self, name)


def planned(module: nn.Module, memory: MemoryConfig) -> Planned:
    return Planned(module, memory)


@pytest.fixture
def triton_interpreter():
    """protfold's Triton attention kernels, run by Triton's interpreter on the CPU. Skipped without triton, and
    where triton is not in interpreter mode (on CUDA machines; tests/conftest.py sets it on the others)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is not on (CUDA machine): tests/gpu/test_attention_triton_gpu.py")
    return importlib.import_module("protfold.model.kernels.attention")
