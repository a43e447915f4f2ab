"""The inference memory planner and the no-grad chunked paths it turns on (pair embedders, IPA, heads): plans change
with the budget, every plan computes the plain path's outputs (fp32, 1e-5), and the planned peak bounds the peak
measured on the CPU."""

from __future__ import annotations

import pytest
import torch

from protfold.bench.synthetic import synthetic_batch
from protfold.config import MemoryConfig, model_preset
from protfold.geometry import Rigid
from protfold.model import inference_plan
from protfold.model.alphafold import AlphaFold
from protfold.model.confidence import pae_and_ptm_in_rows, predicted_aligned_error, predicted_tm_score
from protfold.model.embedders import InputEmbedder, RecyclingEmbedder, embed_pair_in_place
from protfold.model.heads import AuxiliaryHeads
from protfold.model.inference_plan import (
    HEADROOM,
    NEAR_SMALLEST,
    GiB,
    InferenceShape,
    _candidates,
    available_host_bytes,
    host_edge_bytes,
    plan_inference,
    predicted_peak_bytes,
)
from protfold.model.memory import peak_new_bytes
from protfold.model.structure import StructureModule

from .conftest import planned, randomize_, real_mask

CFG = model_preset("tiny_ptm")
KEYS = ("final_atom37", "plddt_logits", "single", "single_evoformer", "pair", "masked_msa_logits",
        "predicted_aligned_error", "ptm", "experimentally_resolved_logits")


def _model() -> AlphaFold:
    torch.manual_seed(1)
    return randomize_(AlphaFold(cfg=CFG), std=0.2).eval()


def _run(model: AlphaFold, mem: MemoryConfig, batch: dict) -> dict:
    with torch.no_grad():
        return model(batch, n_recycles=1, memory=mem)


def test_plan_changes_with_the_budget() -> None:
    af2 = model_preset("af2_ptm")
    assert plan_inference(256, 128, 1024, 80 * GiB, af2, torch.bfloat16)[0] == MemoryConfig()  # plain fits: fastest
    plans = {b: plan_inference(4096, 128, 1024, b * GiB, af2, torch.bfloat16, host_bytes=128 * GiB)
             for b in (139, 24, 12)}
    assert plans[139][0] != plans[24][0] != plans[12][0]
    peaks = [plans[b][1] for b in (139, 24, 12)]
    assert peaks == sorted(peaks, reverse=True)  # a smaller budget never gets a larger plan
    for b in (139, 24):
        assert plans[b][1] <= 0.85 * b * GiB and "predicted peak" in plans[b][2]
    assert plans[12][0].offload_triangle_edge  # the last resort: the triangle edge in host memory
    mem, peak, text = plan_inference(12288, 128, 1024, 80 * GiB, af2, torch.bfloat16, host_bytes=0)
    # without the host, 12,288 residues do not fit 80 GiB: z is 36 GiB even in bf16, and the edge as much again
    assert "DOES NOT FIT" in text and peak > 72 * GiB and mem.pair_storage == "bf16"
    with pytest.raises(ValueError, match="budget_bytes"):
        plan_inference(10, 1, 0, 0, af2)


def test_plan_counts_the_pair_dtype_and_falls_back_to_a_fast_smallest_plan() -> None:
    """A z kept in bf16 is counted at 2 bytes; when nothing fits, the plan is the fastest of those within
    NEAR_SMALLEST of the smallest peak, not chunks of one row (thousands of launches for a few MiB)."""
    af2 = model_preset("af2_ptm")
    shape = InferenceShape(4096, 128, 0)
    mem = plan_inference(4096, 128, 0, 139 * GiB, af2)[0]
    fp32, bf16 = (predicted_peak_bytes(mem, shape, af2, torch.bfloat16, d) for d in (torch.float32, torch.bfloat16))
    assert fp32 - bf16 == 2 * 4096**2 * af2.c_z
    mem, peak, text = plan_inference(4096, 128, 0, GiB, af2, torch.bfloat16, torch.bfloat16, host_bytes=128 * GiB)
    assert "DOES NOT FIT" in text and "the pair representation alone is 4.00 GiB" in text
    candidates = [predicted_peak_bytes(m, shape, af2, torch.bfloat16, torch.bfloat16) for _, m in _candidates(4096)]
    assert min(candidates) <= peak <= min(candidates) * (1 + NEAR_SMALLEST)
    assert mem.pair_chunk > 1 and mem.offload_triangle_edge


