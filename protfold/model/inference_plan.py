"""Inference memory planned from the shapes and a byte budget: `plan_inference` (no grad, `protfold predict`).

A pure function of (N_res, N_seq, N_extra, budget, model sizes, compute dtype): it counts the bytes alive at the
peak of a no-grad forward for each candidate `MemoryConfig`, fastest first, and returns the first that fits.

The count (bytes; a = bytes per element of the compute dtype, 2 for bf16; the pair stream z is fp32 in the model
whatever the autocast dtype, as the input embedder's relative-position term is fp32; `pair_dtype` counts a z
kept in another dtype, as a single block's benchmark against OpenFold keeps it in bf16, and a plan with
`pair_storage='bf16'` counts z at 2 bytes):
- floor: z [N, N, c_z] (one copy: the embedders write it in place, every block updates it in place), the
  pair mask [N, N] fp32, the MSA streams m [S, N, c_m] fp32 and e [E, N, c_e] twice each (stream and one update);
- the low-memory triangle multiplication: its combined edge x [N, N, c_hidden] in the compute dtype (zero on the
  device with `offload_triangle_edge`) and one fp32 slice of the b edge (a sixteenth of z in fp32; with row chunks
  of N/8 rows or more, two fp32 row chunks of z more, inside the pair-row transients below: `triangle_exec.py`);
- the attention biases [H, N, N] of MSA row attention (compute dtype) and triangle attention (fp32: the naive
  kernel adds it in the logits' up-cast pass), made whole;
- one chunk's transients, the largest of: attention logits (3 x `attention_chunk_mb`, at least one row's
  [H, N, N] and at most all the logits: logits, softmax, output; with `attention: triton`, which makes no logits,
  the chunk's rows of normalised input, q, k, v, gate and output instead, [rows, N, c + 5 H c] fp32-counted, as
  `primitives.capped_chunk` sizes them, and the triangle attention bias in the compute dtype),
  the pair transition / OPM / LayerNorm rows (`pair_chunk` rows of N), the structure module's IPA rows
  (`structure_chunk` queries: fp32 LayerNorm of z's rows, pair bias, logits, point differences
  [rows, N, H, P, 3]) and the heads' PAE logits rows (`head_chunk` rows of [N, 64] fp32, three times).
The plain path (no switch) is counted as three pair tensors (the recycled z, the embedding, their sum), the
previous pass's distogram and PAE logits, and the two largest whole-size intermediates it makes: the triangle update's
projections, triangle attention's logits [N, H, N, N], MSA row attention's [S, H, N, N] and [E, H, N, N] (with the
Triton kernel: their activations instead), the
distogram and PAE logits and IPA's point differences. A plan with the triangle edge in host memory also needs the
edge [N, N, c_hidden] (compute dtype; counted twice, for the pinned allocator's rounding: `host_edge_bytes`) in
host memory: it is taken only if that fits `HEADROOM` x the host's available memory (`host_bytes`, default
`available_host_bytes()`, the memory cgroup's limit included). Plans are tested to compute the plain path's
outputs (tests/model/test_inference_plan.py) and their counts against peaks measured on the CPU
(`memory.peak_new_bytes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from protfold.config import MemoryConfig, ModelConfig
from protfold.model.primitives import attention_row_bytes

__all__ = ["HEADROOM", "NEAR_SMALLEST", "InferenceShape", "available_host_bytes", "host_edge_bytes", "plan_inference",
           "predicted_peak_bytes"]

GiB = 2**30
# fraction of the budget plans may use: the allocator's fragmentation and cuBLAS / kernel workspaces come on top
HEADROOM = 0.85
_ROWS = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)  # candidate chunk rows, largest (fastest) first
_ATTENTION_MB = (512.0, 64.0, 8.0)  # candidate caps on one chunk's fp32 attention logits, largest first
NEAR_SMALLEST = 0.02  # when nothing fits: plans within 2% of the smallest peak count as the smallest


@dataclass(frozen=True)
class InferenceShape:
    """The shapes a plan is made for: residues, MSA cluster rows, extra MSA rows."""

    n_res: int
    n_seq: int
    n_extra: int


def _floor(shape: InferenceShape, cfg: ModelConfig, z_bytes: int) -> int:
    """z, the pair mask and the MSA streams (each stream and one update alive)."""
    n, s, e = shape.n_res, shape.n_seq, shape.n_extra
    # per residue, small beside the pair at long N: the structure module's per-layer outputs (frames, atoms,
    # angles), the single representations and the masked-MSA logits
    linear = 4 * n * (cfg.n_structure_layers * 256 + 1024 + 8 * cfg.c_s) + 4 * s * n * cfg.msa_classes
    return z_bytes * n * n * cfg.c_z + 4 * n * n + 2 * 4 * s * n * cfg.c_m + 2 * 4 * e * n * cfg.c_e + linear


def _attention_rows(shape: InferenceShape, cfg: ModelConfig, fused: bool) -> list[tuple[int, int]]:
    """(rows, bytes per row) of each row attention's transients: triangle attention (N rows), MSA row attention (S),
    the extra MSA stack's (E). Naive kernel: 3 fp32 [H, N, N] per row (logits, biased, softmax); the fused Triton
    kernel: the row's [N, c + 5 H c] fp32-counted activations (`primitives.capped_chunk`)."""
    n = shape.n_res
    attentions = ((n, cfg.c_z, cfg.pair_heads, cfg.pair_head_dim), (shape.n_seq, cfg.c_m, cfg.msa_heads, cfg.msa_head_dim),
                  (shape.n_extra, cfg.c_e, cfg.extra_msa_heads, cfg.extra_msa_head_dim))
    kernel, buffers = ("triton", 1) if fused else ("naive", 3)
    return [(rows, buffers * attention_row_bytes(n, c, heads, dim, kernel)) for rows, c, heads, dim in attentions]


