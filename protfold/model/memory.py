"""Executors that read the `MemoryPlan`: chunking, recompute, checkpoint storage, compiled blocks; fp32 islands.

Every switch here trades speed for memory and never changes what the model computes (the one documented
exception is `checkpoint_storage="bf16"`, see `boundary_storage`). The plan reaches these helpers as an argument
(`protfold.model.plan`); nothing here is a context manager set in `forward`, so a recompute in backward sees the
same plan as the first forward.

Chunking (`chunk_rows`): a row-independent function is applied to slices of its inputs along one dimension.
Without grad the slices are written into one preallocated output, so only one chunk's intermediates live.
With grad each chunk is wrapped in a non-reentrant checkpoint, so only the chunk *inputs* are kept for
backward and, in backward, only one chunk's logits exist at a time. A tensor passed whole to every chunk
(the pair bias shared by all MSA rows) receives its gradient as a sum accumulated chunk by chunk by autograd,
never as a tensor at the full broadcast shape [N_seq, H, N_res, N_res].

Measuring (CPU or GPU, for tests and `protfold bench`): `saved_activation_bytes(fn)` counts what autograd
keeps for backward; `peak_new_bytes(fn, existing)` tracks the peak of tensors allocated and alive at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from protfold.model.plan import MemoryPlan
from protfold.numerics import recompute, upcast  # below the model, as the losses use them too; re-exported

log = logging.getLogger(__name__)

__all__ = [
    "boundary_storage",
    "check_grad",
    "chunk_rows",
    "compiled",
    "fp32_island",
    "infer_rows",
    "norm_for_linear",
    "peak_new_bytes",
    "recompute",
    "reset_compiled",
    "run_blocks",
    "saved_activation_bytes",
    "upcast",
]


@contextlib.contextmanager
def fp32_island(x: Tensor) -> Iterator[None]:
    """Disable autocast for `x`'s own device type (never a hard-coded "cuda"); callers cast inputs with `upcast`."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def chunk_rows(
    fn: Callable[..., Tensor],
    args: Sequence[Tensor | None],
    dims: Sequence[int | None],
    chunk: int | None,
    out_dim: int,
    emit: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """Apply a row-independent `fn` to chunks of `args` along `dims` and join the results along `out_dim`.

    `dims[i]` is the (negative) dimension of `args[i]` to slice, or None to pass that argument whole. With
    `chunk=None` the call is plain `fn(*args)` (the reference path). Otherwise: with grad, one non-reentrant
    checkpoint per chunk (only chunk inputs saved); without grad, results are copied into a preallocated output.

    `emit` (no grad only): instead of joining, hand each chunk's result to `emit(start, n, result)` (e.g. to
    add it in place into a residual stream) and return None, so no output of the full size is ever allocated.
    """
    if emit is not None:
        if torch.is_grad_enabled():
            raise RuntimeError("chunk_rows(emit=...) is for no-grad paths only (in-place updates break autograd)")
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None and a is not None)
        step = size if chunk is None else chunk
        for start in range(0, size, step):
            n = min(step, size - start)
            part = [a if d is None or a is None else a.narrow(d, start, n) for a, d in zip(args, dims)]
            emit(start, n, fn(*part))
        return None  # type: ignore[return-value]
    if chunk is None:
        return fn(*args)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None and a is not None)
    if chunk >= size:  # one chunk: no slicing and no extra recompute (launches dominate small shapes)
        return fn(*args)
    grad = torch.is_grad_enabled()
    outs: list[Tensor] = []
    out: Tensor | None = None
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        part = [a if d is None or a is None else a.narrow(d, start, n) for a, d in zip(args, dims)]
        if grad:
            outs.append(recompute(fn, *part))
            continue
        res = fn(*part)
        if out is None:
            shape = list(res.shape)
            shape[out_dim] = size
            out = res.new_empty(shape)
        out.narrow(out_dim, start, n).copy_(res)
        del res
    return torch.cat(outs, dim=out_dim) if grad else out  # type: ignore[return-value]


