"""FlexAttention on the GPU (skipped without CUDA) against the plain kernel, fp32: outputs and the gradients of
q, k, v and the pair bias shared by all rows, for a head as wide as the Evoformer's (32) and one as narrow as
the extra MSA stack's (8, zero-padded to the kernel's 16)."""

from __future__ import annotations

import pytest
import torch

from protfold.config import MemoryConfig
from protfold.model.primitives import attention, mask_bias

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("head_dim", [8, 32])
def test_flex_matches_plain_attention_on_gpu(head_dim: int) -> None:
    dev, rows, heads, n = torch.device("cuda"), 6, 4, 96
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, rows, heads, n, head_dim, device=dev, generator=gen) for _ in range(3))
    pair = torch.randn(1, 1, heads, n, n, device=dev, generator=gen)  # shared by every row
    keys = mask_bias((torch.rand(1, rows, 1, 1, n, device=dev, generator=gen) > 0.2).float())
    weights = torch.randn(1, rows, heads, n, head_dim, device=dev, generator=gen)
    results = []
    for kernel in ("naive", "flex"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pair)]
        out = attention(*leaves[:3], [keys, leaves[3]], MemoryConfig(attention=kernel))
        (out * weights).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for name, got, want in zip(("out", "q", "k", "v", "pair"), results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)
