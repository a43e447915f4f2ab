"""Linear with AF2 initialisers, the one attention dispatch point, gated and global attention.

Attention kernels (`MemoryPlan.attention`, resolved from `MemoryConfig.attention`):
  "naive": softmax(q kᵀ/√c + Σ biases) v with the logits and softmax in fp32.
  "sdpa":  torch.nn.functional.scaled_dot_product_attention, biases summed into one float `attn_mask`.
  "flex":  torch.nn.attention.flex_attention (compiled), each bias read in a `score_mod`, so a pair bias
           broadcast over MSA rows gets its gradient accumulated without the [N_seq, H, N_res, N_res] tensor.
           CUDA only; `resolve` turns it into "naive" off CUDA, with a warning. Heads narrower than the
           kernel's 16 channels (the extra MSA stack's 8) are zero-padded: exact, q·k and the output unchanged.
  "triton": protfold's fused kernel (protfold.model.kernels.attention): online softmax, no logits kept, the pair
           bias shared by the rows gets its gradient summed over them in registers (no atomics). CUDA only (or
           Triton's interpreter on the CPU); biases of another form than a mask and a row-shared pair bias run the
           naive kernel, logged once.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protfold.model.memory import chunk_rows, fp32_island, norm_for_linear, upcast
from protfold.model.plan import MemoryPlan

log = logging.getLogger(__name__)

__all__ = ["Attention", "GlobalAttention", "Linear", "attention", "mask_bias", "pair_bias_rows", "row_attention"]

Init = Literal["default", "relu", "glorot", "gating", "final"]
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]
INF = 1e9  # large finite negative logit for masked keys (a fully masked row stays finite)


class Linear(nn.Linear):
    """nn.Linear with the AF2 supplement's initialisers (section 1.11.4).

    default: LeCun (fan-in) truncated normal; relu: He truncated normal; glorot: Xavier uniform;
    gating: weight 0, bias 1; final: weight 0, bias 0. Biases start at 0 except for gating.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, init: Init = "default") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.init = init
        self._init_af2()

    def _init_af2(self) -> None:
        with torch.no_grad():
            if self.init in ("default", "relu"):
                scale = 2.0 if self.init == "relu" else 1.0
                std = math.sqrt(scale / self.in_features) / _TRUNC_STD
                nn.init.trunc_normal_(self.weight, std=std, a=-2.0 * std, b=2.0 * std)
            elif self.init == "glorot":
                nn.init.xavier_uniform_(self.weight)
            elif self.init in ("gating", "final"):
                self.weight.zero_()
            else:
                raise ValueError(f"unknown Linear init {self.init!r}")
            if self.bias is not None:
                self.bias.fill_(1.0 if self.init == "gating" else 0.0)


def mask_bias(mask: Tensor) -> Tensor:
    """Additive logit bias from a 0/1 key mask: 0 where kept, -1e9 where masked."""
    return (mask - 1.0) * INF


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Sequence[Tensor], plan: MemoryPlan) -> Tensor:
    """softmax(q kᵀ / √c + Σ biases) v through the kernel chosen by `plan.attention`.

    q: [*, H, Q, c], k and v: [*, H, K, c], `bias` a list of tensors each broadcastable to [*, H, Q, K]
    (kept apart so that a bias shared by many rows is never expanded) -> [*, H, Q, c].
    q is scaled here (callers pass it unscaled).
    """
    if plan.attention == "sdpa":
        return _sdpa_attention(q, k, v, bias)
    if plan.attention == "flex":
        return _flex_attention(q, k, v, bias, compiled=True)
    if plan.attention == "triton":
        from protfold.model.kernels.attention import pair_bias_attention

        out = pair_bias_attention(q, k, v, list(bias))
        if out is not None:
            return out
        _triton_fallback_once(bias)
    return _naive_attention(q, k, v, bias)


_triton_fallback_logged: list[bool] = []


def _triton_fallback_once(bias: Sequence[Tensor]) -> None:
    shapes = [tuple(b.shape) for b in bias]
    if not _triton_fallback_logged:
        _triton_fallback_logged.append(True)
        log.warning("attention='triton' takes a key mask and one pair bias shared by rows; biases of shapes %s "
                    "run the naive kernel (logged once)", shapes)


