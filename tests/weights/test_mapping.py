"""The name/layout table (protfold/weights/mapping.py): both fixture files give the same protfold weights, the
export back to AlphaFold2's layout reproduces the fixture's `.npz` bit for bit, and full-size models make the
round trip protfold -> AF2 `.npz` file -> protfold with every tensor identical."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from protfold.config import model_preset
from protfold.model.alphafold import AlphaFold
from protfold.weights import export_af2, read_config, read_weights
from protfold.weights.mapping import AF2_PREFIX, af2_shapes

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alphafold_params_small"
PAE_KEYS = {f"{AF2_PREFIX}predicted_aligned_error_head/logits//{p}" for p in ("weights", "bias")}


@pytest.fixture(scope="module")
def fixture_npz() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "params.npz") as data:
        return dict(data)


def test_npz_and_openfold_state_dict_give_identical_weights_for_every_parameter():
    npz, pt = read_weights(FIXTURE / "params.npz"), read_weights(FIXTURE / "openfold_state_dict.pt")
    assert (npz.format, pt.format) == ("alphafold2", "openfold")
    with torch.device("meta"):
        names = AlphaFold(cfg=npz.config.cfg).state_dict().keys()
    assert npz.state_dict.keys() == pt.state_dict.keys() == names and len(names) == 360
    for name in names:
        a, b = npz.state_dict[name], pt.state_dict[name]
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous(), name
        assert torch.equal(a, b), name
    assert not npz.missing and not npz.ignored and not pt.missing and not pt.ignored


def _openfold_v1_name(name: str) -> str:
    """The fixture's (current) OpenFold names as older OpenFold releases wrote them (EvoformerBlockCore)."""
    for new, old in ((".msa_transition.", ".core.msa_transition."), ("pair_stack.tri_", "core.tri_"),
                     (".outer_product_mean.", ".core.outer_product_mean."), ("_points.linear.", "_points."),
                     ("pair_stack.pair_transition", "core.pair_transition")):
        name = name.replace(new, old)
    return name


OPENFOLD_LAYOUTS = {  # how OpenFold checkpoints hold the weights -> a file made from the fixture's state dict
    "lightning state_dict": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 7},
    # Lightning checkpoint with EMA: the EMA weights are taken (as OpenFold's own loader does), not the raw ones
    "lightning ema.params": lambda sd: {"state_dict": {f"model.{k}": torch.zeros_like(v) for k, v in sd.items()},
                                        "ema": {"decay": 0.999, "params": sd}},
    "DeepSpeed module. prefix": lambda sd: {f"module.model.{k}": v for k, v in sd.items()},
    "v1 names": lambda sd: {_openfold_v1_name(k): v for k, v in sd.items()},
}


@pytest.mark.parametrize("layout", OPENFOLD_LAYOUTS)
def test_openfold_checkpoint_layouts(layout, tmp_path):
    state = torch.load(FIXTURE / "openfold_state_dict.pt", weights_only=True)
    if layout == "v1 names":
        assert sum(_openfold_v1_name(k) != k for k in state) > 100  # the renaming is exercised
    torch.save(OPENFOLD_LAYOUTS[layout](state), tmp_path / "openfold.ckpt")
    got, want = read_weights(tmp_path / "openfold.ckpt"), read_weights(FIXTURE / "params.npz")
    assert got.format == "openfold" and got.state_dict.keys() == want.state_dict.keys()
    for name, tensor in want.state_dict.items():
        assert torch.equal(got.state_dict[name], tensor), name


def test_sizes_read_from_the_file_are_the_fixture_config():
    config = json.loads((FIXTURE / "config.json").read_text())["protfold_model_config"]
    for source in ("params.npz", "openfold_state_dict.pt"):
        resolved = read_weights(FIXTURE / source).config
        assert resolved.cfg == model_preset("af2_ptm", **config), source  # PAE keys -> the _ptm preset
        assert resolved.preset == "af2_ptm" and model_preset(resolved.preset, **resolved.overrides) == resolved.cfg
        assert read_weights(FIXTURE / source, FIXTURE / "config.json").config.cfg == resolved.cfg


def test_export_reproduces_the_fixture_npz_bit_for_bit(fixture_npz):
    imported = read_weights(FIXTURE / "params.npz")
    exported = export_af2(imported.state_dict, imported.config.cfg)
    assert exported.keys() == fixture_npz.keys() and len(exported) == 267
    for key, want in fixture_npz.items():
        got = exported[key]
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, key
        assert np.array_equal(got, want), key


@pytest.mark.parametrize("preset", ["af2", "af2_ptm"])
def test_full_size_round_trip_through_an_af2_file(preset, tmp_path, fixture_npz):
    cfg = model_preset(preset)
    with torch.device("meta"):
        model = AlphaFold(cfg=cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # every value random (AF2's init leaves zeros and ones), so no tensor can pass by chance
        for p in model.parameters():
            p.normal_()
    ours = model.state_dict()
    arrays = export_af2(ours, cfg)
    # AF2's key set (the fixture is a model_3_ptm file) and a few full-size shapes of the released files
    assert arrays.keys() == (fixture_npz.keys() if preset == "af2_ptm" else fixture_npz.keys() - PAE_KEYS)
    shapes = {k.removeprefix(AF2_PREFIX): v.shape for k, v in arrays.items()}
    row_attention = "evoformer/evoformer_iteration/msa_row_attention_with_pair_bias/attention"
    assert shapes[f"{row_attention}//query_w"] == (48, 256, 8, 32)
    assert shapes["evoformer/extra_msa_stack/msa_column_global_attention/attention//key_w"] == (4, 64, 8)
    assert shapes["evoformer/evoformer_iteration/outer_product_mean//output_w"] == (48, 32, 32, 128)
    assert shapes["structure_module/fold_iteration/invariant_point_attention/kv_point_local//weights"] == (384, 432)
    assert shapes["structure_module/fold_iteration/invariant_point_attention/output_projection//weights"] == (2112, 384)
    assert sum(a.size for a in arrays.values()) == sum(t.numel() for t in ours.values())  # one slot per number
    # the shape arithmetic that checks files without tensors agrees with the layout functions
    assert af2_shapes({k: tuple(t.shape) for k, t in ours.items()}, cfg) == {k: a.shape for k, a in arrays.items()}

    path = tmp_path / f"params_{preset}.npz"
    np.savez(path, **arrays)
    del arrays
    imported = read_weights(path, preset)
    assert imported.config.cfg == cfg and imported.format == "alphafold2"
    assert imported.state_dict.keys() == ours.keys()  # every protfold parameter is in the table
    for name, tensor in ours.items():
        assert torch.equal(imported.state_dict[name], tensor), name
    assert asdict(read_config(path).cfg) == asdict(cfg)  # and the sizes read from the file are the preset's
