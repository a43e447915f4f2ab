"""The Triton kernels of protfold's fused attention (`protfold.model.kernels.attention` is the host side: the custom
operators, bias sorting and dispatch, and the algorithm's description).

Shapes and strides as `attention._attention_op` passes them: q, k, v [Z, H, L, C] with the last stride 1, the
pair bias [B, H, Q, K] and key bias [Z, K] with rows padded to 16 elements, outputs and dO contiguous, the
softmax's row max and sum and δ [Z, H, Q] fp32. Offsets are int64 (Z·H·L·C passes 2^31 at 4,096 residues).
"""

import os

import triton
import triton.language as tl

__all__ = ["TILES", "INTERPRET", "bucket", "bwd_dkdv", "bwd_dpb", "bwd_dq", "fwd", "head_block"]


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
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TILES = {"BM": 16, "BN": 16} if INTERPRET else {}


def _tuned(kernel, tiles: list[tuple[int, int, int, int]]):
    # keyed on the lengths' power-of-two buckets (QKEY, KKEY), not the lengths: a new MSA depth or sequence length
    # reuses its bucket's tiles instead of timing every candidate again
    return kernel if INTERPRET else triton.autotune(_configs(tiles), key=["QKEY", "KKEY", "C"])(kernel)


# the small tiles are for fp32 operands (no tensor cores; larger fp32 tiles spill registers)
fwd = _tuned(_fwd_kernel, [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                           (128, 128, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2)])
bwd_dkdv = _tuned(_bwd_dkdv_kernel, [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2),
                                     (32, 32, 4, 2)])
bwd_dq = _tuned(_bwd_dq_kernel, [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)])
bwd_dpb = _tuned(_bwd_dpb_kernel, [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)])


def bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def head_block(head_dim: int) -> int:
    """The head dim padded to a power of two of at least 16 (tl.dot's smallest width), the padding loaded as 0."""
    return max(16, triton.next_power_of_2(head_dim))