def _naive_attention(q: Tensor, k: Tensor, v: Tensor, biases: Sequence[Tensor]) -> Tensor:
    # The q kᵀ product runs in the autocast dtype (tensor cores, fp32 accumulation) and is rounded to it once;
    # the bias sum and the softmax are fp32. sdpa and flex keep their own fp32 softmax inside the kernel.
    logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    with fp32_island(logits):
        if not torch.is_grad_enabled():
            # No grad: a first fp32 bias is added to the half logits out of place (type promotion up-casts them
            # exactly: fl(fp32(l) + b), what up-cast then add gives) in one pass over the logits instead of two;
            # each later bias is added in place (fp32 + half promotes exactly, as the up-cast does), so no fp32
            # copy of a shared [H, N, N] bias per chunk and no second logits-sized buffer.
            if biases and _adds_up_cast(logits, biases[0]):
                logits, biases = torch.add(logits, biases[0]), biases[1:]
            else:
                logits = upcast(logits)
            for b in biases:
                b_dtype = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype
                fits = torch.broadcast_shapes(logits.shape, b.shape) == logits.shape
                if fits and torch.promote_types(logits.dtype, b_dtype) == logits.dtype:
                    logits.add_(b)
                else:
                    logits = logits + upcast(b)
            probs = torch.softmax(logits, dim=-1)
            del logits
            return torch.matmul(probs.to(v.dtype), v)
        logits = upcast(logits)
        for b in biases:
            logits = logits + upcast(b)
        probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def _adds_up_cast(logits: Tensor, bias: Tensor) -> bool:
    """Whether half `logits` + fp32 `bias` is fp32 of the logits' shape (the up-cast fused into the bias add)."""
    return (logits.dtype in (torch.float16, torch.bfloat16) and bias.dtype == torch.float32
            and torch.broadcast_shapes(logits.shape, bias.shape) == logits.shape)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, biases: Sequence[Tensor]) -> Tensor:
    lead = q.shape[:-3]
    mask = None
    for b in biases:
        mask = b if mask is None else mask + b
    if mask is not None:
        mask = mask.to(q.dtype)
        if mask.dim() >= 3 and all(d == 1 for d in mask.shape[:-3]):
            # shared by every batch row (a pair bias alone, the all-ones mask left out): a view the kernel
            # broadcasts, not one copy per row of a chunk
            mask = mask.reshape(1, *mask.shape[-3:])
        else:
            mask = mask.expand(*q.shape[:-1], k.shape[-2]).reshape(-1, *q.shape[-3:-1], k.shape[-2])
    flat = [t.reshape(-1, *t.shape[-3:]) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, attn_mask=mask)
    return out.reshape(*lead, *out.shape[-3:])


_flex_compiled: Callable[..., Tensor] | None = None
_FLEX_MIN_HEAD_DIM = 16  # the compiled FlexAttention kernel's smallest head dim
_FLEX_RECOMPILE_LIMIT = 64  # graphs of the eagerly called compiled kernel (see _flex_attention)


@contextlib.contextmanager
def _flex_recompile_limit() -> Iterator[None]:
    """Dynamo's recompile limit at _FLEX_RECOMPILE_LIMIT, failing loudly at it, for one eager call of the compiled
    flex kernel. Called eagerly (no-grad passes), the kernel gets a graph per attention kind (one or two bias
    terms, widths) and per shape until its sizes turn symbolic: more than dynamo's default 8 in a `fit` of af2,
    after which FlexAttention would run unfused, building every score matrix.

    The two settings are set and restored directly: `torch._dynamo.config.patch` costs about 0.5 ms per call
    (CPU, torch 2.13), a tenth of a second per no-grad pass of the 48-block stack; this costs about 8 us.
    """
    cfg = torch._dynamo.config
    before = cfg.recompile_limit, cfg.fail_on_recompile_limit_hit
    cfg.recompile_limit, cfg.fail_on_recompile_limit_hit = max(before[0], _FLEX_RECOMPILE_LIMIT), True
    try:
        yield
    finally:
        cfg.recompile_limit, cfg.fail_on_recompile_limit_hit = before


