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

The kernels are registered as custom operators (`protfold::pair_bias_attention` and its backward) with autograd and
fake implementations, so a compiled block keeps them in its graph. Imported only when the switch asks for it.
"""

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["pair_bias_attention", "split_biases"]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b, fp32 accumulation. IEEE: fp32 operands in full precision (no TF32); also set under Triton's
    interpreter, whose tl.dot misreads bf16 operands (numpy has no bf16): they are up-cast there first, exactly."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _pair_tile(pb_ptrs, qm, kn, HAS_PB: tl.constexpr):
    """The pair bias's [BM, BN] tile in fp32, or 0 without one."""
    if HAS_PB:
        return tl.load(pb_ptrs, mask=qm[:, None] & kn[None, :], other=0.0).to(tl.float32)
    return 0.0


@triton.jit
def _scores(q, k, pb, kb_ptrs, kn, scale, HAS_KB: tl.constexpr, IEEE: tl.constexpr):
    """[BM, BN] fp32 scores q kᵀ·scale + the pair bias tile `pb` + key bias; keys past the end get -1e30 (exp() of
    it is 0)."""
    s = _dot(q, tl.trans(k), IEEE) * scale + pb
    if HAS_KB:
        s += tl.load(kb_ptrs, mask=kn, other=0.0)[None, :]
    return tl.where(kn[None, :], s, -1.0e30)


@triton.jit
def _key_tile(K, V, z, h, offs_n, offs_d, skz, skh, skn, svz, svh, svn, NK, C):
    """k and v [BN, BD] of one row·head's key tile (zeros past the end and past the head dim)."""
    kd = (offs_n < NK)[:, None] & (offs_d < C)[None, :]
    k = tl.load(K + z * skz + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kd, other=0.0)
    v = tl.load(V + z * svz + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kd, other=0.0)
    return k, v


@triton.jit
def _query_tile(Q, DO, M, L, DELTA, z, h, zh, offs_m, offs_d, sqz, sqh, sqn, NQ, C):
    """Backward's query tile of one row·head: q and dO [BM, BD], the softmax's row max and sum and δ [BM]
    (DO contiguous [Z, H, Q, C]; M, L, DELTA [Z, H, Q])."""
    qm = offs_m < NQ
    qd = qm[:, None] & (offs_d < C)[None, :]
    q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=qd, other=0.0)
    do = tl.load(DO + zh * NQ * C + offs_m[:, None] * C + offs_d[None, :], mask=qd, other=0.0)
    m_i = tl.load(M + zh * NQ + offs_m, mask=qm, other=0.0)
    l_i = tl.load(L + zh * NQ + offs_m, mask=qm, other=1.0)
    delta = tl.load(DELTA + zh * NQ + offs_m, mask=qm, other=0.0)
    return q, do, m_i, l_i, delta


@triton.jit
def _probs_and_dscores(q, k, v, do, m_i, l_i, delta, pb, kb_ptrs, qm, kn, scale,
                       HAS_KB: tl.constexpr, IEEE: tl.constexpr):
    """Backward's tile: P (recomputed from the scores and the forward's row max and sum) and dS = P ⊙ (dO Vᵀ − δ)."""
    s = _scores(q, k, pb, kb_ptrs, kn, scale, HAS_KB, IEEE)
    p = tl.where(qm[:, None], tl.exp(s - m_i[:, None]) / l_i[:, None], 0.0)
    return p, p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])