def _plain_peak(shape: InferenceShape, cfg: ModelConfig, a: int, z_bytes: int, fused: bool) -> int:
    n = shape.n_res
    pair = n * n
    attention = [rows * per_row for rows, per_row in _attention_rows(shape, cfg, fused)]
    attention[0] += 4 * pair * cfg.c_z  # triangle attention's LN(z)
    candidates = (
        pair * cfg.tri_mul_hidden * (4 * a + 4) + 2 * 4 * pair * cfg.c_z,  # a, b, gates, fp32 einsum, LN(z), out
        *attention,
        2 * 4 * pair * cfg.c_z * cfg.transition_factor,  # pair transition hidden
        3 * 4 * pair * max(cfg.distogram_bins, cfg.pae_bins),  # distogram / PAE logits, their softmax
        4 * pair * (cfg.c_z * 2 + cfg.ipa_heads * (cfg.ipa_qk_points * 3 + 4)),  # IPA: LN(z) fp32, diff, logits
    )
    # besides: the embedders' own z and z + update beside the recycled z (two more pair tensors), and the previous
    # pass's outputs, alive during the next pass: its distogram and PAE logits
    kept = 2 * 4 * pair * cfg.c_z + 2 * 4 * pair * max(cfg.distogram_bins, cfg.pae_bins)
    kept += 4 * n * (shape.n_seq * cfg.c_m + shape.n_extra * cfg.c_e) * cfg.transition_factor  # MSA transitions' hidden
    largest, second = sorted(candidates)[-2:][::-1]
    return _floor(shape, cfg, z_bytes) + kept + largest + second  # the two largest: an upper estimate of overlaps


def _z_element_bytes(mem: MemoryConfig, pair_dtype: torch.dtype) -> int:
    """Bytes per element of z: 2 where the plan stores it in bf16 (`pair_storage`), else `pair_dtype`'s."""
    return 2 if mem.pair_storage == "bf16" else pair_dtype.itemsize