def test_host_edge_plans_need_the_edge_in_host_memory(monkeypatch) -> None:
    """A plan with the triangle edge in host memory is taken only when the edge (N^2 x c_hidden in the compute
    dtype, twice for the pinned allocator's power-of-two rounding) fits HEADROOM of the host's available memory;
    when nothing fits, the line names the host's limit. (12 GiB: at 4,096 residues z in bf16 fits 16 GiB on the
    device, and that plan comes before the host's.)"""
    af2 = model_preset("af2_ptm")
    edge = host_edge_bytes(4096, af2, torch.bfloat16)
    assert edge == 2 * 4096**2 * af2.tri_mul_hidden * 2 == 8 * GiB
    mem, _, text = plan_inference(4096, 128, 1024, 12 * GiB, af2, host_bytes=128 * GiB)
    assert mem.offload_triangle_edge and "DOES NOT FIT" not in text
    assert "triangle edge in host memory (pinned where possible)" in text and "8.00 GiB in host memory" in text
    for host in (0, edge, int(edge / HEADROOM) - 2**20):  # 85% of the last is just under the edge
        mem, peak, text = plan_inference(4096, 128, 1024, 12 * GiB, af2, host_bytes=host)
        assert not mem.offload_triangle_edge and peak > 0.85 * 12 * GiB
        assert "DOES NOT FIT" in text and "on the device" in text
        assert "triangle edge in host memory are out: the edge (8.00 GiB) does not fit 85% of the host" in text
        # nothing returned needs the host: the smallest plans on the device alone, at any budget
        assert not any(plan_inference(4096, 128, 1024, b * GiB, af2, host_bytes=host)[0].offload_triangle_edge
                       for b in (1, 8, 24))
    assert plan_inference(4096, 128, 1024, 12 * GiB, af2, host_bytes=int(edge / HEADROOM) + 1)[0].offload_triangle_edge
    # a device that fits the plan never needs the host, and the line does not mention it
    mem, _, text = plan_inference(4096, 128, 1024, 139 * GiB, af2, host_bytes=0)
    assert not mem.offload_triangle_edge and "host" not in text
    # by default the host's available memory is read (MemAvailable)
    assert available_host_bytes() > 0
    monkeypatch.setattr(inference_plan, "available_host_bytes", lambda: 0)
    assert not plan_inference(4096, 128, 1024, 12 * GiB, af2)[0].offload_triangle_edge
    monkeypatch.setattr(inference_plan, "available_host_bytes", lambda: 128 * GiB)
    assert plan_inference(4096, 128, 1024, 12 * GiB, af2)[0].offload_triangle_edge
    with pytest.raises(ValueError, match="host_bytes"):
        plan_inference(10, 1, 0, GiB, af2, host_bytes=-1)


def test_host_memory_reading_respects_the_memory_cgroup(tmp_path) -> None:
    """The host memory a plan may use is no more than the cgroup's limit less its usage (v2 and v1 files);
    no limit ("max", or v1's huge number) reads as none."""
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text(str(3 * GiB))
    assert inference_plan._cgroup_left(str(tmp_path)) == 5 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert inference_plan._cgroup_left(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2 * GiB))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(3 * GiB))
    assert inference_plan._cgroup_left(str(v1)) == 0
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(1 << 62))
    assert inference_plan._cgroup_left(str(v1)) is None
    assert inference_plan._cgroup_left(str(tmp_path / "absent")) is None


