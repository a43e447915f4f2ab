"""protfold's fused attention with a row-shared pair bias, in Triton (`MemoryConfig.attention = "triton"`).

softmax(q kᵀ/√c + pair_bias + key_bias) v for AF2's biased attentions (MSA row attention with the pair bias,
Algorithm 7; triangle attention, Algorithms 13 / 14; MSA column attention with the key mask only):

- q, k, v [Z, H, L, c]: Z = B·R flattened rows (MSA rows, or pair rows i of triangle attention);
- pair_bias [B, H, Q, K], shared by the R rows of each batch element, trainable;
- key_bias [Z, K] fp32, the mask bias (no gradient).

Forward (FlashAttention's online softmax): one program per (row·head, block of queries) walks the keys in blocks,
so the [Z, H, Q, K] logits never exist; it keeps each query's softmax max and sum for backward. Backward recomputes the
probabilities in three kernels, none with atomics:
- dK, dV: one program per (row·head, block of keys), walking the queries;
- dQ: one program per (row·head, block of queries), walking the keys;
- d(pair_bias): one program per (batch·head, query block, key block), summing dS = P ⊙ (dP − δ) over the R rows
  that share the bias, in registers, and writing each tile once. This is the gradient that a [Z, H, Q, K]-sized
  dS would otherwise have to be materialised (or accumulated with atomics, as FlexAttention does) for. Without
  atomics the same tiles give the same bits; the autotuner's tiles (timed per shape bucket) may differ between
  runs and reorder the sums.

Scores, softmax and every accumulation are fp32; q kᵀ and P·V read the inputs' dtype (tensor cores under bf16
autocast). fp32 inputs use IEEE fp32 products where torch's own fp32 matmuls do (precision "highest", its default),
TF32 otherwise. The reference is `primitives._naive_attention`;
tests/model/test_attention_triton.py compares outputs and every gradient (the pair bias's included) on the CPU
through Triton's interpreter (`TRITON_INTERPRET=1`), tests/gpu/test_attention_triton_gpu.py on CUDA.

The kernels (`attention_kernels.py`) are registered as custom operators (`protfold::pair_bias_attention` and its backward) with autograd and
fake implementations, so a compiled block keeps them in its graph. Imported only when the switch asks for it.
"""

import contextlib
import math
from typing import Optional

import torch
import triton
from torch import Tensor

from protfold.model.kernels.attention_kernels import (
    INTERPRET,
    TILES,
    bucket,
    bwd_dkdv,
    bwd_dpb,
    bwd_dq,
    fwd,
    head_block,
)

__all__ = ["aligned_rows", "pair_bias_attention", "split_biases"]


