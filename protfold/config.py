"""Frozen dataclasses for every setting: model presets, memory switches, data and loss settings.

Dimension glossary used across the package (shapes in docstrings):
  B batch, N_seq MSA cluster rows (S), N_extra extra MSA rows (E), N_res residues (N, i, j, k),
  H heads, c_m / c_z / c_s / c_e channels of MSA, pair, single and extra-MSA representations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

DEFAULT_TRIANGLE_SLICE_MB = 512.0  # MemoryConfig.triangle_slice_mb when it is not set
ATTENTION_KERNELS = ("naive", "sdpa", "flex", "triton")  # MemoryConfig.attention's choices


@dataclass(frozen=True)
class MemoryConfig:
    """Speed/memory trade-offs. Invariant: no field changes what the model computes (tests enforce it).

    Resolved once per grad mode and device into the `MemoryPlan` that runs (`protfold.model.plan.resolve`).
    """

    blocks_per_checkpoint: int | None = None  # recompute every k Evoformer / extra-MSA blocks in backward
    recompute_inside_block: bool = False  # finer: recompute attention and triangle ops inside a block
    msa_chunk: int | None = None  # MSA rows (row attention) / columns (column attention) per chunk
    pair_chunk: int | None = None  # pair rows per chunk: triangle attention, OPM, transitions
    attention_chunk_mb: float | None = None  # cap on one chunk's fp32 attention logits (MiB): rows adapt to N
    low_memory_triangle: bool = False  # triangle mult. updates keep no [N, N, c_hidden] tensors for backward
    # training, with low_memory_triangle: the [N, N, c_hidden] projections are made and recomputed in channel
    # slices of at most this many MiB per fp32 edge (None: DEFAULT_TRIANGLE_SLICE_MB). Smaller: a lower peak at
    # large N, a few more kernel launches.
    triangle_slice_mb: float | None = None
    # attention kernel dispatch (protfold.model.primitives): naive, sdpa, flex (FlexAttention, CUDA) or triton
    # (protfold's fused kernel with the row-shared pair bias and its gradient, CUDA; protfold.model.kernels.attention)
    attention: Literal["naive", "sdpa", "flex", "triton"] = "naive"
    checkpoint_storage: Literal["fp32", "bf16", "cpu"] = "fp32"  # how saved block boundaries are kept
    # recompute each structure-module layer in backward (only its inputs s, frames and the shared z are kept;
    # without it every layer keeps its IPA point differences [B, N, N, H, P, 3] and pair-sized casts of z)
    recompute_structure: bool = False
    # no grad, with low_memory_triangle: keep the triangle multiplication's combined edge x [N, N, c_hidden]
    # (pair-sized) in host memory (pinned where possible) instead of on the device; its rows are copied back
    # chunk by chunk
    offload_triangle_edge: bool = False
    # with grad: run each Evoformer / extra-MSA block through torch.compile (fused kernels, fewer launches; the
    # same function up to float reordering, ~1e-7 relative in fp32; dropout masks drawn by the eager kernels).
    # One compile serves every block of a stack; a new input shape compiles again.
    compile_blocks: bool = False
    # no grad only: IPA query rows per chunk in the structure module (its [H, N, N] logits, the pair-bias
    # projection and the fp32 LayerNorm of z are made for these rows only, never for the whole pair)
    structure_chunk: int | None = None
    # no grad only: pair rows per chunk for the heads and the pair embedders (input, recycling), which then
    # write z in place; the heads then return only what `protfold predict` writes: no distogram or PAE logits
    # ([N, N, bins]), the PAE and pTM computed from the PAE logits row chunk by row chunk
    head_chunk: int | None = None
    # no grad, with head_chunk, under bf16 autocast: the pair representation z stored in "bf16" instead of "fp32"
    # (half its bytes: 36 GiB instead of 72 at 12,288 residues; each pair update is added in bf16). `protfold
    # predict --precision bf16` plans it where fp32 z does not fit on the device.
    pair_storage: Literal["fp32", "bf16"] = "fp32"
    # triangle multiplication and triangle attention with grad or without chunking: "torch" (protfold's own path)
    # or "cueq", NVIDIA's cuEquivariance kernels (`pip install protfold[cueq]`, CUDA; protfold.model.kernels.cueq).
    # Where cueq cannot run (no CUDA, package missing, unsupported widths) the torch path runs, logged once.
    triangle_kernel: Literal["torch", "cueq"] = "torch"

    def __post_init__(self) -> None:
        if self.attention_chunk_mb is not None and not self.attention_chunk_mb > 0:
            raise ValueError(f"MemoryConfig.attention_chunk_mb must be > 0 or None, got {self.attention_chunk_mb!r}")
        if self.triangle_slice_mb is not None and not self.triangle_slice_mb > 0:
            raise ValueError(f"MemoryConfig.triangle_slice_mb must be > 0, got {self.triangle_slice_mb!r}")
        if self.triangle_slice_mb is not None and not self.low_memory_triangle:
            raise ValueError(
                "MemoryConfig.triangle_slice_mb sizes the channel slices of the low-memory triangle update, so "
                "alone it changes nothing: set low_memory_triangle as well, or leave triangle_slice_mb unset"
            )
        for name in ("blocks_per_checkpoint", "msa_chunk", "pair_chunk", "structure_chunk", "head_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MemoryConfig.{name} must be a positive integer or None, got {value!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"MemoryConfig.attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}"
            )
        if self.triangle_kernel not in ("torch", "cueq"):
            raise ValueError(f"MemoryConfig.triangle_kernel must be 'torch' or 'cueq', got {self.triangle_kernel!r}")
        if self.pair_storage not in ("fp32", "bf16"):
            raise ValueError(f"MemoryConfig.pair_storage must be 'fp32' or 'bf16', got {self.pair_storage!r}")
        if self.pair_storage == "bf16" and self.head_chunk is None:
            raise ValueError(
                "MemoryConfig.pair_storage='bf16' keeps z in bf16 through the in-place pair embedding of a no-grad "
                "forward: set head_chunk as well (inference only)"
            )
        if self.checkpoint_storage not in ("fp32", "bf16", "cpu"):
            raise ValueError(
                f"MemoryConfig.checkpoint_storage must be 'fp32', 'bf16' or 'cpu', got {self.checkpoint_storage!r}"
            )
        if self.offload_triangle_edge and not self.low_memory_triangle:
            raise ValueError(
                "MemoryConfig.offload_triangle_edge moves the combined edge of the low-memory triangle update "
                "(no grad) to host memory: set low_memory_triangle as well"
            )
        chunking = [name for name in ("msa_chunk", "pair_chunk", "attention_chunk_mb") if getattr(self, name)]
        if self.compile_blocks and chunking:  # recompute_inside_block alone has no loop: 9 checkpoints per block
            import warnings

            warnings.warn(
                f"MemoryConfig.compile_blocks with {', '.join(chunking)}: exact, but "
                "every chunk loop is unrolled into the compiled graph, so compiling takes longer the more chunks a "
                "crop needs (minutes on a CPU for a few dozen)",
                stacklevel=3,
            )
        if self.checkpoint_storage != "fp32" and self.blocks_per_checkpoint is None:
            raise ValueError(
                f"MemoryConfig.checkpoint_storage={self.checkpoint_storage!r} only applies to saved block "
                "boundaries: set blocks_per_checkpoint as well"
            )


# Package data (pyproject's package-data), so presets are found from any install, not only a source checkout.
MEMORY_PRESET_DIR = Path(__file__).resolve().parent / "resources" / "memory"


def memory_preset_names() -> list[str]:
    """Names of the shipped memory presets (`protfold/resources/memory/NAME.yaml`)."""
    return sorted(p.stem for p in MEMORY_PRESET_DIR.glob("*.yaml"))


def memory_preset_path(name: str) -> Path | None:
    """The YAML file of the shipped preset NAME (bare MemoryConfig fields), or None if there is none."""
    path = MEMORY_PRESET_DIR / f"{name}.yaml"
    return path if name and Path(name).name == name and path.is_file() else None


def load_memory_preset(name_or_path: str) -> MemoryConfig:
    """MemoryConfig of a shipped preset NAME, or of a YAML file: `model: memory: {fields}`, `memory:` or bare.

    Raises ValueError naming the file (or the known presets) and the reason.
    """
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        path = memory_preset_path(name_or_path)
    if path is None:
        known = ", ".join(memory_preset_names())
        raise ValueError(f"unknown memory mode {name_or_path!r} (not a file; presets: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        found = data.get("model", {}).get("memory", data.get("memory", data)) or {}
        return MemoryConfig(**found)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Network sizes (AF2 supplement section 1.5-1.8; defaults are the full `af2` preset, no templates)."""

    c_m: int = 256
    c_z: int = 128
    c_s: int = 384
    c_e: int = 64
    n_evoformer_blocks: int = 48
    n_extra_msa_blocks: int = 4
    extra_msa_enabled: bool = True
    msa_heads: int = 8
    msa_head_dim: int = 32
    extra_msa_heads: int = 8
    extra_msa_head_dim: int = 8
    pair_heads: int = 4
    pair_head_dim: int = 32
    opm_hidden: int = 32
    tri_mul_hidden: int = 128
    transition_factor: int = 4
    msa_dropout: float = 0.15
    pair_dropout: float = 0.25
    # structure module
    n_structure_layers: int = 8
    ipa_heads: int = 12
    ipa_head_dim: int = 16
    ipa_qk_points: int = 4
    ipa_v_points: int = 8
    structure_dropout: float = 0.1
    c_resnet: int = 128
    n_resnet_blocks: int = 2
    position_scale: float = 10.0  # Angstrom per structure-module unit
    # embeddings and heads
    target_feat_dim: int = 22
    msa_feat_dim: int = 49
    extra_msa_feat_dim: int = 25
    max_relative_position: int = 32
    recycle_bins: int = 15
    recycle_min_bin: float = 3.25
    recycle_max_bin: float = 20.75
    distogram_bins: int = 64
    plddt_bins: int = 50
    c_plddt: int = 128
    msa_classes: int = 23
    experimentally_resolved: bool = True
    # AF2 supplement 1.9.7: the predicted aligned error head (PAE and pTM; on in the `_ptm` presets, as in
    # AF2's `model_*_ptm` parameters); bins over [0, pae_max_bin] A, the last one open
    predicted_aligned_error: bool = False
    pae_bins: int = 64
    pae_max_bin: float = 31.0
    max_recycles: int = 3  # extra passes in training: 0..max_recycles drawn per step
    eval_recycles: int = 3  # fixed count in evaluation
    max_crop: int = 4096  # the longest crop the model accepts (config error beyond it)


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        c_m=16, c_z=8, c_s=16, c_e=8, n_evoformer_blocks=2, n_extra_msa_blocks=1, msa_heads=2, msa_head_dim=4,
        extra_msa_heads=2, extra_msa_head_dim=4, pair_heads=2, pair_head_dim=4, opm_hidden=4, tri_mul_hidden=8,
        transition_factor=2, n_structure_layers=2, ipa_heads=2, ipa_head_dim=4, ipa_qk_points=2, ipa_v_points=2,
        c_resnet=8, c_plddt=8, max_recycles=1, eval_recycles=1,
    ),
    "small": dict(
        c_m=64, c_z=32, c_s=96, c_e=16, n_evoformer_blocks=4, n_extra_msa_blocks=1, msa_heads=4, msa_head_dim=16,
        extra_msa_heads=4, extra_msa_head_dim=4, pair_heads=4, pair_head_dim=8, opm_hidden=16, tri_mul_hidden=32,
        transition_factor=2, n_structure_layers=4, ipa_heads=4, ipa_head_dim=16, ipa_qk_points=4, ipa_v_points=4,
        c_resnet=32, c_plddt=32, max_recycles=2, eval_recycles=2,
    ),
    "af2": {},
}
# AF2's `model_*_ptm` networks: the same sizes with the predicted aligned error head (PAE and pTM)
_PRESETS.update({f"{name}_ptm": {**sizes, "predicted_aligned_error": True} for name, sizes in list(_PRESETS.items())})

