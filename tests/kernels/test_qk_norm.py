"""qk_norm kernel vs a PyTorch reference: per-head RMSNorm of q and k, with offset 0 (qwen3) and 1 (gemma)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.runtime.backends.cpu.cpu_ops import TorchOps

# Reference: Hugging Face's norms in fp32 on the same (rounded) inputs. Tolerances per dtype, as in test_rms_norm:
# float32 -- only the summation order of the mean square differs: ~1e-6 relative.
# float16 / bfloat16 -- the output is rounded to the dtype (offset 0 rounds twice, as Hugging Face does, and the
#   reference the same way), so results differ by at most 1 ulp of the dtype.
TOLERANCES = {
    "float32": {"atol": 1e-5, "rtol": 1e-5},
    "float16": {"atol": 1e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 1.6e-2, "rtol": 1.6e-2},
}
SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """Qwen3RMSNorm (offset 0: weight * norm(x).to(dtype)) or Gemma3RMSNorm (offset 1: norm(x) * (1 + w), fp32)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def make_inputs(dtype: torch.dtype, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, seed: int,
                device: str):
    """q and k as strided views of one fused qkv projection, as the model hands them over."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (torch.randn((num_tokens, q_size + 2 * kv_size), generator=gen) * 3).to(dtype).to(device)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    q_weight = (0.5 + torch.rand(head_dim, generator=gen)).to(dtype).to(device)
    k_weight = (0.5 + torch.rand(head_dim, generator=gen)).to(dtype).to(device)
    return qkv, q, k, q_weight, k_weight


def check_qk_norm(kernel_ops, *, interpret: bool, device: str, dtype: str, num_tokens: int, num_heads: int,
                  group: int, head_dim: int, offset: float, seed: int) -> None:
    num_kv_heads = num_heads // group
    eps = 1e-6
    ops = kernel_ops(interpret=interpret, dtype=dtype, num_attention_heads=num_heads,
                     num_key_value_heads=num_kv_heads, head_dim=head_dim, rms_norm_eps=eps, qk_norm=True,
                     norm_weight_offset=offset)
    torch_dtype = getattr(torch, dtype)
    qkv, q, k, q_weight, k_weight = make_inputs(torch_dtype, num_tokens, num_heads, num_kv_heads, head_dim, seed,
                                                device)
    before = qkv.clone()
    q_out, k_out = ops.qk_norm(q, k, q_weight, k_weight, eps, offset)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == torch_dtype
    torch.testing.assert_close(q_out, reference_head_norm(q, q_weight, eps, offset), **TOLERANCES[dtype])
    torch.testing.assert_close(k_out, reference_head_norm(k, k_weight, eps, offset), **TOLERANCES[dtype])
    assert torch.equal(qkv, before)  # the Triton kernel writes new tensors, never its inputs


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    num_tokens=st.integers(1, 7),
    num_heads=st.sampled_from([1, 2, 4, 8]),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([16, 64, 80, 96, 128]),
    offset=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", num_tokens=1, num_heads=4, group=2, head_dim=80, offset=0.0, seed=0)
@example(dtype="bfloat16", num_tokens=3, num_heads=8, group=8, head_dim=128, offset=1.0, seed=1)
def test_qk_norm_interpret(kernel_ops, dtype, num_tokens, num_heads, group, head_dim, offset, seed):
    if group > num_heads:
        group = num_heads
    check_qk_norm(kernel_ops, interpret=True, device="cpu", dtype=dtype, num_tokens=num_tokens,
                  num_heads=num_heads, group=group, head_dim=head_dim, offset=offset, seed=seed)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_cpu_qk_norm_matches_reference_in_place(dtype, offset):
    """The cpu backend's PyTorch version is the reference itself, written back into the fused projection."""
    torch_dtype = getattr(torch, dtype)
    qkv, q, k, q_weight, k_weight = make_inputs(torch_dtype, 5, 4, 2, 64, seed=3, device="cpu")
    expected_q = reference_head_norm(q, q_weight, 1e-6, offset)
    expected_k = reference_head_norm(k, k_weight, 1e-6, offset)
    v_before = qkv[:, 6 * 64 :].clone()
    q_out, k_out = TorchOps().qk_norm(q, k, q_weight, k_weight, 1e-6, offset)
    assert torch.equal(q_out, expected_q) and torch.equal(k_out, expected_k)
    assert q_out.data_ptr() == q.data_ptr() and q_out.stride() == q.stride()  # the compiled RoPE reads one stride
    assert torch.equal(qkv[:, 6 * 64 :], v_before)


def test_qk_norm_zero_tokens(kernel_ops):
    ops = kernel_ops(interpret=True, dtype="float32", qk_norm=True)
    q_out, k_out = ops.qk_norm(torch.empty((0, 2, 64)), torch.empty((0, 1, 64)), torch.ones(64), torch.ones(64),
                               1e-5, 0.0)
    assert q_out.shape == (0, 2, 64) and k_out.shape == (0, 1, 64)


def test_qk_norm_rejects_other_eps_and_shapes(kernel_ops):
    ops = kernel_ops(interpret=True, dtype="float32", qk_norm=True)
    q, k, w = torch.zeros((2, 2, 64)), torch.zeros((2, 1, 64)), torch.ones(64)
    with pytest.raises(AssertionError, match="eps/offset"):
        ops.qk_norm(q, k, w, w, 1e-5, 1.0)
    with pytest.raises(AssertionError, match=r"k must be \[T, 1, 64\]"):
        ops.qk_norm(q, torch.zeros((2, 2, 64)), w, w, 1e-5, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    num_tokens=st.integers(1, 300),
    num_heads=st.sampled_from([8, 16, 32]),
    group=st.sampled_from([1, 4, 8]),
    head_dim=st.sampled_from([64, 128, 256]),
    offset=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_qk_norm_cuda(kernel_ops, cuda_device, dtype, num_tokens, num_heads, group, head_dim, offset, seed):
    check_qk_norm(kernel_ops, interpret=False, device=cuda_device, dtype=dtype, num_tokens=num_tokens,
                  num_heads=num_heads, group=group, head_dim=head_dim, offset=offset, seed=seed)


def test_only_models_with_qk_norm_get_the_kernel_and_the_offset_is_rendered(tmp_path):
    from pllm.compiler.plan import make_plan
    from pllm.compiler.render import render_plan

    from .conftest import tiny_spec

    assert "qk_norm" not in [k.name for k in make_plan(tiny_spec(), "float32", 16).kernels]
    sources = {}
    for offset in (0.0, 1.0):
        out = tmp_path / str(offset)
        render_plan(make_plan(tiny_spec(qk_norm=True, norm_weight_offset=offset), "float32", 16), out)
        sources[offset] = (out / "qk_norm.py").read_text()
    assert "NORM_OFFSET = 0.0" in sources[0.0] and "NORM_OFFSET = 1.0" in sources[1.0]
    assert "round the normalised row" in sources[0.0] and "round the normalised row" not in sources[1.0]