def _ieee(q: Tensor) -> bool:
    """fp32 products in full precision: fp32 operands where torch's own fp32 matmuls are (precision "highest", its
    default; "high" and "medium" let the kernel use TF32, as they let torch), and always under the interpreter,
    whose tl.dot misreads bf16 operands."""
    return INTERPRET or (q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it `t`'s (a model on cuda:1 without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


# The kernels as two custom operators with autograd, so that torch.compile keeps them inside a compiled block's
# graph (an opaque call, no graph break) and the fake (meta) versions give dynamo the output shapes.
@torch.library.custom_op("protfold::pair_bias_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, pair_bias: Optional[Tensor],
                  key_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(out [Z, H, Q, C], row max, row sum [Z, H, Q] fp32). q, k, v [Z, H, L, C] (last stride 1), pair_bias
    [B, H, Q, K] (last stride 1) or None, key_bias [Z, K] fp32 contiguous or None."""
    z, h, nq, c = q.shape
    nk = k.shape[2]
    rows = z // pair_bias.shape[0] if pair_bias is not None else 1
    out = torch.empty(z, h, nq, c, dtype=q.dtype, device=q.device)
    # the softmax's row max and sum, kept apart: a row whose keys are all masked has max about -1e9, where
    # max + log(sum) would round the log away (fp32's spacing there is 64) and backward's P would be 1, not 1/K
    row_max = torch.empty(z, h, nq, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    pb, kb = _bias_args(q, pair_bias, key_bias)
    with _on_device(q):
        fwd[lambda meta: (z * h, triton.cdiv(nq, meta["BM"]))](
            q, k, v, pb[0], kb[0], out, row_max, row_sum, *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), *pb[1:], kb[1], h, rows, nq, nk, c, c**-0.5, bucket(nq), bucket(nk),
            HAS_PB=pair_bias is not None, HAS_KB=key_bias is not None, IEEE=_ieee(q), BD=head_block(c), **TILES)
    return out, row_max, row_sum


@_attention_op.register_fake
def _(q, k, v, pair_bias, key_bias):
    z, h, nq, c = q.shape
    stats = q.new_empty((z, h, nq), dtype=torch.float32)
    return q.new_empty((z, h, nq, c)), stats, torch.empty_like(stats)


@torch.library.custom_op("protfold::pair_bias_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, row_max: Tensor,
                           row_sum: Tensor, pair_bias: Optional[Tensor], key_bias: Optional[Tensor],
                           want_pair: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d pair_bias): the last fp32 [B, H, Q, K], or empty without a pair bias or `want_pair`."""
    z, h, nq, c = q.shape
    nk = k.shape[2]
    rows = z // pair_bias.shape[0] if pair_bias is not None else 1
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # δ_i = Σ_c dO_ic O_ic = Σ_j P_ij dP_ij, [Z, H, Q]
    pb, kb = _bias_args(q, pair_bias, key_bias)
    common = (*_strides(q), *_strides(k), *_strides(v), *pb[1:], kb[1], h, rows, nq, nk, c, c**-0.5, bucket(nq),
              bucket(nk))
    flags = dict(HAS_KB=key_bias is not None, IEEE=_ieee(q), BD=head_block(c), **TILES)
    stats = (row_max.contiguous(), row_sum.contiguous(), delta)
    dk = torch.empty(z, h, nk, c, dtype=k.dtype, device=q.device)
    dv = torch.empty(z, h, nk, c, dtype=v.dtype, device=q.device)
    dq = torch.empty(z, h, nq, c, dtype=q.dtype, device=q.device)
    with _on_device(q):
        bwd_dkdv[lambda meta: (z * h, triton.cdiv(nk, meta["BN"]))](
            q, k, v, pb[0], kb[0], grad_out, *stats, dk, dv, *common, HAS_PB=pair_bias is not None, **flags)
        bwd_dq[lambda meta: (z * h, triton.cdiv(nq, meta["BM"]))](
            q, k, v, pb[0], kb[0], grad_out, *stats, dq, *common, HAS_PB=pair_bias is not None, **flags)
        if pair_bias is None or not want_pair:
            return dq, dk, dv, q.new_empty((0,), dtype=torch.float32)
        nb = pair_bias.shape[0]
        dpb = torch.empty(nb, h, nq, nk, dtype=torch.float32, device=q.device)
        bwd_dpb[lambda meta: (nb * h, triton.cdiv(nq, meta["BM"]), triton.cdiv(nk, meta["BN"]))](
            q, k, v, pb[0], kb[0], grad_out, *stats, dpb, *common, **flags)
    return dq, dk, dv, dpb


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, row_max, row_sum, pair_bias, key_bias, want_pair):
    z, h, nq, c = q.shape
    nk = k.shape[2]
    if pair_bias is None or not want_pair:
        dpb = q.new_empty((0,), dtype=torch.float32)
    else:
        dpb = q.new_empty((pair_bias.shape[0], h, nq, nk), dtype=torch.float32)
    return q.new_empty((z, h, nq, c)), k.new_empty((z, h, nk, c)), v.new_empty((z, h, nk, c)), dpb


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pair_bias, key_bias = inputs
    out, row_max, row_sum = output
    ctx.mark_non_differentiable(row_max, row_sum)
    ctx.save_for_backward(q, k, v, out, row_max, row_sum, pair_bias, key_bias)
    ctx.want_pair = pair_bias is not None and pair_bias.requires_grad


def _backward(ctx, grad_out, _grad_max, _grad_sum):
    q, k, v, out, row_max, row_sum, pair_bias, key_bias = ctx.saved_tensors
    dq, dk, dv, dpb = _attention_backward_op(grad_out, q, k, v, out, row_max, row_sum, pair_bias, key_bias,
                                             ctx.want_pair)
    return dq, dk, dv, dpb.to(pair_bias.dtype) if ctx.want_pair else None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _bias_args(q: Tensor, pair_bias: Tensor | None, key_bias: Tensor | None) -> tuple[tuple, tuple]:
    """(pointer, strides) for each bias; a missing one is replaced by q (never read: its HAS_ flag is off)."""
    pb = (pair_bias, *pair_bias.stride()[:3]) if pair_bias is not None else (q, 0, 0, 0)
    kb = (key_bias, key_bias.stride(0)) if key_bias is not None else (q, 0)
    return pb, kb


def split_biases(biases: list[Tensor], full: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None] | None:
    """Sort the attention's biases (each broadcastable to `full` = [*lead, H, Q, K]) into the kernel's two kinds:
    (pair_bias [B, H, Q, K], key_bias [Z, K] fp32), Z = prod(lead) = B·R with the pair bias shared by the R
    trailing lead rows. None when a bias fits neither kind (the caller then runs the reference kernel).

    key bias: broadcast over heads and queries ([*lead, 1, 1, K]) and without gradient (the mask bias).
    pair bias: a full [Q, K] matrix per head, varying over leading lead dims only ([*lead[:s], 1, ..., H, Q, K]).
    """
    lead, (h, nq, nk) = full[:-3], full[-3:]
    pair: Tensor | None = None
    key: Tensor | None = None
    for bias in biases:
        shape = (1,) * (len(full) - bias.dim()) + tuple(bias.shape)
        bias = bias.reshape(shape)
        if shape[-3] == 1 and shape[-2] == 1 and not bias.requires_grad:
            term = bias.expand(*lead, 1, 1, nk).reshape(-1, nk).float()
            key = term if key is None else key + term
            continue
        if pair is not None or shape[-2:] != (nq, nk):
            return None
        blead = shape[:-3]
        split = next((s for s in range(len(lead) + 1)
                      if blead[:s] == lead[:s] and all(d == 1 for d in blead[s:])), None)
        if split is None:
            return None
        pair = bias.expand(*blead, h, nq, nk).reshape(math.prod(lead[:split]), h, nq, nk)
        pair = aligned_rows(pair)
    if key is not None:
        key = aligned_rows(key)
    return pair, key


def aligned_rows(t: Tensor) -> Tensor:
    """`t` laid out for the kernels: rows of a multiple of 16 elements (last stride 1). `t` itself where it is so
    already; else `t` copied into rows padded to that and viewed back to its shape. The kernels then load bias tiles
    as aligned vectors (an unaligned row stride makes every element its own 2-byte load in the score loop, and the
    forward spills registers). The start address is not checked (torch.compile cannot trace it): fresh allocations
    are aligned, and Triton compiles an unaligned pointer's launch without the vector loads, still correct."""
    if t.stride(-1) == 1 and t.stride(-2) % 16 == 0:
        return t
    length = t.shape[-1]
    # a row-major buffer whatever t's layout (F.pad would keep a channels-last-like layout); the padding is never
    # read (masked loads). Assigning t into it records the copy for autograd.
    out = torch.empty(*t.shape[:-1], length + (-length % 16), dtype=t.dtype, device=t.device)[..., :length]
    out[...] = t
    return out


def pair_bias_attention(q: Tensor, k: Tensor, v: Tensor, biases: list[Tensor]) -> Tensor | None:
    """softmax(q kᵀ/√c + Σ biases) v: q [*, H, Q, c], k and v [*, H, K, c], biases as in `split_biases`.
    None when the biases fit neither of the kernel's kinds."""
    lead = q.shape[:-3]
    if k.shape[:-2] != q.shape[:-2] or v.shape != k.shape or not q.dtype == k.dtype == v.dtype:
        return None  # k, v broadcast over rows or heads, or of another dtype: not the kernel's layout
    full = (*lead, q.shape[-3], q.shape[-2], k.shape[-2])
    split = split_biases(list(biases), full)
    if split is None:
        return None
    pair, key = split
    if pair is not None and math.prod(lead) % pair.shape[0]:
        return None
    flat = []
    for t in (q, k, v):
        t = t.reshape(-1, *t.shape[-3:])
        flat.append(t if t.stride(-1) == 1 else t.contiguous())
    out = _attention_op(*flat, pair, key)[0]
    return out.reshape(*lead, *out.shape[-3:])