def predicted_peak_bytes(mem: MemoryConfig, shape: InferenceShape, cfg: ModelConfig, dtype: torch.dtype,
                         pair_dtype: torch.dtype = torch.float32) -> int:
    """Bytes alive at the peak of a no-grad forward of `cfg` at `shape` under `mem` (the module docstring's count),
    with the pair stream z stored in `pair_dtype` (in bf16 under `mem.pair_storage='bf16'`). Exact switch-by-switch
    accounting is not attempted: each term is an upper estimate of what it counts."""
    a = torch.empty((), dtype=dtype).element_size()
    z_bytes = _z_element_bytes(mem, pair_dtype)
    fused = mem.attention == "triton"
    if not (mem.low_memory_triangle and mem.pair_chunk and mem.attention_chunk_mb and mem.structure_chunk
            and mem.head_chunk):
        return _plain_peak(shape, cfg, a, z_bytes, fused)
    n = shape.n_res
    pair = n * n
    edge = 0 if mem.offload_triangle_edge else pair * cfg.tri_mul_hidden * a
    edge += 4 * pair * cfg.c_z // 16  # the fp32 b-edge slice (triangle_exec.py: a sixteenth of z in fp32)
    # triangle attention's bias is kept in fp32 for the naive kernel (added in the logits' up-cast pass)
    biases = pair * max(a * cfg.msa_heads, (a if fused else 4) * cfg.pair_heads)
    r, rs, rh = min(mem.pair_chunk, n), min(mem.structure_chunk, n), min(mem.head_chunk, n)
    cap = int(mem.attention_chunk_mb * 2**20)
    if fused:  # each attention's chunk: at least one row, at most all of them
        attention = max(min(rows * per_row, max(cap, per_row)) for rows, per_row in _attention_rows(shape, cfg, True))
    else:  # the cap counts one of the naive kernel's three logits-sized buffers
        whole_logits = 4 * pair * max(shape.n_seq * cfg.msa_heads, shape.n_extra * cfg.extra_msa_heads,
                                      n * cfg.pair_heads)
        one_row = 4 * pair * max(cfg.msa_heads, cfg.extra_msa_heads, cfg.pair_heads)
        attention = 3 * min(whole_logits, max(cap, one_row))
    transients = (
        attention,
        r * n * 4 * (2 * cfg.c_z * cfg.transition_factor + cfg.opm_hidden**2 + 3 * cfg.c_z),
        rs * n * 4 * (3 * cfg.c_z + cfg.ipa_heads * (cfg.ipa_qk_points * 3 * 2 + 6)),
        rh * n * 4 * (3 * max(cfg.distogram_bins, cfg.pae_bins) + 4 * cfg.c_z + cfg.recycle_bins),
    )
    return _floor(shape, cfg, z_bytes) + edge + biases + max(transients)


def host_edge_bytes(n_res: int, cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Host bytes of a plan with the triangle edge in host memory, at most: the combined edge [N, N, c_hidden] in the
    compute dtype (`triangle_exec._host_buffer`, one tensor per channel slice; only one triangle update's edge is
    alive), twice over, since torch's pinned-memory allocator rounds each block up to a power of two (a pageable
    fallback holds what pinning had not)."""
    return 2 * n_res * n_res * cfg.tri_mul_hidden * dtype.itemsize


def available_host_bytes() -> int:
    """The host memory available to new allocations: MemAvailable of /proc/meminfo (Linux; counts reclaimable page
    cache), else the free physical pages (`os.sysconf`); no more than the process's memory cgroup has left."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024  # in kB
                    break
    except OSError:
        pass
    if free is None:
        free = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    left = _cgroup_left()
    return free if left is None else min(free, left)