PRESET_NAMES = tuple(_PRESETS)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset (`tiny`, `small`, `af2`, or `tiny_ptm`, `small_ptm`, `af2_ptm` with the PAE head) with
    optional field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
    return replace(ModelConfig(**_PRESETS[name]), **overrides)


@dataclass(frozen=True)
class DataConfig:
    """Feature pipeline settings (AF2 supplement 1.2; training values from its section 1.11, Table 4)."""

    crop_size: int = 256
    crop_mode: Literal["contiguous", "spatial", "mixed"] = "mixed"
    spatial_crop_prob: float = 0.5  # used when crop_mode == "mixed"
    max_msa_clusters: int = 128
    max_extra_msa: int = 1024
    masked_msa_prob: float = 0.15
    masked_msa_uniform: float = 0.1
    masked_msa_profile: float = 0.1
    masked_msa_same: float = 0.1

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"DataConfig.crop_size must be >= 1, got {self.crop_size}")
        if self.max_msa_clusters < 1:
            raise ValueError(f"DataConfig.max_msa_clusters must be >= 1, got {self.max_msa_clusters}")
        if self.crop_mode not in ("contiguous", "spatial", "mixed"):
            raise ValueError(f"DataConfig.crop_mode must be contiguous, spatial or mixed, got {self.crop_mode!r}")
        fractions = self.masked_msa_uniform + self.masked_msa_profile + self.masked_msa_same
        if not 0.0 <= fractions <= 1.0:
            raise ValueError("masked_msa_uniform + masked_msa_profile + masked_msa_same must be within [0, 1]")


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (AF2 supplement 1.9 and 1.11, Table 4; the values of OpenFold's configuration)."""

    fape_backbone: float = 0.5
    fape_sidechain: float = 0.5
    fape_clamp: float = 10.0
    fape_length_scale: float = 10.0
    fape_clamp_prob: float = 0.9
    fape_eps: float = 1e-4
    torsion: float = 1.0
    torsion_chi_weight: float = 0.5
    torsion_norm_weight: float = 0.01
    distogram: float = 0.3
    distogram_min: float = 2.3125
    distogram_max: float = 21.6875
    masked_msa: float = 2.0
    plddt: float = 0.01
    # examples outside this resolution range (A) get no pLDDT, experimentally resolved or PAE loss (AF2: all three)
    plddt_min_resolution: float = 0.1
    plddt_max_resolution: float = 3.0
    experimentally_resolved: float = 0.0  # 0.01 in fine-tuning
    # predicted aligned error (AF2 supplement 1.9.7, logged as `pae`): 0.1 in fine-tuning, with the PAE head on
    # (ModelConfig.predicted_aligned_error, the `_ptm` presets); bins over [0, pae_max_bin] A as in the model
    pae: float = 0.0
    pae_max_bin: float = 31.0
    violation: float = 0.0  # 1.0 in fine-tuning
    violation_tolerance_factor: float = 12.0
    clash_overlap_tolerance: float = 1.5
    scale_by_sqrt_length: bool = True


# the kinds OptimConfig.state and .ema_storage take (the Literal annotations below list the same, for the CLI)
OPTIM_STATES = ("fp32", "8bit", "4bit", "cpu_offload")
EMA_STORAGES = ("fp32", "bf16", "cpu")


@dataclass(frozen=True)
class OptimConfig:
    """AF2 optimiser recipe (supplement 1.11.3)."""

    lr: float = 1e-3
    eps: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000
    decay_every: int = 50_000
    decay_factor: float = 0.95
    grad_clip: float = 0.1
    ema_decay: float = 0.999
    # Adam's two moments: fp32 (torch Adam, fused on CUDA), 8bit / 4bit (torchao's block-quantized moments,
    # 1/4 and 1/8 of fp32's bytes for tensors of >= 4096 elements), cpu_offload (fp32 moments and the step
    # on the host; torchao's CPUOffloadOptimizer). The low-bit kinds need `pip install protfold[lowbit]`.
    state: Literal["fp32", "8bit", "4bit", "cpu_offload"] = "fp32"
    # the EMA copy of the weights: fp32 on the model's device, bf16 on the device (half the bytes, the
    # average rounded to bf16 at each update), or fp32 in host memory (no device bytes, a copy per step)
    ema_storage: Literal["fp32", "bf16", "cpu"] = "fp32"
    # on an out-of-memory error in a training step, retry the same batch in the next leaner memory preset
    recover_oom: bool = True

    def __post_init__(self) -> None:
        kinds = {"state": OPTIM_STATES, "ema_storage": EMA_STORAGES}
        for name, allowed in kinds.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"optim.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


__all__ = [
    "EMA_STORAGES",
    "OPTIM_STATES",
    "DataConfig",
    "LossConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "PRESET_NAMES",
    "load_memory_preset",
    "memory_preset_names",
    "memory_preset_path",
    "model_preset",
]
