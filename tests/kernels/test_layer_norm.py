"""layer_norm kernel (LayerNorm with bias, the residual add fused) vs torch's layer_norm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

# Reference: torch.nn.functional.layer_norm in fp32 on the same (rounded) inputs, the residual added in the model
# dtype first as BERT does. Tolerances per dtype:
# float32 -- only the summation order of mean and variance differs: ~1e-6 relative.
# float16 -- one rounding of the output to fp16 (2**-11 relative) on both sides: 1e-3.
# bfloat16 -- the same with 2**-8 relative precision: 1 ulp is ~8e-3.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "float16": {"atol": 1e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 1.6e-2, "rtol": 1.6e-2},
}

SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_layer_norm(encoder_kernel_ops, *, interpret: bool, device: str, dtype: str, hidden_size: int,
                     num_tokens: int, with_residual: bool, seed: int) -> None:
    eps = 1e-12 if hidden_size % 2 else 1e-5  # both eps values round-trip through the rendered source
    ops = encoder_kernel_ops(interpret=interpret, dtype=dtype, layer_norm_eps=eps, hidden_size=hidden_size)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    # an offset mean: the kernel must centre before it squares
    x = (torch.randn((num_tokens, hidden_size), generator=gen) * 3 + 2).to(torch_dtype).to(device)  # [T, H]
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=gen)).to(torch_dtype).to(device)  # [H]
    bias = (0.1 * torch.randn(hidden_size, generator=gen)).to(torch_dtype).to(device)  # [H]
    residual = None
    if with_residual:
        residual = torch.randn((num_tokens, hidden_size), generator=gen).to(torch_dtype).to(device)  # [T, H]

    out = ops.layer_norm(x, weight, bias, eps, residual)
    summed = x if residual is None else x + residual  # rounded to the dtype, as in the model
    expected = torch.nn.functional.layer_norm(summed.float(), (hidden_size,), weight.float(), bias.float(), eps)
    assert out.shape == (num_tokens, hidden_size) and out.dtype == torch_dtype
    torch.testing.assert_close(out.float(), expected.to(torch_dtype).float(), **TOLERANCES[dtype])


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    hidden_size=st.sampled_from([64, 96, 100, 384]),
    num_tokens=st.integers(1, 9),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", hidden_size=384, num_tokens=1, with_residual=True, seed=0)  # all-MiniLM-L6-v2's width
@example(dtype="float32", hidden_size=100, num_tokens=3, with_residual=False, seed=1)  # masked lanes
def test_layer_norm_interpret(encoder_kernel_ops, dtype, hidden_size, num_tokens, with_residual, seed):
    check_layer_norm(encoder_kernel_ops, interpret=True, device="cpu", dtype=dtype, hidden_size=hidden_size,
                     num_tokens=num_tokens, with_residual=with_residual, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    hidden_size=st.sampled_from([64, 100, 384, 768, 1024]),
    num_tokens=st.integers(1, 300),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_cuda(encoder_kernel_ops, cuda_device, dtype, hidden_size, num_tokens, with_residual, seed):
    check_layer_norm(encoder_kernel_ops, interpret=False, device=cuda_device, dtype=dtype, hidden_size=hidden_size,
                     num_tokens=num_tokens, with_residual=with_residual, seed=seed)


def test_an_eps_other_than_the_rendered_one_is_refused(encoder_kernel_ops):
    ops = encoder_kernel_ops(interpret=True, dtype="float32", layer_norm_eps=1e-12, hidden_size=64)
    x = torch.zeros((1, 64))
    with pytest.raises(AssertionError, match="layer_norm eps 1e-05 differs"):
        ops.layer_norm(x, torch.ones(64), torch.zeros(64), 1e-5, None)
