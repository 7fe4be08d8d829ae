"""rms_norm kernel vs a PyTorch reference: with and without the fused residual add."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

# Reference: Hugging Face Llama numerics in fp32 on the same (rounded) inputs. Tolerances per dtype:
# float32 -- the kernel differs only in summation order of the mean square: ~1e-6 relative.
# float16 -- the output is rounded to fp16 (2**-11 relative) and is multiplied by the weight in fp16 as Hugging
#   Face does; the reference rounds the same way, so differences are 1 ulp: 1e-3 relative, 1e-3 absolute.
# bfloat16 -- the same with 2**-8 relative precision: 1 ulp is ~8e-3.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "float16": {"atol": 1e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 1.6e-2, "rtol": 1.6e-2},
}

SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face LlamaRMSNorm after `hidden = residual + hidden` in the model dtype."""
    r = x if residual is None else x + residual  # rounded to the dtype, as in the model
    r32 = r.float()
    normed = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)  # [T, H] fp32
    return normed.to(x.dtype) * weight, r


def check_rms_norm(kernel_ops, *, interpret: bool, device: str, dtype: str, hidden_size: int, num_tokens: int,
                   with_residual: bool, seed: int) -> None:
    eps = 1e-6 if hidden_size % 2 else 1e-5  # both eps values round-trip through the rendered source
    ops = kernel_ops(interpret=interpret, dtype=dtype, hidden_size=hidden_size, rms_norm_eps=eps)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((num_tokens, hidden_size), generator=gen) * 3).to(torch_dtype).to(device)  # [T, H]
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=gen)).to(torch_dtype).to(device)  # [H]
    residual = None
    if with_residual:
        residual = torch.randn((num_tokens, hidden_size), generator=gen).to(torch_dtype).to(device)  # [T, H]

    out, new_residual = ops.rms_norm(x, weight, eps, residual)
    expected, expected_residual = reference_rms_norm(x, weight, eps, residual)
    assert out.shape == (num_tokens, hidden_size) and out.dtype == torch_dtype
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    # the residual sum is one rounded add in both: it must match exactly
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    if residual is None:
        assert new_residual is x


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    hidden_size=st.sampled_from([64, 96, 100, 576]),
    num_tokens=st.integers(1, 9),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", hidden_size=576, num_tokens=1, with_residual=True, seed=0)
@example(dtype="float16", hidden_size=100, num_tokens=1, with_residual=False, seed=1)
def test_rms_norm_interpret(kernel_ops, dtype, hidden_size, num_tokens, with_residual, seed):
    check_rms_norm(kernel_ops, interpret=True, device="cpu", dtype=dtype, hidden_size=hidden_size,
                   num_tokens=num_tokens, with_residual=with_residual, seed=seed)


def test_rms_norm_zero_tokens(kernel_ops):
    ops = kernel_ops(interpret=True, dtype="float32", hidden_size=64)
    x = torch.empty((0, 64))
    out, residual = ops.rms_norm(x, torch.ones(64), 1e-5, torch.empty((0, 64)))
    assert out.shape == (0, 64) and residual.shape == (0, 64)


def test_rms_norm_rejects_wrong_shape(kernel_ops):
    ops = kernel_ops(interpret=True, dtype="float32", hidden_size=64)
    with pytest.raises(AssertionError, match=r"x must be \[T, 64\]"):
        ops.rms_norm(torch.zeros((2, 32)), torch.ones(64), 1e-5, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    hidden_size=st.sampled_from([96, 576, 2048, 4096]),
    num_tokens=st.integers(1, 300),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_cuda(kernel_ops, cuda_device, dtype, hidden_size, num_tokens, with_residual, seed):
    check_rms_norm(kernel_ops, interpret=False, device=cuda_device, dtype=dtype, hidden_size=hidden_size,
                   num_tokens=num_tokens, with_residual=with_residual, seed=seed)


def reference_gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm: the row times (1 + w) in fp32, rounded once."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)


# Gemma's rounding: tolerances as above; bf16 runs on the cpu backend's PyTorch path only (Triton's interpreter
# converts to bf16 by truncation).

@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rms_norm_weight_offset(kernel_ops, dtype, with_residual):
    """rms_norm rendered with NORM_OFFSET 1 (gemma) and the cpu backend's PyTorch path, against Gemma3RMSNorm."""
    hidden_size, eps = 200, 1e-6  # 200: the masked (non power of two) template branch
    # bf16: the PyTorch path only (the interpreter truncates to bf16)
    triton_dtype = "float16" if dtype == "bfloat16" else dtype
    triton_ops = kernel_ops(interpret=True, dtype=triton_dtype, hidden_size=hidden_size, rms_norm_eps=eps,
                            norm_weight_offset=1.0)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn((7, hidden_size), generator=gen) * 3).to(torch_dtype)
    weight = (0.1 * torch.randn(hidden_size, generator=gen)).to(torch_dtype)
    residual = torch.randn((7, hidden_size), generator=gen).to(torch_dtype) if with_residual else None
    summed = x if residual is None else x + residual
    expected = reference_gemma_rms_norm(summed, weight, eps)
    from pllm.runtime.backends.cpu.cpu_ops import TorchOps

    for ops in (triton_ops, TorchOps()) if dtype == triton_dtype else (TorchOps(),):
        out, new_residual = ops.rms_norm(x, weight, eps, residual, 1.0)
        torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
        assert torch.equal(new_residual, summed)  # one rounded add in both
    with pytest.raises(AssertionError, match="offset"):
        triton_ops.rms_norm(x.to(triton_ops.kernels["rms_norm"].DTYPE), weight, eps, None)  # Llama's rounding
