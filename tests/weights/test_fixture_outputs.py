"""The fixture network (tests/fixtures/alphafold_params_small, README there) imported from AlphaFold2's `.npz`
and from OpenFold's state dict reproduces OpenFold's own float64 outputs: to 1e-6 relative in float64, and
within bf16 rounding under CPU bf16 autocast. The model runs `forward(batch, n_recycles=1)` on the
fixture's batch (protfold's batch format), as the fixture was made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protfold import constants as rc
from protfold.metrics import plddt_from_logits
from protfold.weights import load_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alphafold_params_small"
SOURCES = ["params.npz", "openfold_state_dict.pt"]

# expected.npz array -> the same quantity from protfold's outputs (and the batch)
OUTPUTS = {
    "final_atom_positions": lambda out, batch: out["final_atom37"],
    "final_atom_mask": lambda out, batch: torch.as_tensor(rc.restype_atom37_mask)[batch["aatype"]],
    "final_atom14_positions": lambda out, batch: out["final_atom14"],
    "final_frames_4x4": lambda out, batch: out["frames"][-1],
    "traj_frames_4x4": lambda out, batch: out["frames"],
    "angles": lambda out, batch: out["angles"],
    "unnormalized_angles": lambda out, batch: out["unnormalized_angles"],
    "lddt_logits": lambda out, batch: out["plddt_logits"],
    "plddt": lambda out, batch: plddt_from_logits(out["plddt_logits"]),
    "distogram_logits": lambda out, batch: out["distogram_logits"],
    "masked_msa_logits": lambda out, batch: out["masked_msa_logits"],
    "experimentally_resolved_logits": lambda out, batch: out["experimentally_resolved_logits"],
    "tm_logits": lambda out, batch: out["pae_logits"],
    "predicted_aligned_error": lambda out, batch: out["predicted_aligned_error"],
    "max_predicted_aligned_error": lambda out, batch: out["max_predicted_aligned_error"],
    # pTM over the residues of seq_mask; all 20 are real here, so it is also the all-residue ptm_score
    "ptm_score_seq_mask": lambda out, batch: out["ptm"][0],
    "ptm_score": lambda out, batch: out["ptm"][0],
    "single": lambda out, batch: out["single_evoformer"],
    "sm_single": lambda out, batch: out["single"],
    "pair": lambda out, batch: out["pair"],
    "msa_first_row": lambda out, batch: out["msa_first_row"],
}


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as data:
        arrays = dict(data)
    assert set(OUTPUTS) == set(arrays) - {"final_affine_tensor"}  # its quaternion sign is arbitrary: frames instead
    return arrays


def _batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with np.load(FIXTURE / "inputs.npz") as data:
        return {k: torch.from_numpy(v).to(dtype) if v.dtype == np.float64 else torch.from_numpy(v)
                for k, v in data.items()}


def _relative_errors(out: dict, batch: dict, expected: dict[str, np.ndarray]) -> dict[str, float]:
    """max|got - expected| / max|expected| per array (every position is real in the fixture)."""
    errors = {}
    for name, get in OUTPUTS.items():
        got = get(out, batch).detach().double().numpy()
        want = expected[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    return errors


def _table(errors: dict[str, float]) -> str:
    return "\n".join(f"  {name:32s} {err:.2e}" for name, err in errors.items())


@pytest.mark.parametrize("source", SOURCES)
def test_float64_outputs_match_openfold(source, expected):
    model = load_model(FIXTURE / source, FIXTURE / "config.json")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    model = model.double()  # float32 values: the cast is exact
    batch = _batch(torch.float64)
    with torch.no_grad():
        out = model(batch, n_recycles=1)
    assert out["final_atom37"].dtype == torch.float64
    errors = _relative_errors(out, batch, expected)
    assert max(errors.values()) <= 1e-6, f"{source}, relative errors:\n{_table(errors)}"


@pytest.mark.parametrize("source", SOURCES)
def test_bf16_autocast_outputs_within_bf16_rounding(source, expected):
    """bf16 autocast against the float64 reference, within what bf16 rounding alone does to this network.

    "bf16 rounding" is measured here, not guessed: the same float32 model with every weight and input rounded
    once to bf16 (a relative change of at most 2^-9 per number) moves the outputs by 4e-3 (Evoformer single,
    masked-MSA logits) to 8e-2 (atom positions, pair, PAE logits) of their range: these random weights amplify
    rounding through the pair stack and the 8 structure layers. Autocast rounds every matmul's inputs, not
    only once, and was measured at 0.4-1.6 times that; the bound is 3 times it plus bf16's unit roundoff 2^-8
    (for outputs the rounding leaves exact, the max PAE). The baseline runs the same imported weights, so the
    absolute cap of 0.2 is what catches a wrong import here: one moves outputs by O(1) (0.64 for one
    unpermuted IPA projection).
    """
    model = load_model(FIXTURE / source, FIXTURE / "config.json")
    batch = _batch(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, n_recycles=1)
    assert out["pair"].dtype == torch.float32 and out["pae_logits"].dtype == torch.bfloat16  # autocast acted
    errors = _relative_errors(out, batch, expected)

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        rounded = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in batch.items()}
        baseline = _relative_errors(model(rounded, n_recycles=1), batch, expected)
    bound = {name: 3 * baseline[name] + 2**-8 for name in errors}
    report = "\n".join(f"  {name:32s} autocast {err:.2e}  one rounding {baseline[name]:.2e}"
                       for name, err in errors.items())
    assert all(errors[name] <= bound[name] for name in errors), f"{source}:\n{report}"
    assert max(errors.values()) < 0.2, report