def norm_for_linear(norm: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """No grad: norm(x), already in autocast's dtype when autocast would cast it for a Linear (LayerNorm runs in
    fp32 under CUDA autocast, and on fp32 inputs under CPU autocast). The Linears that read it (two projections of
    the triangle update, four of an attention) would each make that same cast of a row-chunk-sized fp32 tensor;
    made once here, they read the same rounded values."""
    out = norm(x)
    device = out.device.type
    if torch.is_autocast_enabled(device) and out.dtype == torch.float32:
        out = out.to(torch.get_autocast_dtype(device))
    return out


def infer_rows(plan: MemoryPlan, n: int, parts: int = 16) -> int:
    """Rows per chunk for the no-grad in-place paths over n pair rows: `plan.pair_chunk`, else n/parts rows.

    Without grad every row-wise pair op (its LayerNorm of z included, fp32 under CUDA autocast) runs in row
    chunks, so no pair-sized intermediate besides the residual stream z is ever alive.
    """
    return min(n, plan.pair_chunk or max(1, -(-n // parts)))


def _pack_bf16(t: Tensor) -> Any:
    if t.requires_grad and t.dtype == torch.float32:
        return ("bf16", t.to(torch.bfloat16))
    return ("ref", t)


def _host_copy(t: Tensor) -> Tensor:
    """`t` copied to (pinned, from CUDA) host memory with its strides. Contiguous copies came back to a compiled
    block's recompute with other strides than its forward had, and dynamo guards on strides: the recompute could
    run another graph, with other saved tensors (tests/model/test_memory_equivalence.py)."""
    host = torch.empty_like(t, device="cpu", pin_memory=t.device.type == "cuda")
    host.copy_(t, non_blocking=True)
    return host


def _pack_cpu(t: Tensor) -> Any:
    if t.requires_grad and t.device.type != "cpu":
        return ("cpu", t.device, _host_copy(t))
    return ("ref", t)


def _unpack(packed: Any) -> Tensor:
    if packed[0] == "bf16":
        return packed[1].to(torch.float32)
    if packed[0] == "cpu":
        return packed[2].to(packed[1], non_blocking=True)
    return packed[1]


def boundary_storage(plan: MemoryPlan) -> contextlib.AbstractContextManager[Any]:
    """How the inputs of a block-level checkpoint (the m, z boundaries) are kept until backward.

    "fp32": as they are. "cpu": copied to (pinned) host memory and back, exact. "bf16": rounded to bfloat16.
    Only tensors that require grad (the residual streams) are converted; masks stay references.

    # AF2-DIFF: bf16 storage is the one switch that changes numbers: forward outputs are unchanged, but
    # backward recomputes each segment from bf16-rounded m, z, so gradients differ by about bf16 precision
    # (relative ~1e-2). Tested with that documented tolerance, not the fp32 1e-5.
    """
    if plan.checkpoint_storage == "bf16":
        return torch.autograd.graph.saved_tensors_hooks(_pack_bf16, _unpack)
    if plan.checkpoint_storage == "cpu":
        return torch.autograd.graph.saved_tensors_hooks(_pack_cpu, _unpack)
    return contextlib.nullcontext()


_COMPILED: dict[type, Callable[..., Any]] = {}


def compiled(block: torch.nn.Module) -> Callable[..., Any]:
    """`block` run through `torch.compile`: one compiled `forward` per block class, shared by every block of
    that class (dynamo guards on the block and on the plan passed in), bound with `functools.partial`. Nothing is
    stored on the module, so its submodules, state_dict, deepcopy and pickling are unchanged."""
    fn = _COMPILED.get(type(block))
    if fn is None:
        # fallback_random: dropout draws its masks with the eager kernels from torch's generator, so the compiled
        # block draws the eager masks under the same seed, provided inductor keeps the draws in program order
        # (checked on the GPU by tests/gpu/test_compile_gpu.py; newer torch chains random ops to keep it).
        # Inductor's own GPU random stream draws other masks, so gradients would differ from eager's entirely.
        # The masks are small (shared over a row or column), so the eager draw costs little.
        fn = _COMPILED[type(block)] = torch.compile(type(block).forward, options={"fallback_random": True})
    return functools.partial(fn, block)


def reset_compiled() -> None:
    """Forget every compiled block function and dynamo's caches, so the next compiled call compiles afresh for
    the settings then in force. Recompiling the shared block function for in-block recompute after another
    configuration trips a dynamo assertion (torch 2.13, CPU inductor); a process that switches settings (the
    bench, the tests) calls this between them."""
    _COMPILED.clear()
    torch._dynamo.reset()


def check_grad(plan: MemoryPlan) -> None:
    """Fail loudly when `plan` was resolved for another grad mode than the one in force."""
    if plan.grad != torch.is_grad_enabled():
        raise RuntimeError(f"a MemoryPlan resolved for grad={plan.grad} ran with grad={torch.is_grad_enabled()}: "
                           "resolve the plan for the grad mode of the call (protfold.model.plan.resolve)")


def run_blocks(
    blocks: Sequence[torch.nn.Module],
    state: tuple[Tensor, ...],
    extra: tuple[Any, ...],
    *,
    plan: MemoryPlan,
    inplace_inputs: bool = False,
) -> tuple[Tensor, ...]:
    """`state = block(*state, *extra, plan=plan)` for each block.

    With grad: blocks compiled with `plan.compile_blocks`, and every `plan.blocks_per_checkpoint` blocks one
    non-reentrant checkpoint (only the segment inputs m, z, masks are kept, in the form chosen by
    `plan.checkpoint_storage`; the plan is an argument of the checkpointed function). Without grad: each block
    after the first may overwrite its inputs (`inplace`), the first only when the caller handed them over
    (`inplace_inputs`).
    """
    check_grad(plan)
    if not plan.grad:
        for i, block in enumerate(blocks):
            state = block(*state, *extra, plan=plan, inplace=inplace_inputs or i > 0)
        return state
    if plan.compile_blocks:
        blocks = [compiled(block) for block in blocks]
    k = plan.blocks_per_checkpoint
    if k is None:
        for block in blocks:
            state = block(*state, *extra, plan=plan)
        return state
    n_state = len(state)

    def segment(group: Sequence[Callable[..., Any]]) -> Callable[..., tuple[Tensor, ...]]:
        def run(plan_: MemoryPlan, *args: Any) -> tuple[Tensor, ...]:
            s, e = tuple(args[:n_state]), tuple(args[n_state:])
            for block in group:
                s = block(*s, *e, plan=plan_)
            return s

        return run

    for start in range(0, len(blocks), k):
        with boundary_storage(plan):
            state = recompute(segment(blocks[start : start + k]), plan, *state, *extra)
    return state


def _leaf_param_storage(t: Tensor) -> bool:
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


def saved_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of tensors that autograd keeps for backward while `fn()` runs (each storage counted once).

    Storages of leaf tensors that require grad (parameters) are not counted. Tensors kept inside a
    checkpoint are recomputed rather than kept, so they do not reach this hook and are not counted.
    """
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        if not _leaf_param_storage(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        # A detached alias, not `t`: a node that saves its own output would otherwise hold the output's Python
        # object, a cycle through C++ that gc cannot break; after an exception (OOM) before backward, the
        # whole graph would then stay alive.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


_HALF = (torch.float16, torch.bfloat16)


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created by ATen ops while active, freed through storage finalizers.

    `cuda_autocast`: make LayerNorm behave as under CUDA autocast (fp32 list: a half input is up-cast and the
    output is fp32), which CPU autocast does not do; the up-cast copy of the input counts as a transient.
    """

    def __init__(self, existing: set[int], cuda_autocast: bool = False) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.live: set[int] = set()
        self.existing = existing
        self.cuda_autocast = cuda_autocast

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.cuda_autocast and func is torch.ops.aten.native_layer_norm.default and args[0].dtype in _HALF:
            up = [a.float() if isinstance(a, Tensor) else a for a in args]
            copy_bytes = args[0].numel() * 4  # the fp32 copy of the input CUDA autocast makes, alive with the output
            out = func(*up, **(kwargs or {}))
        else:
            copy_bytes = 0
            out = func(*args, **(kwargs or {}))
        self.track(out)
        self.peak = max(self.peak, self.current + copy_bytes)
        return out

    def track(self, out: Any) -> None:
        """Count the storages of `out` not seen before as live until their finalizers run."""
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or key in self.live or key in self.existing:
                continue
            self.live.add(key)
            self.current += n
            self.peak = max(self.peak, self.current)
            self._counted(n)
            weakref.finalize(storage, self._free, key, n)

    def _counted(self, n: int) -> None:
        """Called after each new storage of n bytes is counted (a hook for meters that split by phase)."""

    def _free(self, key: int, n: int) -> None:
        self.current -= n
        self.live.discard(key)


def peak_new_bytes(fn: Callable[[], Any], existing: Sequence[Tensor] = (), *, cuda_autocast: bool = False) -> int:
    """Peak bytes of tensors allocated by `fn()` and alive at the same time, on any device (CPU included).

    Storages of `existing` tensors (inputs, parameters) are not counted, nor are views of them. What `fn`
    returns counts as long as it lives inside the call. Meant for tests and benchmarks, not for training.
    `cuda_autocast=True` (CPU measurements): LayerNorm under autocast runs in fp32 as CUDA autocast does.
    """
    # autocast is off inside __torch_dispatch__, so whether it is on is read here, where `fn` will run
    autocast = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    mode = _LiveBytes({t.untyped_storage().data_ptr() for t in existing}, cuda_autocast and autocast)
    with mode:
        result = fn()
    del result
    return mode.peak
