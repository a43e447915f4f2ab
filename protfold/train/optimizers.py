"""Adam with its two moments kept four ways (`OptimConfig.state`), all with AF2's recipe (supplement 1.11.3).

- fp32: `torch.optim.Adam`, the fused kernel on CUDA (the same update in one launch per step).
- 8bit / 4bit: torchao's `Adam8bit` / `Adam4bit`: moments block-quantized (blocks of 256 / 128 values, one
  fp32 scale each; 4bit's second moment on a linear map), for tensors of at least 4096 elements; smaller
  ones keep fp32 moments. The update is computed in fp32 from the dequantized moments.
- cpu_offload: torchao's `CPUOffloadOptimizer` around `torch.optim.Adam`: fp32 moments and a master copy of
  each large parameter in host memory, gradients copied to the host during backward, the step on the CPU
  (fused CPU Adam), the new weights copied back. CUDA only; on a CPU run the state is in host memory already,
  so plain Adam runs and the log says so.

torchao (not bitsandbytes) because its optimizers are PyTorch code with tensor-subclass state (no CUDA
library to match to the card's CUDA 13), run on CPU too (so the suite tests them), save and load through
`state_dict`, and take `param_groups` and a learning-rate scheduler like torch's Adam.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from protfold.config import OptimConfig

log = logging.getLogger(__name__)

LOWBIT_EXTRA = "pip install 'protfold[lowbit]' (torchao)"


def _torchao_optim():
    try:
        import torchao.optim as tao
    except ImportError:
        return None
    return tao


def check_state_available(optim: OptimConfig) -> None:
    """A one-line error when `optim.state` needs torchao and it is not installed."""
    if optim.state != "fp32" and _torchao_optim() is None:
        raise ValueError(f"optim.state {optim.state!r} needs torchao: {LOWBIT_EXTRA}")


def build_adam(params: Iterable[Tensor] | Iterable[dict], optim: OptimConfig, *, device: torch.device | None = None
               ) -> torch.optim.Optimizer:
    """AF2's Adam (learning rate, betas, eps) with its state kept as `optim.state` says."""
    params = list(params)
    if device is None:  # from the first parameter (of the first group, when given groups)
        first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params or [None])[0]
        device = first.device if first is not None else torch.device("cpu")
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    check_state_available(optim)
    if optim.state == "cpu_offload" and device.type != "cuda":
        log.info("optim.state cpu_offload on %s: the state is in host memory already, plain Adam runs", device)
    elif optim.state != "fp32":
        tao = _torchao_optim()
        if optim.state == "cpu_offload":
            return _host_offload_adam(params, **kwargs)
        cls = tao.Adam8bit if optim.state == "8bit" else tao.Adam4bit
        return cls(params, **kwargs)
    return torch.optim.Adam(params, fused=device.type == "cuda", **kwargs)


def _host_offload_adam(params: list[Tensor], **adam_kwargs) -> torch.optim.Optimizer:
    """torchao's CPUOffloadOptimizer around torch's Adam, made safe for gradient clipping and Lightning.

    Its backward hooks copy each large parameter's gradient to the host as soon as it is accumulated, and the
    step reads the host copies: clipping must therefore act on those copies (the parameters this optimizer's
    `param_groups` list), after the copies have landed (`wait_for_grads`). `state` is empty so that Lightning,
    which moves an optimizer's `state` to the device when it restores a checkpoint, leaves the host moments
    where they are; `state_dict` holds them. (A class built here so that importing protfold never imports
    torchao.)
    """
    base = _torchao_optim().CPUOffloadOptimizer

    class HostOffloadAdam(base):
        @property
        def state(self) -> dict:
            return {}

        def wait_for_grads(self) -> None:
            self.stream.synchronize()

        def discard_grads(self) -> None:
            self.wait_for_grads()
            self.queue.clear()
            self.zero_grad(set_to_none=True)

    return HostOffloadAdam(params, optimizer_class=torch.optim.Adam, fused=True, **adam_kwargs)


def step_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors whose gradients `opt.step()` reads (for clipping): its param groups' parameters, after any
    gradient copies to the host have finished."""
    wait_for_grads(opt)
    inner = getattr(opt, "optimizer", opt)  # Lightning's LightningOptimizer wraps the optimizer
    return [p for group in inner.param_groups for p in group["params"]]


def wait_for_grads(opt: torch.optim.Optimizer) -> None:
    """cpu_offload: wait until the gradient copies to the host have landed (clipping reads them)."""
    inner = getattr(opt, "optimizer", opt)
    if hasattr(inner, "wait_for_grads"):
        inner.wait_for_grads()


def discard_grads(opt: torch.optim.Optimizer) -> None:
    """Drop every gradient of a step that will not be applied (out of memory): the optimizer is untouched."""
    inner = getattr(opt, "optimizer", opt)
    if hasattr(inner, "discard_grads"):  # host offload: also forget the gradient copies queued for the step
        inner.discard_grads()
    else:
        inner.zero_grad(set_to_none=True)


_SUBCLASS = "__tensor_subclass__"


def _encode(value):
    """A quantized moment (a torchao tensor subclass) as plain tensors and its class: torch.load cannot read a
    subclass with the callable `map_location` Lightning passes; plain tensors move and load like any other."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter) \
            and hasattr(value, "__tensor_flatten__"):
        names, attrs = value.__tensor_flatten__()
        cls = type(value)
        return {_SUBCLASS: f"{cls.__module__}:{cls.__qualname__}", "tensors": {n: getattr(value, n) for n in names},
                "attrs": list(attrs)}
    return value


def _decode(value):
    if isinstance(value, dict) and _SUBCLASS in value:
        import importlib

        module, name = value[_SUBCLASS].split(":")
        cls = getattr(importlib.import_module(module), name)
        return cls.__tensor_unflatten__(value["tensors"], value["attrs"], None, None)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def encode_optimizer_states(checkpoint: dict) -> None:
    """In a checkpoint dict: quantized optimizer moments as plain tensors (see `_encode`), in place."""
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = _encode(checkpoint["optimizer_states"])


def decode_optimizer_states(checkpoint: dict) -> None:
    """The inverse of `encode_optimizer_states`, in place."""
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = _decode(checkpoint["optimizer_states"])


__all__ = ["decode_optimizer_states", "encode_optimizer_states", "LOWBIT_EXTRA", "build_adam", "check_state_available", "discard_grads", "step_params", "wait_for_grads"]