def test_every_plan_matches_the_plain_path_fp32() -> None:
    """Every plan `plan_inference` can return for these shapes (all of its candidates) computes the plain path's
    outputs; the budgets below pick several of them."""
    n, s, e = 12, 3, 4
    batch = synthetic_batch(n, s, e, seed=2)
    batch["seq_mask"] = real_mask(1, n, p=0.2)
    model = _model()
    ref = _run(model, MemoryConfig(), batch)
    plans = [mem for _, mem in _candidates(n)]
    peaks = sorted({predicted_peak_bytes(mem, InferenceShape(n, s, e), CFG, torch.float32) for mem in plans})
    chosen = {plan_inference(n, s, e, int(peak / HEADROOM) + 1, CFG, torch.float32)[0] for peak in peaks}
    assert len(chosen) >= 3
    assert chosen <= set(plans)
    for mem in plans:
        out = _run(model, mem, batch)
        for key in KEYS:
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=f"{key} under {mem}")
        if mem.head_chunk:
            assert "distogram_logits" not in out and "pae_logits" not in out


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_pair_embedding_in_place_equals_plain(rows) -> None:
    n = 7
    inp = randomize_(InputEmbedder.from_config(CFG))
    rec = randomize_(RecyclingEmbedder.from_config(CFG))
    target_feat, residue_index = torch.randn(2, n, 22), torch.tensor([[0, 1, 2, 5, 6, 40, 41]] * 2)
    z_prev, x_prev = torch.randn(2, n, n, CFG.c_z), 8 * torch.randn(2, n, 3)
    with torch.no_grad():
        ref = inp.pair_rows(target_feat, residue_index) + rec(torch.zeros(2, n, CFG.c_m), z_prev, x_prev)[1]
        buffer = z_prev.clone()
        out = embed_pair_in_place(inp, rec, target_feat, residue_index, buffer, x_prev, rows)
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_structure_module_in_query_chunks_equals_plain(rows) -> None:
    n = 9
    torch.manual_seed(3)
    module = randomize_(StructureModule(cfg=CFG), std=0.2).eval()
    plain, chunked = planned(module, MemoryConfig()), planned(module, MemoryConfig(structure_chunk=rows))
    s, z = torch.randn(2, n, CFG.c_s), torch.randn(2, n, n, CFG.c_z)
    aatype, mask = torch.randint(0, 20, (2, n)), real_mask(2, n)
    frames = Rigid.identity((2, n))
    with torch.no_grad():
        ref, out = plain(s, z, aatype, mask, frames), chunked(s, z, aatype, mask, frames)
    for key in ("frames", "positions", "angles", "single", "final_atom37"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("rows", [1, 5, 11])
def test_heads_pae_and_ptm_in_row_chunks_equal_the_whole_logits(rows) -> None:
    n = 11
    heads = planned(randomize_(AuxiliaryHeads(cfg=CFG)), MemoryConfig(head_chunk=rows))
    m, z = torch.randn(2, 3, n, CFG.c_m), torch.randn(2, n, n, CFG.c_z)
    s, mask = torch.randn(2, n, CFG.c_s), real_mask(2, n)
    with torch.no_grad():
        out = heads(m, z, s_evoformer=s, s_structure=s, seq_mask=mask)
        logits = heads.predicted_aligned_error.linear(z)
    assert "distogram_logits" not in out and "pae_logits" not in out
    pae, max_pae = predicted_aligned_error(logits)
    torch.testing.assert_close(out["predicted_aligned_error"], pae, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ptm"], predicted_tm_score(logits, mask), rtol=1e-5, atol=1e-5)
    assert float(out["max_predicted_aligned_error"]) == float(max_pae)
    # without weights every residue counts, as in predicted_tm_score
    _, _, ptm = pae_and_ptm_in_rows(lambda a, b: logits.narrow(-3, a, b), n, rows, n_bins=64, like=s)
    torch.testing.assert_close(ptm, predicted_tm_score(logits), rtol=1e-5, atol=1e-5)


def test_planned_peak_bounds_the_measured_peak() -> None:
    """On the CPU (fp32), the peak of a whole no-grad forward with one recycle stays under the plan's count (the plain
    path, 16- and 4-row chunks, the smallest plan), and a chunked plan's measured peak is below the plain path's."""
    n, s, e = 24, 3, 4
    batch = synthetic_batch(n, s, e, seed=1)
    model = _model()
    existing = list(model.parameters()) + [v for v in batch.values() if torch.is_tensor(v)]
    shape = InferenceShape(n, s, e)
    measured = {}
    chunked = [m for _, m in _candidates(n) if m.pair_chunk in (16, 4) and m.attention_chunk_mb == 8.0
               and not m.offload_triangle_edge]
    for mem in (MemoryConfig(), *chunked, _candidates(n)[-1][1]):  # the plain path, 16- and 4-row chunks, smallest
        with torch.no_grad():
            measured[mem] = peak_new_bytes(lambda: model(batch, n_recycles=1, memory=mem), existing)
        assert measured[mem] <= predicted_peak_bytes(mem, shape, CFG, torch.float32), mem
    assert measured[_candidates(n)[-1][1]] < measured[MemoryConfig()]
    floor = 4 * n * n * CFG.c_z  # z itself is alive throughout
    assert min(measured.values()) > floor


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_bf16_pair_storage_adds_only_bf16_rounding() -> None:
    """z stored in bf16 (`pair_storage='bf16'`, under bf16 autocast) against the same plan with z in fp32 under the
    same autocast, both against the fp32 plain path: storing z in bf16 adds an error of bf16's order (8 mantissa
    bits, a few 1e-3 relative) and no more than a few times autocast's own; z really is bf16, through the recycles."""
    n, s, e = 12, 3, 4
    batch = synthetic_batch(n, s, e, seed=3)
    batch["seq_mask"] = real_mask(1, n, p=0.2)
    model = _model()
    ref = _run(model, MemoryConfig(), batch)
    chunked = MemoryConfig(pair_chunk=4, attention_chunk_mb=8, low_memory_triangle=True, structure_chunk=4,
                           head_chunk=4)
    out = {}
    for storage in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[storage] = _run(model, MemoryConfig(**{**chunked.__dict__, "pair_storage": storage}), batch)
    assert out["bf16"]["pair"].dtype == torch.bfloat16 and out["fp32"]["pair"].dtype == torch.float32
    for key in ("final_atom37", "plddt_logits", "single", "predicted_aligned_error", "ptm"):
        autocast_err, storage_err = _rel(out["fp32"][key], ref[key]), _rel(out["bf16"][key], ref[key])
        assert storage_err < 3e-2, (key, storage_err)
        assert storage_err < 4 * autocast_err + 1e-2, (key, storage_err, autocast_err)
        assert torch.isfinite(out["bf16"][key].float()).all()


def test_bf16_pair_storage_is_refused_where_it_cannot_act() -> None:
    with pytest.raises(ValueError, match="set head_chunk"):
        MemoryConfig(pair_storage="bf16")
    with pytest.raises(ValueError, match="pair_storage must be"):
        MemoryConfig(head_chunk=4, pair_storage="fp16")
    mem = MemoryConfig(pair_chunk=4, attention_chunk_mb=8, low_memory_triangle=True, structure_chunk=4,
                       head_chunk=4, pair_storage="bf16")
    with pytest.raises(ValueError, match="needs bf16 autocast"):
        _run(_model(), mem, synthetic_batch(8, 2, 3, seed=0))


def test_planner_stores_z_in_bf16_only_under_bf16_and_where_fp32_z_does_not_fit() -> None:
    """At 12,288 residues on a 139 GiB card fp32 z (72 GiB) leaves no device plan; under bf16 autocast the plan keeps
    z in bf16 on the device instead of moving the triangle edge to host memory. Where fp32 z fits (4,096), and
    under fp32, z stays fp32. Every bf16-storage plan the planner picks at these budgets computes what its
    fp32-storage twin computes within bf16 rounding (the test above, for one of them)."""
    af2 = model_preset("af2_ptm")
    mem, peak, text = plan_inference(12288, 128, 1024, 139 * GiB, af2, torch.bfloat16, host_bytes=128 * GiB)
    assert mem.pair_storage == "bf16" and not mem.offload_triangle_edge and "z stored in bf16" in text
    assert peak <= HEADROOM * 139 * GiB
    assert plan_inference(4096, 128, 1024, 139 * GiB, af2, torch.bfloat16)[0].pair_storage == "fp32"
    fp32 = plan_inference(12288, 128, 1024, 139 * GiB, af2, torch.float32, host_bytes=128 * GiB)[0]
    assert fp32.pair_storage == "fp32"
    assert all(m.pair_storage == "fp32" for _, m in _candidates(12288))  # bf16 plans only when asked for
    smaller = plan_inference(12288, 128, 1024, 80 * GiB, af2, torch.bfloat16, host_bytes=128 * GiB)[0]
    assert smaller.pair_storage == "bf16" and smaller.offload_triangle_edge  # an 80 GB card: edge on the host too
    # under fp32 nothing fits 139 GiB at 12,288, and the line says that bf16 autocast would, with which plan
    _, _, text = plan_inference(12288, 128, 1024, 139 * GiB, af2, torch.float32, host_bytes=128 * GiB)
    assert "DOES NOT FIT" in text and "under bf16 autocast (predict --precision bf16) a plan fits: chunks of" in text
    assert "z stored in bf16; predicted peak" in text
    _, _, text = plan_inference(12288, 128, 1024, 20 * GiB, af2, torch.float32, host_bytes=128 * GiB)
    assert "DOES NOT FIT" in text and "bf16 autocast" not in text  # no hint where bf16 does not fit either


def test_planned_peak_bounds_the_measured_peak_with_z_in_bf16() -> None:
    """Under bf16 autocast on the CPU, a plan that stores z in bf16 peaks under its count and below the same plan
    with z in fp32 (the floor halves)."""
    n, s, e = 24, 3, 4
    batch = synthetic_batch(n, s, e, seed=1)
    model = _model()
    existing = list(model.parameters()) + [v for v in batch.values() if torch.is_tensor(v)]
    smallest = _candidates(n)[-1][1]  # fp32 z, the smallest rows and attention chunks, the edge in host memory
    measured = {}
    for storage in ("fp32", "bf16"):
        mem = MemoryConfig(**{**smallest.__dict__, "offload_triangle_edge": False, "pair_storage": storage})
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            measured[storage] = peak_new_bytes(lambda: model(batch, n_recycles=1, memory=mem), existing)
        assert measured[storage] <= predicted_peak_bytes(mem, InferenceShape(n, s, e), CFG, torch.bfloat16), storage
    assert measured["bf16"] < measured["fp32"]


def test_plans_for_the_triton_kernel_count_no_logits() -> None:
    """With attention "triton" every candidate runs the kernel, its count never exceeds the naive kernel's for the
    same chunks and drops where the logits dominate (small attention chunks' rows at long lengths, the plain path),
    and a budget between the two smallest plans fits only the kernel's; the plan line names the kernel."""
    af2 = model_preset("af2_ptm")
    shape = InferenceShape(4096, 128, 1024)
    naive, fused = _candidates(4096, bf16_pair=True), _candidates(4096, bf16_pair=True, attention="triton")
    assert [n for n, _ in naive] == [n for n, _ in fused] and all(m.attention == "triton" for _, m in fused)
    peaks = [(predicted_peak_bytes(a, shape, af2, torch.bfloat16), predicted_peak_bytes(b, shape, af2, torch.bfloat16))
             for (_, a), (_, b) in zip(naive, fused)]
    assert all(t <= n for n, t in peaks)
    assert peaks[0][1] < peaks[0][0]  # the plain path: no [N, H, N, N] logits
    assert sum(t < n for n, t in peaks) >= len(peaks) // 2
    smallest = {k: min(p[i] for p in peaks) for i, k in enumerate(("naive", "triton"))}
    assert smallest["triton"] < smallest["naive"]
    budget = int((smallest["triton"] + smallest["naive"]) / 2 / HEADROOM)
    host = 128 * GiB
    _, _, text_naive = plan_inference(4096, 128, 1024, budget, af2, torch.bfloat16, host_bytes=host)
    mem, peak, text = plan_inference(4096, 128, 1024, budget, af2, torch.bfloat16, host_bytes=host, attention="triton")
    assert "DOES NOT FIT" in text_naive and "DOES NOT FIT" not in text
    assert mem.attention == "triton" and peak <= HEADROOM * budget and ", attention triton, budget" in text


def test_every_plan_for_the_triton_kernel_matches_the_plain_path(triton_interpreter) -> None:
    """Plans for the Triton kernel (Triton's interpreter on the CPU): the plain path and chunks of 4 rows with the
    largest and smallest attention caps, host edge on and off, compute the plain naive path's outputs (fp32, 1e-5)."""
    n, s, e = 12, 3, 4
    batch = synthetic_batch(n, s, e, seed=2)
    batch["seq_mask"] = real_mask(1, n, p=0.2)
    model = _model()
    ref = _run(model, MemoryConfig(), batch)
    plans = [mem for _, mem in _candidates(n, attention="triton")
             if mem.pair_chunk is None or (mem.pair_chunk == 4 and mem.attention_chunk_mb in (8.0, 512.0))]
    assert len(plans) == 5 and all(m.attention == "triton" for m in plans)
    for mem in plans:
        out = _run(model, mem, batch)
        for key in KEYS:
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5, msg=f"{key} under {mem}")
