"""Reading parameter files: which format a file is, its arrays, and the refusals that need no model config.

Formats: an AlphaFold2 `.npz` (a zip of `.npy` members, read one array at a time, never all at once), or a
PyTorch file (`torch.save`, zip or legacy pickle) holding an OpenFold state dict (plain, a Lightning
checkpoint's `state_dict` under `model.`, or its EMA weights under `ema` -> `params`) or a protfold checkpoint.
Every failure is a `ProtfoldInputError` naming the file with a one-line reason.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from protfold.errors import ProtfoldInputError
from protfold.weights.mapping import AF2_PREFIX

log = logging.getLogger(__name__)

Format = Literal["alphafold2", "openfold", "protfold"]
_SUPPORTED = "use a template-free monomer model: params_model_3/4/5.npz or params_model_3/4/5_ptm.npz"
# Older OpenFold releases (their public weights among them) name some modules differently; OpenFold's
# convert_deprecated_v1_keys renames them the same way.
_OPENFOLD_V1 = {
    "core.msa_transition": "msa_transition",
    "core.outer_product_mean": "outer_product_mean",
    "core.tri_": "pair_stack.tri_",
    "core.pair_transition": "pair_stack.pair_transition",
    "ipa.linear_q_points.weight": "ipa.linear_q_points.linear.weight",
    "ipa.linear_q_points.bias": "ipa.linear_q_points.linear.bias",
    "ipa.linear_kv_points.weight": "ipa.linear_kv_points.linear.weight",
    "ipa.linear_kv_points.bias": "ipa.linear_kv_points.linear.bias",
}


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as a short single line (torch's messages run over many lines)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sniff(path: str | Path) -> Literal["npz", "torch"]:
    """Whether `path` is an `.npz` archive or a PyTorch file, from its bytes (the suffix only words errors)."""
    path = Path(path)
    if not path.is_file():
        raise ProtfoldInputError(path, "no such file" if not path.exists() else "not a file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    torch_suffix = path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin")
    if not head:
        raise ProtfoldInputError(path, "empty file, not parameters")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            what = "checkpoint" if torch_suffix else "AlphaFold2 parameter file (.npz)"
            reason = f"truncated or corrupt {what}: not a readable zip archive ({one_line(err)})"
            raise ProtfoldInputError(path, reason) from None
        if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            return "torch"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        raise ProtfoldInputError(path, "a zip archive that is neither an .npz of arrays nor a PyTorch checkpoint")
    if head[:1] == b"\x80":  # pickle protocol >= 2: torch.save's legacy format
        return "torch"
    if head.startswith(b"\x93NUMPY"):
        raise ProtfoldInputError(path, "a single NumPy array (.npy), not an AlphaFold2 parameter file (.npz)")
    if torch_suffix:
        raise ProtfoldInputError(path, "truncated or corrupt checkpoint: not a PyTorch file")
    raise ProtfoldInputError(path, "not a parameter file: neither an AlphaFold2 .npz nor a PyTorch checkpoint")


# --------------------------------------------------------------------------------------------- AlphaFold2
class AF2File:
    """An AlphaFold2 `.npz`, read lazily: shapes from the `.npy` headers, arrays one at a time.

    The constructor refuses files that are not template-free monomer AF2 parameters.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path)
        try:
            self.keys = [name[: -len(".npy")] for name in self._zip.namelist()]
            self.shapes = {key: self._header(key) for key in self.keys}
            self._refuse()
        except ProtfoldInputError:
            self._zip.close()
            raise

    def _header(self, key: str) -> tuple[int, ...]:
        try:
            with self._zip.open(f"{key}.npy") as member:
                shape, _, dtype = _read_header(member)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise ProtfoldInputError(self.path, f"truncated or corrupt .npz: array {key!r}: {one_line(err)}") from None
        if dtype.kind != "f":
            raise ProtfoldInputError(self.path, f"not AlphaFold2 parameters: array {key!r} holds {dtype}, not floats")
        return tuple(shape)

    def _refuse(self) -> None:
        ours = [k for k in self.keys if k.startswith(AF2_PREFIX)]
        if not ours:
            example = f" (it holds {self.keys[0]!r}, ...)" if self.keys else ""
            raise ProtfoldInputError(self.path, f"not AlphaFold2 parameters: no {AF2_PREFIX}... arrays{example}")
        if any("~_relative_encoding" in k or "v_point_projection" in k for k in ours):
            raise ProtfoldInputError(self.path, f"an AlphaFold-Multimer model: multimer is not supported; {_SUPPORTED}")
        if any("template_" in k for k in ours):
            raise ProtfoldInputError(
                self.path, f"an AlphaFold2 model with templates (model_1/model_2): templates are not supported; "
                f"{_SUPPORTED}")

    def blocks(self, key: str, *, stacked: bool) -> Iterator[np.ndarray]:
        """The array `key`, or for a `stacked` one its blocks array[0], array[1], ... one at a time: read in
        order straight from the archive, so one block is in memory at a time and the member's checksum is
        still verified when its last byte is read (a corrupt file fails there)."""
        try:
            with self._zip.open(f"{key}.npy") as member:
                shape, fortran_order, dtype = _read_header(member)
                if fortran_order:  # np.savez of AF2's (C-ordered) arrays never writes one
                    raise ValueError("a Fortran-ordered array, not AlphaFold2's layout")
                parts, block_shape = (shape[0], shape[1:]) if stacked else (1, shape)
                for _ in range(parts):
                    block = np.empty(block_shape, dtype)
                    view = memoryview(block).cast("B")
                    if member.readinto(view) != block.nbytes:
                        raise EOFError("the array's data ends early")
                    yield block
                if member.read(1):
                    raise ValueError("more data than its header says")
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise ProtfoldInputError(self.path, f"truncated or corrupt .npz: array {key!r}: {one_line(err)}") from None

    def close(self) -> None:
        self._zip.close()