@triton.jit
def _fwd_kernel(Q, K, V, PB, KB, OUT, M, L,
                sqz, sqh, sqn, skz, skh, skn, svz, svh, svn, soz, soh, son,
                spb_b, spb_h, spb_q, skb_z,
                H, R, NQ, NK, C, scale, QKEY, KKEY,
                HAS_PB: tl.constexpr, HAS_KB: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    zh = tl.program_id(0).to(tl.int64)  # offsets in int64: Z·H·L·C passes 2^31 at long lengths
    z, h = zh // H, zh % H
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    qm, dm = offs_m < NQ, offs_d < C
    q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=qm[:, None] & dm[None, :],
                other=0.0)
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start in range(0, NK, BN):
        offs_n = start + tl.arange(0, BN)
        kn = offs_n < NK
        k, v = _key_tile(K, V, z, h, offs_n, offs_d, skz, skh, skn, svz, svh, svn, NK, C)
        pb_ptrs = PB + (z // R) * spb_b + h * spb_h + offs_m[:, None] * spb_q + offs_n[None, :]
        pb = _pair_tile(pb_ptrs, qm, kn, HAS_PB)
        s = _scores(q, k, pb, KB + z * skb_z + offs_n, kn, scale, HAS_KB, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(OUT + z * soz + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=qm[:, None] & dm[None, :])
    tl.store(M + zh * NQ + offs_m, m_i, mask=qm)
    tl.store(L + zh * NQ + offs_m, l_i, mask=qm)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PB, KB, DO, M, L, DELTA, DK, DV,
                     sqz, sqh, sqn, skz, skh, skn, svz, svh, svn,
                     spb_b, spb_h, spb_q, skb_z,
                     H, R, NQ, NK, C, scale, QKEY, KKEY,
                     HAS_PB: tl.constexpr, HAS_KB: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """dK, dV of one (row·head, key block), walking the query blocks; DK, DV contiguous [Z, H, K, C]."""
    zh = tl.program_id(0).to(tl.int64)  # offsets in int64: Z·H·L·C passes 2^31 at long lengths
    z, h = zh // H, zh % H
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    kn = offs_n < NK
    k, v = _key_tile(K, V, z, h, offs_n, offs_d, skz, skh, skn, svz, svh, svn, NK, C)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for start in range(0, NQ, BM):
        offs_m = start + tl.arange(0, BM)
        q, do, m_i, l_i, delta = _query_tile(Q, DO, M, L, DELTA, z, h, zh, offs_m, offs_d, sqz, sqh, sqn, NQ, C)
        qm = offs_m < NQ
        pb = _pair_tile(PB + (z // R) * spb_b + h * spb_h + offs_m[:, None] * spb_q + offs_n[None, :], qm, kn, HAS_PB)
        p, ds = _probs_and_dscores(q, k, v, do, m_i, l_i, delta, pb, KB + z * skb_z + offs_n, qm, kn, scale,
                                   HAS_KB, IEEE)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    base = zh * NK * C + offs_n[:, None] * C + offs_d[None, :]
    kd = kn[:, None] & (offs_d < C)[None, :]
    tl.store(DK + base, (dk * scale).to(DK.dtype.element_ty), mask=kd)
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=kd)


@triton.jit
def _bwd_dq_kernel(Q, K, V, PB, KB, DO, M, L, DELTA, DQ,
                   sqz, sqh, sqn, skz, skh, skn, svz, svh, svn,
                   spb_b, spb_h, spb_q, skb_z,
                   H, R, NQ, NK, C, scale, QKEY, KKEY,
                   HAS_PB: tl.constexpr, HAS_KB: tl.constexpr, IEEE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """dQ of one (row·head, query block), walking the key blocks; DQ contiguous [Z, H, Q, C]."""
    zh = tl.program_id(0).to(tl.int64)  # offsets in int64: Z·H·L·C passes 2^31 at long lengths
    z, h = zh // H, zh % H
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    qm = offs_m < NQ
    q, do, m_i, l_i, delta = _query_tile(Q, DO, M, L, DELTA, z, h, zh, offs_m, offs_d, sqz, sqh, sqn, NQ, C)
    dq = tl.zeros([BM, BD], tl.float32)
    for start in range(0, NK, BN):
        offs_n = start + tl.arange(0, BN)
        k, v = _key_tile(K, V, z, h, offs_n, offs_d, skz, skh, skn, svz, svh, svn, NK, C)
        kn = offs_n < NK
        pb = _pair_tile(PB + (z // R) * spb_b + h * spb_h + offs_m[:, None] * spb_q + offs_n[None, :], qm, kn, HAS_PB)
        _, ds = _probs_and_dscores(q, k, v, do, m_i, l_i, delta, pb, KB + z * skb_z + offs_n, qm, kn, scale,
                                   HAS_KB, IEEE)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + zh * NQ * C + offs_m[:, None] * C + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qm[:, None] & (offs_d < C)[None, :])


@triton.jit
def _bwd_dpb_kernel(Q, K, V, PB, KB, DO, M, L, DELTA, DPB,
                    sqz, sqh, sqn, skz, skh, skn, svz, svh, svn,
                    spb_b, spb_h, spb_q, skb_z,
                    H, R, NQ, NK, C, scale, QKEY, KKEY,
                    HAS_KB: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """d(pair_bias) of one (batch·head, query block, key block): Σ over the R rows sharing it of dS; DPB is
    contiguous fp32 [B, H, NQ, NK]."""
    bh = tl.program_id(0).to(tl.int64)  # offsets in int64: Z·H·L·C passes 2^31 at long lengths
    b, h = bh // H, bh % H
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    qm, kn = offs_m < NQ, offs_n < NK
    pb = _pair_tile(PB + b * spb_b + h * spb_h + offs_m[:, None] * spb_q + offs_n[None, :], qm, kn, True)
    acc = tl.zeros([BM, BN], tl.float32)
    for r in range(0, R):
        z = b * R + r
        zh = z * H + h
        q, do, m_i, l_i, delta = _query_tile(Q, DO, M, L, DELTA, z, h, zh, offs_m, offs_d, sqz, sqh, sqn, NQ, C)
        k, v = _key_tile(K, V, z, h, offs_n, offs_d, skz, skh, skn, svz, svh, svn, NK, C)
        _, ds = _probs_and_dscores(q, k, v, do, m_i, l_i, delta, pb, KB + z * skb_z + offs_n, qm, kn, scale,
                                   HAS_KB, IEEE)
        acc += ds
    tl.store(DPB + bh * NQ * NK + offs_m[:, None] * NK + offs_n[None, :], acc, mask=qm[:, None] & kn[None, :])


def _configs(tiles: list[tuple[int, int, int, int]]) -> list:
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages) for bm, bn, warps, stages in tiles]


# Tiles (BM queries x BN keys) and pipelining, chosen per (NQ, NK, C) by Triton's autotuner on CUDA: each candidate
# is timed at the first call of a new shape (kernels that run out of shared memory or registers are left out by
# the autotuner). Under the interpreter: fixed 16-wide tiles (fewer numpy ops per test), no autotuning.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TILES = {"BM": 16, "BN": 16} if _INTERPRET else {}


def _tuned(kernel, tiles: list[tuple[int, int, int, int]]):
    # keyed on the lengths' power-of-two buckets (QKEY, KKEY), not the lengths: a new MSA depth or sequence length
    # reuses its bucket's tiles instead of timing every candidate again
    return kernel if _INTERPRET else triton.autotune(_configs(tiles), key=["QKEY", "KKEY", "C"])(kernel)


# the small tiles are for fp32 operands (no tensor cores; larger fp32 tiles spill registers)
_fwd = _tuned(_fwd_kernel, [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                            (128, 128, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2)])
_bwd_dkdv = _tuned(_bwd_dkdv_kernel, [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2),
                                      (32, 32, 4, 2)])
_bwd_dq = _tuned(_bwd_dq_kernel, [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)])
_bwd_dpb = _tuned(_bwd_dpb_kernel, [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)])


def _bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _head_block(head_dim: int) -> int:
    """The head dim padded to a power of two of at least 16 (tl.dot's smallest width), the padding loaded as 0."""
    return max(16, triton.next_power_of_2(head_dim))


def _ieee(q: Tensor) -> bool:
    """fp32 products in full precision: fp32 operands where torch's own fp32 matmuls are (precision "highest", its
    default; "high" and "medium" let the kernel use TF32, as they let torch), and always under the interpreter,
    whose tl.dot misreads bf16 operands."""
    return _INTERPRET or (q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


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
        _fwd[lambda meta: (z * h, triton.cdiv(nq, meta["BM"]))](
            q, k, v, pb[0], kb[0], out, row_max, row_sum, *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), *pb[1:], kb[1], h, rows, nq, nk, c, c**-0.5, _bucket(nq), _bucket(nk),
            HAS_PB=pair_bias is not None, HAS_KB=key_bias is not None, IEEE=_ieee(q), BD=_head_block(c), **_TILES)
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
    common = (*_strides(q), *_strides(k), *_strides(v), *pb[1:], kb[1], h, rows, nq, nk, c, c**-0.5, _bucket(nq),
              _bucket(nk))
    flags = dict(HAS_KB=key_bias is not None, IEEE=_ieee(q), BD=_head_block(c), **_TILES)
    stats = (row_max.contiguous(), row_sum.contiguous(), delta)
    dk = torch.empty(z, h, nk, c, dtype=k.dtype, device=q.device)
    dv = torch.empty(z, h, nk, c, dtype=v.dtype, device=q.device)
    dq = torch.empty(z, h, nq, c, dtype=q.dtype, device=q.device)
    with _on_device(q):
        _bwd_dkdv[lambda meta: (z * h, triton.cdiv(nk, meta["BN"]))](
            q, k, v, pb[0], kb[0], grad_out, *stats, dk, dv, *common, HAS_PB=pair_bias is not None, **flags)
        _bwd_dq[lambda meta: (z * h, triton.cdiv(nq, meta["BM"]))](
            q, k, v, pb[0], kb[0], grad_out, *stats, dq, *common, HAS_PB=pair_bias is not None, **flags)
        if pair_bias is None or not want_pair:
            return dq, dk, dv, q.new_empty((0,), dtype=torch.float32)
        nb = pair_bias.shape[0]
        dpb = torch.empty(nb, h, nq, nk, dtype=torch.float32, device=q.device)
        _bwd_dpb[lambda meta: (nb * h, triton.cdiv(nq, meta["BM"]), triton.cdiv(nk, meta["BN"]))](
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
        if pair.stride(-1) != 1 or pair.stride(-2) % 16 or pair.data_ptr() % 16:
            pair = _aligned(pair)
    if key is not None:
        key = _aligned(key)
    return pair, key


def _aligned(t: Tensor) -> Tensor:
    """`t` copied into rows padded to a multiple of 16 elements and viewed back to its shape: the kernels then load
    bias tiles as aligned vectors (an unaligned row stride makes every element its own 2-byte load in the score
    loop, and the forward spills registers)."""
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