def _cgroup_left(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes the memory cgroup (v2 `memory.max` - `memory.current`, or v1 `memory.limit_in_bytes` -
    `memory.usage_in_bytes`) still allows, or None without a limit (or outside Linux)."""
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(os.path.join(root, limit)) as f:
                text = f.read().strip()
            with open(os.path.join(root, usage)) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if text == "max" or not text.isdigit() or int(text) >= 1 << 60:  # v1 writes a huge number for no limit
            return None
        return max(0, int(text) - used)
    return None


def _candidates(n_res: int, bf16_pair: bool = False, attention: str = "naive") -> list[tuple[str, MemoryConfig]]:
    """Plans from fastest to smallest: the plain path, then chunked ones with ever smaller chunks; with
    `bf16_pair` (bf16 autocast), then the same with z stored in bf16 (half the floor, at bf16's precision for the
    pair stream: after every fp32-z plan on the device); then with the triangle edge in host memory (copying it
    back costs time, so it comes last), fp32 z first. Every plan runs the `attention` kernel."""
    plans = [("plain (no chunking)", MemoryConfig(attention=attention))]
    rows = [r for r in _ROWS if r <= n_res] or [1]
    storages = ("fp32", "bf16") if bf16_pair else ("fp32",)
    for offload in (False, True):
        for storage in storages:
            for cap in _ATTENTION_MB:
                for r in rows:
                    mem = MemoryConfig(pair_chunk=r, attention_chunk_mb=cap, low_memory_triangle=True,
                                       offload_triangle_edge=offload, structure_chunk=r, head_chunk=r,
                                       pair_storage=storage, attention=attention)
                    plans.append((f"chunks of {r} rows, attention chunks <= {cap:g} MiB, in-place triangle updates"
                                  + (", z stored in bf16" if storage == "bf16" else "")
                                  + (", triangle edge in host memory (pinned where possible)" if offload else ""),
                                  mem))
    return plans


def plan_inference(n_res: int, n_seq: int, n_extra: int, budget_bytes: int, model_cfg: ModelConfig,
                   dtype: torch.dtype = torch.bfloat16,
                   pair_dtype: torch.dtype = torch.float32, *,
                   host_bytes: int | None = None, attention: str = "naive") -> tuple[MemoryConfig, int, str]:
    """The fastest inference `MemoryConfig` whose predicted peak fits `HEADROOM` x `budget_bytes`, and, for a plan
    with the triangle edge in host memory, whose edge (`host_edge_bytes`) fits `HEADROOM` x `host_bytes` (default:
    `available_host_bytes()`); plans whose edge does not fit the host are never returned. Under bf16 autocast
    (`dtype` bf16) with z otherwise fp32, plans that store z in bf16 are candidates too, after the fp32-z ones.
    Every plan runs the `attention` kernel (naive by default; "triton" counts its transients, not logits).

    Returns (plan, its predicted peak in bytes, a one-line explanation). When no plan fits, the fastest of those
    within `NEAR_SMALLEST` of the smallest predicted peak (the floor dominates there, and chunks of one row would
    cost thousands of kernel launches for a few MiB), and the explanation says it does not fit. Raises ValueError
    on shapes < 1, a budget <= 0 or host_bytes < 0.
    """
    if min(n_res, n_seq) < 1 or n_extra < 0:
        raise ValueError(f"plan_inference: n_res and n_seq must be >= 1, n_extra >= 0; got {n_res}, {n_seq}, {n_extra}")
    if budget_bytes <= 0:
        raise ValueError(f"plan_inference: budget_bytes must be > 0, got {budget_bytes}")
    if host_bytes is None:
        host_bytes = available_host_bytes()
    if host_bytes < 0:
        raise ValueError(f"plan_inference: host_bytes must be >= 0, got {host_bytes}")
    shape = InferenceShape(n_res, n_seq, n_extra)
    usable = int(budget_bytes * HEADROOM)
    host_edge = host_edge_bytes(n_res, model_cfg, dtype)
    host_fits = host_edge <= int(host_bytes * HEADROOM)
    scored = [(name, mem, predicted_peak_bytes(mem, shape, model_cfg, dtype, pair_dtype))
              for name, mem in _candidates(n_res, bf16_pair=dtype == torch.bfloat16 and pair_dtype == torch.float32,
                                           attention=attention)
              if host_fits or not mem.offload_triangle_edge]
    kernel = "" if attention == "naive" else f", attention {attention}"
    head = f"{n_res} residues, {n_seq} MSA rows, {n_extra} extra rows{kernel}, budget {_size(budget_bytes)}"
    for name, mem, peak in scored:
        if peak <= usable:
            host = (f"; triangle edge up to {_size(host_edge)} in host memory, {_size(host_bytes)} available"
                    if mem.offload_triangle_edge else "")
            return mem, peak, f"{head}: {name}; predicted peak {_size(peak)}{host}"
    smallest = min(peak for _, _, peak in scored)
    name, mem, peak = next(item for item in scored if item[2] <= smallest * (1 + NEAR_SMALLEST))
    z_bytes = _z_element_bytes(mem, pair_dtype) * n_res**2 * model_cfg.c_z
    host = "" if host_fits else (f"; plans with the triangle edge in host memory are out: the edge "
                                 f"({_size(host_edge)}) does not fit {HEADROOM:.0%} of the host's available "
                                 f"{_size(host_bytes)}")
    hint = ""
    if dtype != torch.bfloat16:  # would bf16 autocast (a bf16 edge, z stored in bf16) fit? say so, and how
        _, _, bf16_text = plan_inference(n_res, n_seq, n_extra, budget_bytes, model_cfg, torch.bfloat16, pair_dtype,
                                         host_bytes=host_bytes, attention=attention)
        if "DOES NOT FIT" not in bf16_text:
            hint = f"; under bf16 autocast (predict --precision bf16) a plan fits: {bf16_text[len(head) + 2:]}"
    return mem, peak, (f"{head}: DOES NOT FIT: the smallest plan ({name}) needs about {_size(peak)} on the device "
                       f"(the pair representation alone is {_size(z_bytes)}){host}{hint}")


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"