def _read_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open `.npy`, which is left at the start of the array's data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


# ------------------------------------------------------------------------------------- PyTorch checkpoints
@dataclass
class TorchWeights:
    """The model weights found in a PyTorch file, names without `model.`/`module.` prefixes."""

    format: Format
    state_dict: dict[str, Tensor]
    where: str  # which part of the file they came from, for messages
    model_config: dict[str, Any] | None = None  # a protfold checkpoint's saved ModelConfig
    hyper_parameters: dict[str, Any] | None = None


def load_torch(path: str | Path) -> Any:
    """torch.load on the CPU, memory-mapped where the format allows. Tensors-only files load without running
    pickled code; a checkpoint that also pickles Python objects (Lightning hyperparameters) is loaded fully."""
    path = Path(path)
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        with path.open("rb") as handle:
            if handle.read(1) != b"\x80":  # torch's legacy format is a pickle, which starts with PROTO
                raise ProtfoldInputError(path, "not a PyTorch checkpoint (neither torch's zip format nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise ProtfoldInputError(path, f"truncated or corrupt checkpoint: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - a bad file can fail anywhere inside the unpickler
        raise ProtfoldInputError(path, f"truncated or corrupt checkpoint: {one_line(err)}") from None
    log.debug("%s holds Python objects besides tensors; loading it with full unpickling", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - as above; e.g. a pickled class whose module is not installed
        raise ProtfoldInputError(path, f"cannot read the Python objects it holds besides tensors: {one_line(err)}"
                                 ) from None


def torch_weights(path: str | Path, obj: Any) -> TorchWeights:
    """Find the weights in a loaded PyTorch file and say whose they are (OpenFold or protfold)."""
    path = Path(path)
    if not isinstance(obj, dict):
        raise ProtfoldInputError(path, f"not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    ema = obj.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("shadow"), dict):
        weights, where = ema["shadow"], "EMA weights (ema.shadow)"
    elif isinstance(ema, dict) and isinstance(ema.get("params"), dict):
        weights, where = ema["params"], "EMA weights (ema.params)"
    elif isinstance(obj.get("state_dict"), dict):
        weights, where = obj["state_dict"], "state_dict"
    else:
        weights, where = obj, "state dict"
    weights = {_strip(k): v for k, v in weights.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not weights:
        raise ProtfoldInputError(path, f"not model parameters: no tensors in its {where}")
    names = list(weights)
    if any(n.startswith("heads.plddt.net.") or ".msa_row.norm_m." in n for n in names):
        return TorchWeights("protfold", weights, where, obj.get("model_config"), obj.get("hyper_parameters"))
    if not any(n.startswith("aux_heads.") or ".msa_att_row." in n for n in names):
        raise ProtfoldInputError(path, f"not OpenFold or protfold parameters: unknown names in its {where} "
                                       f"(first: {names[0]!r})")
    weights = {_openfold_v2_name(k): v for k, v in weights.items()}
    _refuse_openfold(path, weights)
    return TorchWeights("openfold", weights, where)


def _strip(name: str) -> str:
    return name.removeprefix("module.").removeprefix("model.")


def _openfold_v2_name(name: str) -> str:
    for old, new in _OPENFOLD_V1.items():  # no old name is part of a current one: renaming twice is a no-op
        name = name.replace(old, new)
    return name


def _refuse_openfold(path: Path, weights: dict[str, Tensor]) -> None:
    relpos = weights.get("input_embedder.linear_relpos.weight")
    if any("linear_k_points" in n or "linear_v_points" in n for n in weights) or (
        relpos is not None and relpos.ndim == 2 and relpos.shape[1] != 65
    ):
        raise ProtfoldInputError(path, "an OpenFold multimer model: multimer is not supported; use a template-free "
                                       "monomer model (OpenFold's finetuning_no_templ_*.pt)")
    if any(n.startswith("template") for n in weights):
        raise ProtfoldInputError(path, "an OpenFold model with templates: templates are not supported; use a "
                                       "template-free one (OpenFold's finetuning_no_templ_*.pt)")


__all__ = ["AF2File", "Format", "TorchWeights", "load_torch", "one_line", "sniff", "torch_weights"]
