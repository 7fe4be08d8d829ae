"""The cpu backend's fast paths give the plain PyTorch results."""

import pytest
import torch
import torch.nn.functional as F

from pllm.runtime.cpu_ops import TorchOps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 64, 300])
def test_linear_equals_f_linear_bit_for_bit(dtype, num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 96, generator=g).to(dtype)
    w = torch.randn(160, 96, generator=g).to(dtype)
    b = torch.randn(160, generator=g).to(dtype)
    ops = TorchOps()
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(ops.mlp(x, torch.cat([w, w.flip(0)]), w.t().contiguous()),
                       F.linear(F.silu(F.linear(x, w)) * F.linear(x, w.flip(0)), w.t().contiguous()))
