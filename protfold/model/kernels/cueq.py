"""NVIDIA cuEquivariance kernels for the triangle updates (`MemoryConfig.triangle_kernel = "cueq"`).

`pip install protfold[cueq]` installs `cuequivariance-torch` and `cuequivariance-ops-torch-cu13`. Two entry points,
each called first thing in its module's `forward` and returning None where the kernel cannot run, so the module's
own (reference) path runs instead:

- `triangle_multiplication(mod, z, pair_mask)`: AF2 Algorithms 11 / 12 as one fused call of
  `cuequivariance_torch.triangle_multiplicative_update`, with protfold's weights: LayerNorm in, the gated
  projections a and b with their biases (cueq's `p_in` / `g_in` are [a; b] stacked), the mask on a and b, the sum
  over k (outgoing: a_ik b_jk, incoming: a_ki b_kj), LayerNorm out, and the output gate sigmoid(Linear_g(LN(z)))
  times Linear_o, both with biases. Needs c_hidden == c_z (cueq's projections are square per edge), a multiple
  of 32 (the kernel's limit; af2's 128 qualifies).
- `triangle_attention(mod, z, pair_mask)`: AF2 Algorithms 13 / 14: protfold's LayerNorm, projections, gate and
  output projection around `cuequivariance_torch.triangle_attention` (softmax(q·k/√c + b) v with the pair bias b
  [H, N, N] and the key mask; the bias receives its gradient from the kernel).

Under autocast the kernels get the autocast dtype (bf16) for activations and weights, as autocast would give the
plain path's linears; the kernels accumulate in fp32. The imports happen inside the functions: protfold never
imports cuEquivariance unless the switch asks for it. Tested against the plain path on the GPU
(tests/gpu/test_cueq_gpu.py: outputs and every gradient, the pair bias's and the weights' included).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["available", "triangle_attention", "triangle_multiplication"]


_LOADED: dict[str, Any] = {}  # "module": cuequivariance_torch or None, once resolved


@torch.compiler.disable
def _load() -> Any:
    """Import `cuequivariance_torch` (and its CUDA ops package) once; None, logged once, when that fails. Kept out of
    dynamo's trace: the first call from a compiled block breaks the graph there once, later calls read `_LOADED`.
    `available` called before training (the GPU tests, the bench) resolves it ahead of any compile."""
    if "module" not in _LOADED:
        try:
            import cuequivariance_ops_torch  # noqa: F401  the kernels; cuequivariance_torch imports them lazily
            import cuequivariance_torch
        except Exception as err:  # noqa: BLE001 - any import failure means the plain path
            _fallback_once(f"cuEquivariance is not importable ({type(err).__name__}: {err}); "
                           "pip install protfold[cueq]")
            cuequivariance_torch = None
        _LOADED["module"] = cuequivariance_torch
    return _LOADED["module"]


def _module() -> Any:
    return _LOADED["module"] if "module" in _LOADED else _load()


@functools.lru_cache(maxsize=None)
def _fallback_once(reason: str) -> None:
    """One log line per distinct reason for running the plain path instead of cueq."""
    log.warning("memory.triangle_kernel=cueq: %s; the triangle updates use protfold's own path", reason)


def available(device: torch.device) -> bool:
    """Whether the cueq kernels can run on `device` (CUDA and the packages importable). Logs once when not."""
    if device.type != "cuda":
        _fallback_once(f"tensors on {device.type}, the kernels need CUDA")
        return False
    return _module() is not None


def _dtype(z: Tensor) -> torch.dtype:
    """The dtype the plain path's linears compute in: the autocast dtype under autocast, else z's."""
    return torch.get_autocast_dtype(z.device.type) if torch.is_autocast_enabled(z.device.type) else z.dtype


def triangle_multiplication(mod: nn.Module, z: Tensor, pair_mask: Tensor) -> Tensor | None:
    """`mod` (a TriangleMultiplication) applied to z [*, N, N, c_z] with cueq's fused kernel, or None when it
    cannot run (then the caller runs its own path)."""
    if not available(z.device):
        return None
    if mod.c_hidden != z.shape[-1] or z.shape[-1] % 32:
        _fallback_once(f"triangle multiplication with c_hidden={mod.c_hidden}, c_z={z.shape[-1]} (the kernel needs "
                       "c_hidden == c_z, a multiple of 32)")
        return None
    cue = _module()
    dtype = _dtype(z)
    lead, n, c = z.shape[:-3], z.shape[-2], z.shape[-1]

    def w(*tensors: Tensor) -> Tensor:
        return (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).to(dtype)

    with torch.autocast(z.device.type, enabled=False):
        out = cue.triangle_multiplicative_update(
            z.reshape(-1, n, n, c).to(dtype),
            direction="outgoing" if mod.outgoing else "incoming",
            mask=pair_mask.reshape(-1, n, n).to(dtype),
            norm_in_weight=w(mod.norm_in.weight), norm_in_bias=w(mod.norm_in.bias),
            p_in_weight=w(mod.linear_a_p.weight, mod.linear_b_p.weight),
            p_in_bias=w(mod.linear_a_p.bias, mod.linear_b_p.bias),
            g_in_weight=w(mod.linear_a_g.weight, mod.linear_b_g.weight),
            g_in_bias=w(mod.linear_a_g.bias, mod.linear_b_g.bias),
            norm_out_weight=w(mod.norm_out.weight), norm_out_bias=w(mod.norm_out.bias),
            p_out_weight=w(mod.linear_o.weight), p_out_bias=w(mod.linear_o.bias),
            g_out_weight=w(mod.linear_g.weight), g_out_bias=w(mod.linear_g.bias),
            eps=mod.norm_in.eps,
        )
    return out.reshape(*lead, n, n, out.shape[-1])


def triangle_attention(mod: nn.Module, z: Tensor, pair_mask: Tensor) -> Tensor | None:
    """`mod` (a TriangleAttention) applied to z [*, N, N, c_z] with cueq's attention kernel, or None when it cannot
    run. The ending-node form runs the starting-node form on zᵀ, as the module does."""
    if not available(z.device):
        return None
    cue = _module()
    attn = mod.attention
    if not mod.starting:
        z, pair_mask = z.transpose(-2, -3), pair_mask.transpose(-1, -2)
    lead, n = z.shape[:-3], z.shape[-2]
    z, pair_mask = z.reshape(-1, n, n, z.shape[-1]), pair_mask.reshape(-1, n, n)
    z_ln = mod.norm(z)
    bias = mod.linear_b(z_ln).movedim(-1, -3)[:, None]  # [B, 1, H, N, N]: shared by every row i

    def heads(x: Tensor) -> Tensor:  # [B, I, J, H*c] -> [B, I, H, J, c]
        return x.unflatten(-1, (attn.n_heads, attn.c_hidden)).transpose(-2, -3).contiguous()

    q, k, v = heads(attn.linear_q(z_ln)), heads(attn.linear_k(z_ln)), heads(attn.linear_v(z_ln))
    dtype = q.dtype  # the linears' compute dtype (bf16 under autocast)
    with torch.autocast(z.device.type, enabled=False):
        o = cue.triangle_attention(q, k.to(dtype), v.to(dtype), bias.float(),
                                   mask=pair_mask[:, :, None, None, :].bool(), scale=attn.c_hidden**-0.5)
    o = o.transpose(-2, -3).flatten(-2)  # [B, I, J, H*c]
    if attn.linear_g is not None:
        o = o * torch.sigmoid(attn.linear_g(z_ln))
    out = attn.linear_o(o).reshape(*lead, n, n, -1)
    return out if mod.starting else out.transpose(-2, -3)
