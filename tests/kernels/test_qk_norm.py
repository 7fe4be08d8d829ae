"""qk_norm kernel (per-head RMSNorm of q and k) and the (1 + w) norm offset vs PyTorch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pllm.runtime.backends.cpu.cpu_ops import TorchOps

# Reference: Hugging Face's RMSNorm numerics on the same rounded inputs, Llama's (offset 0: round the row, then
# multiply by w) or Gemma's (offset 1: the row times (1 + w) in fp32, rounded once). The kernel differs only in the
# summation order of the mean square: ~1e-6 relative in fp32; in fp16 / bf16 one rounding (2**-11 / 2**-8) apart at
# most. Triton's interpreter converts to bfloat16 by truncation, so the kernels run in fp32 and fp16 under it (as the
# other kernel tests do); bf16 is checked on the cpu backend's PyTorch path.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "float16": {"atol": 1e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 1.6e-2, "rtol": 1.6e-2},
}
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)  # Gemma3RMSNorm
    return weight * normed.to(x.dtype)  # LlamaRMSNorm / Qwen3RMSNorm


def check_qk_norm(ops, *, dtype: str, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  offset: float, seed: int) -> None:
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    # q and k as the model hands them over: strided views into one fused qkv row
    qkv = (torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), generator=gen) * 3).to(torch_dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    q_weight = (0.1 * torch.randn(head_dim, generator=gen) + (1 - offset)).to(torch_dtype)
    k_weight = (0.1 * torch.randn(head_dim, generator=gen) + (1 - offset)).to(torch_dtype)
    eps = 1e-6
    q_out, k_out = ops.qk_norm(q, k, q_weight, k_weight, eps, offset)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == torch_dtype
    torch.testing.assert_close(q_out, reference_norm(q, q_weight, eps, offset), **TOLERANCES[dtype])
    torch.testing.assert_close(k_out, reference_norm(k, k_weight, eps, offset), **TOLERANCES[dtype])


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    num_tokens=st.integers(1, 9),
    num_kv_heads=st.integers(1, 3),
    group_size=st.integers(1, 4),
    head_dim=st.sampled_from([64, 80, 128, 256]),
    offset=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_qk_norm_interpret(kernel_ops, dtype, num_tokens, num_kv_heads, group_size, head_dim, offset, seed):
    num_heads = num_kv_heads * group_size
    ops = kernel_ops(interpret=True, dtype=dtype, head_dim=head_dim, num_attention_heads=num_heads,
                     num_key_value_heads=num_kv_heads, rms_norm_eps=1e-6, qk_norm=True, norm_weight_offset=offset)
    check_qk_norm(ops, dtype=dtype, num_tokens=num_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  head_dim=head_dim, offset=offset, seed=seed)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qk_norm_torch_ops(dtype, offset):
    check_qk_norm(TorchOps(), dtype=dtype, num_tokens=5, num_heads=4, num_kv_heads=2, head_dim=80, offset=offset,
                  seed=0)


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
    expected = reference_norm(summed, weight, eps, 1.0)
    for ops in (triton_ops, TorchOps()) if dtype == triton_dtype else (TorchOps(),):
        out, new_residual = ops.rms_norm(x, weight, eps, residual, 1.0)
        torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
        assert torch.equal(new_residual, summed)  # one rounded add in both
    with pytest.raises(AssertionError, match="offset"):
        triton_ops.rms_norm(x.to(triton_ops.kernels["rms_norm"].DTYPE), weight, eps, None)  # Llama's rounding
