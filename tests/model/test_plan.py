"""The memory plan: resolved once per grad mode, passed to `forward`, never stored or swapped on a module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from protfold.bench.synthetic import synthetic_batch
from protfold.config import MemoryConfig, load_memory_preset, model_preset
from protfold.model.alphafold import AlphaFold
from protfold.model.evoformer import EvoformerBlock, EvoformerStack, MSARowAttentionWithPairBias, OuterProductMean
from protfold.model.plan import MemoryPlan, resolve
from protfold.model.primitives import Attention
from protfold.model.structure import StructureModule
from protfold.model.triangle import PairTransition, TriangleAttention, TriangleMultiplication

from .conftest import make_trunk_inputs

# every shipped preset the CPU runs quickly (the compiled ones compile, tested in test_memory_equivalence.py)
PRESETS = ["none", "chunked", "recompute", "offload", "triangle", "low", "long", "low_host"]


def _memory_attributes(model: nn.Module) -> list[str]:
    """Names of module attributes that hold memory settings, at any depth."""
    return [f"{name}.{key}" for name, module in model.named_modules() for key, value in vars(module).items()
            if isinstance(value, MemoryConfig | MemoryPlan)]


@pytest.mark.parametrize("preset", PRESETS)
def test_no_module_stores_memory_settings(preset) -> None:
    """Forward with grad (recycling passes without) and without grad under each preset: afterwards no module holds
    a MemoryConfig or MemoryPlan, and there is no `set_memory` to swap one in."""
    memory = load_memory_preset(preset)
    model = AlphaFold(cfg=model_preset("tiny"))
    assert not hasattr(model, "set_memory")
    batch = synthetic_batch(9, 3, 2, seed=1)
    out = model.train()(batch, n_recycles=1, memory=memory)
    out["final_atom37"].square().mean().backward()
    with torch.no_grad():
        model.eval()(batch, n_recycles=1, memory=memory)
    assert _memory_attributes(model) == []
    assert all(p.grad is not None for p in model.evoformer.parameters())


def test_memory_reaches_the_model_only_as_a_forward_argument() -> None:
    """The same model object gives the outputs of `none` and of `low` in turn, with nothing switched between."""
    torch.manual_seed(0)
    model = AlphaFold(cfg=model_preset("tiny", msa_dropout=0.0, pair_dropout=0.0)).eval()
    batch = synthetic_batch(9, 3, 2, seed=1)
    with torch.no_grad():
        plain = model(batch, n_recycles=1)
        low = model(batch, n_recycles=1, memory=load_memory_preset("low"))
        again = model(batch, n_recycles=1)
    torch.testing.assert_close(low["final_atom37"], plain["final_atom37"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again["final_atom37"], plain["final_atom37"], rtol=0, atol=0)


def _calls(cfg) -> dict[str, tuple[nn.Module, tuple]]:
    t = make_trunk_inputs(cfg)
    z, pm, m, mm = t.z, t.pair_mask, t.m, t.msa_mask
    return {
        "triangle_multiplication": (TriangleMultiplication(c_z=cfg.c_z, c_hidden=4, outgoing=True), (z, pm)),
        "triangle_attention": (TriangleAttention(c_z=cfg.c_z, c_hidden=3, n_heads=2, starting=False), (z, pm)),
        "pair_transition": (PairTransition(c_z=cfg.c_z, factor=2), (z, pm)),
        "msa_row_attention": (MSARowAttentionWithPairBias(c_m=cfg.c_m, c_z=cfg.c_z, n_heads=2, c_hidden=3),
                              (m, z, mm)),
        "outer_product_mean": (OuterProductMean(c_m=cfg.c_m, c_z=cfg.c_z, c_hidden=3), (m, mm)),
        "attention": (Attention(c_q=cfg.c_m, c_kv=cfg.c_m, c_hidden=3, n_heads=2), (m, m, [])),
        "evoformer_block": (EvoformerBlock.from_config(cfg), (m, z, mm, pm)),
        "evoformer_stack": (EvoformerStack(cfg), (m, z, mm, pm)),
        "structure_module": (StructureModule(cfg=cfg), (torch.randn(*m.shape[:1], m.shape[-2], cfg.c_s), z,
                                                        torch.zeros(m.shape[0], m.shape[-2], dtype=torch.long),
                                                        mm[:, 0])),
    }


@pytest.mark.parametrize("name", list(_calls(model_preset("tiny"))))
def test_a_module_called_without_plan_fails(name, tiny_cfg) -> None:
    """A missing pass-down is an error, never a silent run of the plain path."""
    module, args = _calls(tiny_cfg)[name]
    with pytest.raises(TypeError, match="plan"):
        module(*args)
    module(*args, plan=resolve(MemoryConfig(), grad=True, device="cpu"))  # with it, the call runs


def test_a_plan_for_the_other_grad_mode_fails(tiny_cfg) -> None:
    block = EvoformerBlock.from_config(tiny_cfg)
    t = make_trunk_inputs(tiny_cfg)
    with torch.no_grad(), pytest.raises(RuntimeError, match="resolved for grad=True ran with grad=False"):
        block(t.m, t.z, t.msa_mask, t.pair_mask, plan=resolve(MemoryConfig(), grad=True, device="cpu"))
    with pytest.raises(RuntimeError, match="resolved for grad=False ran with grad=True"):
        block(t.m, t.z, t.msa_mask, t.pair_mask, plan=resolve(MemoryConfig(), grad=False, device="cpu"))


def test_resolve_decides_each_switch_for_the_grad_mode_and_device() -> None:
    low = load_memory_preset("low_host")
    train, infer = resolve(low, grad=True, device="cpu"), resolve(low, grad=False, device="cpu")
    # recompute, boundary storage and compiling act only with grad; the host edge and in-place rows only without
    assert (train.blocks_per_checkpoint, train.recompute_inside_block, train.recompute_structure) == (1, True, True)
    assert (infer.blocks_per_checkpoint, infer.recompute_inside_block, infer.recompute_structure) == (None, False, False)
    assert (train.checkpoint_storage, infer.checkpoint_storage) == ("cpu", "fp32")
    assert (train.offload_triangle_edge, infer.offload_triangle_edge) == (False, True)
    assert (train.inplace, infer.inplace) == (False, True)
    assert resolve(MemoryConfig(), grad=False, device="cpu").inplace is False  # nothing asks for chunking
    assert resolve(load_memory_preset("compiled"), grad=False, device="cpu").compile_blocks is False
    assert resolve(load_memory_preset("compiled"), grad=True, device="cpu").compile_blocks is True
    flex = MemoryConfig(attention="flex")
    assert resolve(flex, grad=True, device="cpu").attention == "naive"
    assert resolve(flex, grad=True, device="cuda").attention == "flex"
    assert resolve(MemoryConfig(low_memory_triangle=True), grad=True, device="cpu").triangle_slice_mb == 512.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.inplace = True  # type: ignore[misc]