def _bias_reader(bias: Tensor, full: Sequence[int]) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """A score_mod term reading `bias` (broadcastable to `full` = [*lead, H, Q, K]) at a flat batch index."""
    bias = bias.reshape((1,) * (len(full) - bias.dim()) + tuple(bias.shape))
    keep = [d for d in range(len(full)) if bias.shape[d] != 1]
    view = bias.reshape([bias.shape[d] for d in keep])
    lead = list(full[:-3])
    strides = [math.prod(lead[d + 1 :]) for d in range(len(lead))]

    def read(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        coords = [(b // strides[d]) % lead[d] for d in range(len(lead))] + [h, qi, ki]
        return view[tuple(coords[d] for d in keep)]

    return read


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, biases: Sequence[Tensor], *, compiled: bool) -> Tensor:
    """FlexAttention with every bias as a `score_mod` term (imported here: an optional fast kernel)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled or torch.compiler.is_compiling():
        # Inside a compiled block dynamo traces flex_attention into the block's graph itself. The global must not
        # be read or set there: dynamo guarded the first block's graph on it being unset, compiled a second graph
        # for the later blocks, and the first block's recompute in backward ran the second graph, with other
        # saved tensors (CheckpointError in `protfold fit`).
        kernel = flex_attention
    else:
        if _flex_compiled is None:
            # Default dynamic handling: after a shape changes once (chunk remainders, MSA rows vs columns vs
            # triangle rows) the sizes are made symbolic instead of recompiling for every shape.
            _flex_compiled = torch.compile(flex_attention)
        kernel = _flex_compiled
    lead = q.shape[:-3]
    full = (*lead, q.shape[-3], q.shape[-2], k.shape[-2])
    readers = [_bias_reader(b, full) for b in biases]

    def score_mod(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        for read in readers:
            score = score + read(b, h, qi, ki)
        return score

    dtype, c = q.dtype, q.shape[-1]
    flat = [t.to(dtype).reshape(-1, *t.shape[-3:]) for t in (q, k, v)]
    pad = max(0, _FLEX_MIN_HEAD_DIM - c)
    if pad:  # zero channels add nothing to q·k and give zero output channels, cut off below
        flat = [F.pad(t, (0, pad)) for t in flat]
    if kernel is flex_attention:
        out = kernel(*flat, score_mod=score_mod, scale=c**-0.5)  # type: ignore[misc]
    else:
        with _flex_recompile_limit():
            out = kernel(*flat, score_mod=score_mod, scale=c**-0.5)  # type: ignore[misc]
    if pad:
        out = out[..., :c]
    return out.reshape(*lead, *out.shape[-3:])


class Attention(nn.Module):
    """Gated multi-head attention, the core of AF2 supplement Algorithms 7, 8, 13 and 14.

    q_x: [*, Q, c_q], kv_x: [*, K, c_kv], bias: list of tensors broadcastable to [*, H, Q, K] -> [*, Q, c_q].
    q, k, v have no bias; the gate is Linear(init="gating") + sigmoid; the output projection is init "final".
    """

    def __init__(self, *, c_q: int, c_kv: int, c_hidden: int, n_heads: int, gating: bool = True) -> None:
        super().__init__()
        self.c_hidden, self.n_heads = c_hidden, n_heads
        self.linear_q = Linear(c_q, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_kv, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_v = Linear(c_kv, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_g = Linear(c_q, c_hidden * n_heads, init="gating") if gating else None
        self.linear_o = Linear(c_hidden * n_heads, c_q, init="final")

    def _heads(self, x: Tensor) -> Tensor:
        """[*, L, H*c] -> [*, H, L, c]"""
        return x.unflatten(-1, (self.n_heads, self.c_hidden)).transpose(-2, -3)

    def forward(self, q_x: Tensor, kv_x: Tensor, bias: Sequence[Tensor], *, plan: MemoryPlan) -> Tensor:
        q, k, v = self._heads(self.linear_q(q_x)), self._heads(self.linear_k(kv_x)), self._heads(self.linear_v(kv_x))
        o = attention(q, k, v, bias, plan).transpose(-2, -3).flatten(-2)  # [*, Q, H*c]
        if self.linear_g is not None:
            o = o * torch.sigmoid(self.linear_g(q_x))
        return self.linear_o(o)


class GlobalAttention(nn.Module):
    """AF2 supplement, Algorithm 19 (global attention over one axis, used column-wise on the extra MSA).

    x: [*, S, c_in], mask: [*, S] -> [*, S, c_in]. One query per column: the masked mean of x over S,
    projected to H heads; keys and values are single-head; the output is gated per row s.
    """

    def __init__(self, *, c_in: int, c_hidden: int, n_heads: int, eps: float = 1e-10) -> None:
        super().__init__()
        self.c_hidden, self.n_heads, self.eps = c_hidden, n_heads, eps
        self.linear_q = Linear(c_in, c_hidden * n_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_v = Linear(c_in, c_hidden, bias=False, init="glorot")
        self.linear_g = Linear(c_in, c_hidden * n_heads, init="gating")
        self.linear_o = Linear(c_hidden * n_heads, c_in, init="final")

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mean = (x * mask[..., None]).sum(-2) / (mask.sum(-1)[..., None] + self.eps)  # [*, c_in]
        q = self.linear_q(mean).unflatten(-1, (self.n_heads, 1, self.c_hidden))  # [*, H, 1, c]
        k, v = self.linear_k(x)[..., None, :, :], self.linear_v(x)[..., None, :, :]  # [*, 1, S, c]
        bias = mask_bias(mask)[..., None, None, :]  # [*, 1, 1, S]
        # The logits are only [*, H, 1, S]: the fp32 naive kernel, whatever the plan's attention says.
        o = _naive_attention(q, k, v, [bias]).flatten(-3)  # [*, H*c]
        g = torch.sigmoid(self.linear_g(x))  # [*, S, H*c]
        return self.linear_o(g * o[..., None, :])


def row_attention(
    norm: nn.Module | None,
    attn: Attention,
    x: Tensor,
    mask: Tensor,
    pair_bias: Tensor | None,
    chunk: int | None,
    *,
    plan: MemoryPlan,
    emit: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """Gated self-attention along each row of x, chunked over rows (Algorithms 7, 8, 13, 14 share this).

    x: [*, R, L, c], mask: [*, R, L], pair_bias: [*, H, L, L] shared by all R rows, or None -> [*, R, L, c].
    `norm` (a LayerNorm, or None when x is already normalised) runs inside each chunk. The pair bias is
    handed whole to every chunk, so its gradient is accumulated chunk by chunk. `emit` (no grad): each row
    chunk's output goes to `emit(start, n, out)` instead of a joined output (see `chunk_rows`). With the Triton
    kernel the pair bias is laid out for it once here (rows padded to 16 elements), not once per chunk.
    """
    if plan.attention == "triton" and pair_bias is not None:
        from protfold.model.kernels.attention import aligned_rows

        pair_bias = aligned_rows(pair_bias)

    def run(x_c: Tensor, mask_c: Tensor, bias: Tensor | None) -> Tensor:
        if norm is not None:
            x_c = norm(x_c) if torch.is_grad_enabled() else norm_for_linear(norm, x_c)
        biases = [mask_bias(mask_c)[..., :, None, None, :]]  # [*, R, 1, 1, L]
        if bias is not None:
            biases.append(bias[..., None, :, :, :])  # [*, 1, H, L, L]
        return attn(x_c, x_c, biases, plan=plan)

    return chunk_rows(run, [x, mask, pair_bias], [-3, -2, None], capped_chunk(chunk, attn, x, plan), out_dim=-3,
                      emit=emit)


def pair_bias_rows(norm: nn.Module, linear: nn.Module, z: Tensor, rows: int, *, fp32: bool = False) -> Tensor:
    """No grad: the attention bias linear(norm(z)) as [*, H, N, N], built row chunk by row chunk of z
    [*, N, N, c_z], so LayerNorm(z) (fp32 under CUDA autocast) never exists at the full pair size.

    `fp32`: kept up-cast (exactly: the naive kernel up-casts it anyway), so the naive kernel adds it to the half
    logits in the same pass as their up-cast (`_naive_attention`); twice the bytes of a half bias."""
    cast = upcast if fp32 else (lambda t: t)
    return chunk_rows(lambda z_: cast(linear(norm(z_))).movedim(-1, -3), [z], [-3], rows, out_dim=-2)


def attention_row_bytes(length: int, c_in: int, n_heads: int, head_dim: int, kernel: str) -> int:
    """The bytes one row of a row attention makes at once, which `attention_chunk_mb` caps: one fp32 logits buffer
    [H, L, L] (the naive kernel has three), or with the Triton kernel, which makes no logits, the row's normalised
    input, q, k, v, gate and output [L, c + 5 H c], counted in fp32."""
    if kernel == "triton":
        return length * (c_in + 5 * n_heads * head_dim) * 4
    return n_heads * length * length * 4


def capped_chunk(chunk: int | None, attn: Attention, x: Tensor, plan: MemoryPlan) -> int | None:
    """Rows per chunk for attention along rows of x [*, R, L, c]: `chunk`, lowered (or set) so that one chunk's
    attention transients stay under `plan.attention_chunk_mb`: its fp32 logits [rows, H, L, L], or with the Triton
    kernel, which makes no logits, its rows' fp32-counted activations (the normalised input, q, k, v, gate and
    output: [rows, L, c + 5 H c]). Exact: rows are independent."""
    cap = plan.attention_chunk_mb
    if cap is None:
        return chunk
    per_row = attention_row_bytes(x.shape[-2], x.shape[-1], attn.n_heads, attn.c_hidden, plan.attention)
    per_row *= max(1, x[..., 0, 0, 0].numel())
    rows = max(1, int(cap * 2**20 // per_row))
    return rows if chunk is None else min(chunk, rows)
