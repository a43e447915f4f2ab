"""Parameter files -> a protfold state dict for a model configuration, with every check a user needs.

The model configuration is a preset name, a JSON file of sizes, a `ModelConfig`, or (None) what the file
says: a protfold checkpoint's saved configuration, else the sizes read from the parameter shapes on top of
`af2_ptm` (the file has the predicted aligned error head) or `af2`. AlphaFold2 files do not record the
number of structure-module layers or recycles: those come from the preset (AF2's 8 and 3).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from protfold.config import PRESET_NAMES, ModelConfig, model_preset
from protfold.errors import ProtfoldInputError
from protfold.weights.files import AF2File, Format, TorchWeights, load_torch, sniff, torch_weights
from protfold.weights.mapping import (
    AF2_PREFIX,
    Param,
    af2_shapes,
    af2_to_torch,
    block_names,
    from_af2,
    n_blocks,
    openfold_to_protfold,
    parameter_table,
    to_af2,
)

log = logging.getLogger(__name__)

PAE_WEIGHT = "heads.predicted_aligned_error.linear.weight"
_BLOCK = re.compile(r"^(evoformer|extra_msa_stack)\.blocks\.(\d+)\.(.+)$")
_RESBLOCK_AF2 = re.compile(r"rigid_sidechain/resblock1(_\d+)?//weights$")
_RESBLOCK_TORCH = re.compile(r"angle_resnet\.(layers|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ResolvedConfig:
    """A model configuration and how to rebuild it: `model_preset(preset, **overrides)` (what
    ProtfoldModule's `preset` / `model_overrides` take). `label` names it in messages."""

    cfg: ModelConfig
    preset: str
    overrides: dict[str, Any]
    label: str


@dataclass
class ImportedWeights:
    """A protfold state dict (float32) read from `source`, for `config`."""

    source: Path
    format: Format
    state_dict: dict[str, Tensor]
    config: ResolvedConfig
    missing: list[str] = field(default_factory=list)  # model parameters the file lacks (allow_missing only)
    ignored: list[str] = field(default_factory=list)  # file parameters of heads the model has not


# ------------------------------------------------------------------------------------------ configuration
def as_preset(cfg: ModelConfig, label: str) -> ResolvedConfig:
    """The closest base preset (af2 or af2_ptm) and the fields that differ from it."""
    base = "af2_ptm" if cfg.predicted_aligned_error else "af2"
    ref = asdict(model_preset(base))
    overrides = {k: v for k, v in asdict(cfg).items() if ref[k] != v}
    return ResolvedConfig(cfg, base, overrides, label)


def infer_sizes(shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """ModelConfig sizes from protfold-named parameter shapes (all but the structure-module layer count)."""

    def rows(name: str) -> int:
        if name not in shapes:
            raise ProtfoldInputError(path, f"cannot read the model's sizes: it lacks {name}; give a preset or a "
                                           "JSON config of sizes")
        return shapes[name][0]

    def count(pattern: str) -> int:
        return sum(1 for name in shapes if re.fullmatch(pattern, name))

    evo, extra, ipa = "evoformer.blocks.0", "extra_msa_stack.blocks.0", "structure_module.ipa"
    c_m, msa_heads, extra_heads = rows("input_embedder.linear_tf_m.weight"), rows(f"{evo}.msa_row.linear_z.weight"), \
        rows(f"{extra}.msa_row.linear_z.weight")
    pair_heads, ipa_heads = rows(f"{evo}.tri_att_start.linear_b.weight"), rows(f"{ipa}.head_weights")
    qk_points = rows(f"{ipa}.q_pts.weight") // (3 * ipa_heads)
    return {
        "c_m": c_m, "c_z": rows("input_embedder.linear_tf_z_i.weight"), "c_s": rows("evoformer.linear_s.weight"),
        "c_e": rows("extra_msa_embedder.linear.weight"),
        "n_evoformer_blocks": count(r"evoformer\.blocks\.\d+\.msa_row\.norm_m\.weight"),
        "n_extra_msa_blocks": count(r"extra_msa_stack\.blocks\.\d+\.msa_row\.norm_m\.weight"),
        "msa_heads": msa_heads, "msa_head_dim": rows(f"{evo}.msa_row.attention.linear_q.weight") // msa_heads,
        "extra_msa_heads": extra_heads,
        "extra_msa_head_dim": rows(f"{extra}.msa_row.attention.linear_q.weight") // extra_heads,
        "pair_heads": pair_heads,
        "pair_head_dim": rows(f"{evo}.tri_att_start.attention.linear_q.weight") // pair_heads,
        "opm_hidden": rows(f"{evo}.opm.linear_a.weight"),
        "tri_mul_hidden": rows(f"{evo}.tri_mul_out.linear_a_p.weight"),
        "transition_factor": rows(f"{evo}.msa_trans.up.weight") // c_m,
        "ipa_heads": ipa_heads, "ipa_head_dim": rows(f"{ipa}.q.weight") // ipa_heads, "ipa_qk_points": qk_points,
        "ipa_v_points": rows(f"{ipa}.kv_pts.weight") // (3 * ipa_heads) - qk_points,
        "c_resnet": rows("structure_module.angle_resnet.linear_s.weight"),
        "n_resnet_blocks": count(r"structure_module\.angle_resnet\.blocks\.\d+\.1\.weight"),
        "c_plddt": rows("heads.plddt.net.1.weight"),
        "experimentally_resolved": "heads.experimentally_resolved.linear.weight" in shapes,
        "predicted_aligned_error": PAE_WEIGHT in shapes,
    }


def resolve_config(config: str | Path | ModelConfig | ResolvedConfig | None, *, path: Path,
                   shapes: dict[str, tuple[int, ...]],
                   saved: TorchWeights | None = None) -> ResolvedConfig:
    """The configuration to import `path` (with protfold-named `shapes`) into; see the module docstring."""
    if isinstance(config, ResolvedConfig):
        return config
    if isinstance(config, ModelConfig):
        return as_preset(config, "the given model configuration")
    base = "af2_ptm" if PAE_WEIGHT in shapes else "af2"
    if config is None:
        if saved is not None and saved.format == "protfold":
            return _saved_config(saved, path) or as_preset(model_preset(base, **infer_sizes(shapes, path)),
                                                           "sizes read from the file")
        sizes = infer_sizes(shapes, path)
        return as_preset(model_preset(base, **sizes), "sizes read from the file")
    if str(config) in PRESET_NAMES:
        return ResolvedConfig(model_preset(str(config)), str(config), {}, f"preset {str(config)!r}")
    json_path = Path(config)
    if not json_path.is_file():
        raise ProtfoldInputError(json_path, f"neither a model preset ({', '.join(PRESET_NAMES)}) nor a JSON file")
    try:
        data = json.loads(json_path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        # the fixture's layout ({"protfold_model_config": {...}, ...}) or a bare object of ModelConfig fields
        sizes = dict(data["protfold_model_config"]) if "protfold_model_config" in data else dict(data)
        preset = str(sizes.pop("preset", data.get("preset", base)))
        return as_preset(model_preset(preset, **sizes), f"config {json_path.name}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise ProtfoldInputError(json_path, f"not a model configuration (JSON of ModelConfig sizes): {err}") from None


def _saved_config(saved: TorchWeights, path: Path) -> ResolvedConfig | None:
    hparams = saved.hyper_parameters or {}
    if isinstance(hparams.get("preset"), str) and hparams["preset"] in PRESET_NAMES:
        overrides = dict(hparams.get("model_overrides") or {})
        return ResolvedConfig(model_preset(hparams["preset"], **overrides), hparams["preset"], overrides,
                              "its saved configuration")
    if isinstance(saved.model_config, dict):
        try:
            return as_preset(ModelConfig(**saved.model_config), "its saved configuration")
        except TypeError as err:
            raise ProtfoldInputError(path, f"unreadable saved model configuration: {err}") from None
    return None


# --------------------------------------------------------------------------------------------- reading
def read_weights(path: str | Path, config: str | Path | ModelConfig | None = None, *,
                 allow_missing: bool = False) -> ImportedWeights:
    """Read an AF2 `.npz`, an OpenFold checkpoint or a protfold checkpoint into protfold's names and layouts.

    Raises ProtfoldInputError (naming the file) for unreadable files, template or multimer models, unknown
    parameters, and shapes that do not fit the configuration (the first mismatching tensor, both shapes).
    `allow_missing`: parameters the file lacks (e.g. the PAE head of a non-pTM file) are listed, not refused.
    """
    imported = _read(Path(path), config, allow_missing, protfold=True)
    assert imported is not None
    return imported


def read_config(path: str | Path, config: str | Path | ModelConfig | None = None) -> ResolvedConfig:
    """The configuration `read_weights` would import `path` into, after the same checks, without converting
    any weight (an AF2 file's arrays are not even read)."""
    imported = _read(Path(path), config, False, protfold=True, convert=False)
    assert imported is not None
    return imported.config


def read_external_weights(path: str | Path, config: str | Path | ModelConfig | None = None, *,
                          allow_missing: bool = False) -> ImportedWeights | None:
    """`read_weights` for an AF2 `.npz` or an OpenFold checkpoint; None for a protfold checkpoint, which the
    caller reads its own way (training's loader keeps its handling of partial matches)."""
    return _read(Path(path), config, allow_missing, protfold=False)


def _read(path: Path, config: Any, allow_missing: bool, *, protfold: bool, convert: bool = True
          ) -> ImportedWeights | None:
    if sniff(path) == "npz":
        af2 = AF2File(path)
        try:
            return _read_af2(af2, config, allow_missing, convert)
        finally:
            af2.close()
    loaded = torch_weights(path, load_torch(path))
    if loaded.format == "protfold" and not protfold:
        return None
    return _read_torch(path, loaded, config, allow_missing, convert)


class _OnMeta(TorchFunctionMode):
    """Tensor factories make meta tensors (shapes, no memory), as `torch.device("meta")` does, except
    torch.linspace: its meta kernel loads torch's Python reference implementations (~75 MB resident, a fifth of
    a full-size file), and the model makes only one small buffer with it."""

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor,
                           torch.rand, torch.randn})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict of `cfg`'s model, built without allocating its weights."""
    from protfold.model.alphafold import AlphaFold

    with _OnMeta():
        model = AlphaFold(cfg=cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _read_af2(af2: AF2File, config: Any, allow_missing: bool, convert: bool) -> ImportedWeights:
    n_res = sum(1 for key in af2.keys if _RESBLOCK_AF2.search(key))
    table = {AF2_PREFIX + p.af2: p for p in parameter_table(n_res)}
    unknown = [key for key in af2.keys if key not in table]
    if unknown:
        raise ProtfoldInputError(af2.path, f"not a monomer AlphaFold2 parameter file: unknown array {unknown[0]!r}")
    shapes: dict[str, tuple[int, ...]] = {}
    for key in af2.keys:  # protfold-named shapes from the headers, without reading any array
        meta = torch.empty(af2.shapes[key], device="meta")
        parts = meta.unbind(0) if table[key].stack else (meta,)
        names = block_names(table[key], len(parts))
        shapes.update({n: tuple(af2_to_torch(part, table[key].layout).shape) for n, part in zip(names, parts)})
    resolved = resolve_config(config, path=af2.path, shapes=shapes)
    expected = af2_shapes(_model_shapes(resolved.cfg), resolved.cfg)
    imported = ImportedWeights(af2.path, "alphafold2", {}, resolved)
    for key, param in table.items():
        if key not in af2.shapes:
            if key in expected:
                _missing(imported, key, param, block_names(param, n_blocks(param, resolved.cfg)), allow_missing)
            continue
        if key not in expected:
            _no_place(imported, key, param)
            continue
        if af2.shapes[key] != expected[key]:
            raise _shape_error(af2.path, key, af2.shapes[key], expected[key], resolved)
    for key, param in table.items():  # every check passed: now read the arrays, one block at a time
        if convert and key in expected and key in af2.shapes:
            names = block_names(param, n_blocks(param, resolved.cfg))
            for name, block in zip(names, af2.blocks(key, stacked=param.stack is not None), strict=True):
                imported.state_dict[name] = from_af2(torch.from_numpy(block).float(), param, resolved.cfg)
    return imported


def _read_torch(path: Path, loaded: TorchWeights, config: Any, allow_missing: bool, convert: bool) -> ImportedWeights:
    weights = loaded.state_dict
    n_res = len({m.group(2) for name in weights if (m := _RESBLOCK_TORCH.search(name))})
    table = parameter_table(n_res)
    own = loaded.format == "openfold"
    by_name = {(p.openfold if own else p.protfold): p for p in table}
    names: dict[str, tuple[Param, str]] = {}  # file name -> (param, protfold name)
    for name in weights:
        match = _BLOCK.match(name)
        pattern = f"{match.group(1)}.blocks.{{i}}.{match.group(3)}" if match else name
        if pattern not in by_name:
            raise ProtfoldInputError(path, f"unknown parameter {name!r} in its {loaded.where} (not an AlphaFold2 "
                                           "monomer parameter)")
        param = by_name[pattern]
        names[name] = (param, param.protfold.format(i=match.group(2)) if match else param.protfold)
    shapes = {pf: tuple(weights[name].shape) for name, (_, pf) in names.items()}
    resolved = resolve_config(config, path=path, shapes=shapes, saved=loaded)
    model = _model_shapes(resolved.cfg)
    imported = ImportedWeights(path, loaded.format, {}, resolved)
    for param in table:
        want, have = n_blocks(param, resolved.cfg), sum(1 for p, _ in names.values() if p is param)
        if param.stack and have and want != have:
            raise ProtfoldInputError(path, f"{param.stack} blocks: it has {have}, {resolved.label} needs {want}")
        for i, pf in enumerate(block_names(param, want)):
            name = (param.openfold if own else param.protfold).format(i=i)
            if name not in weights:
                if pf in model:
                    _missing(imported, name, param, [pf], allow_missing)
                continue
            if pf not in model:
                _no_place(imported, name, param)
                continue
            if tuple(weights[name].shape) != model[pf]:
                raise _shape_error(path, name, tuple(weights[name].shape), model[pf], resolved)
            if convert:
                tensor = weights[name].float()
                imported.state_dict[pf] = openfold_to_protfold(tensor, param, resolved.cfg) if own else tensor
    return imported


def _shape_error(path: Path, name: str, got: tuple[int, ...], want: tuple[int, ...],
                 resolved: ResolvedConfig) -> ProtfoldInputError:
    return ProtfoldInputError(path, f"{name} has shape {list(got)}, but {resolved.label} needs {list(want)}: "
                                    "these parameters do not fit that model configuration")


def _missing(imported: ImportedWeights, name: str, param: Param, names: list[str], allow_missing: bool) -> None:
    """`name` (the file's name for it) is absent; `names`: the protfold tensors it would have given."""
    if allow_missing:
        imported.missing.extend(names)
        return
    hint = " (a file without the predicted aligned error head: use af2, not af2_ptm)" \
        if param.protfold.startswith("heads.predicted_aligned_error.") else ""
    raise ProtfoldInputError(imported.source, f"lacks {name}, which {imported.config.label} needs{hint}")


def _no_place(imported: ImportedWeights, name: str, param: Param) -> None:
    if not param.protfold.startswith("heads."):
        raise ProtfoldInputError(imported.source, f"has {name}, for which {imported.config.label} has no place")
    if param.protfold not in imported.ignored:
        imported.ignored.append(param.protfold)
        log.warning("%s: %s is not used: %s has no %s head", imported.source, name, imported.config.label,
                    param.protfold.split(".")[1])


def export_af2(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Any]:
    """A protfold state dict as AlphaFold2's `.npz` arrays (float32 numpy, full Haiku keys)."""
    return {key: t.detach().cpu().float().numpy() for key, t in to_af2(state_dict, cfg).items()}


__all__ = ["ImportedWeights", "ResolvedConfig", "as_preset", "export_af2", "infer_sizes", "read_config",
           "read_external_weights", "read_weights", "resolve_config"]
