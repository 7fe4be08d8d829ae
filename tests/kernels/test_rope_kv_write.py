"""rope_kv_write kernel vs a PyTorch reference: rotated q and k, and k/v landing in the right cache slots."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

# Reference: Hugging Face's rotate_half rotation computed in fp32 from the same rounded inputs. Tolerances:
# float32 -- one multiply-add per element, possibly fused differently: 1e-6 relative, 1e-6 absolute.
# float16 -- the kernel rounds the fp32 rotation once to fp16 (the reference too): 1 ulp = 2**-11 relative.
# bfloat16 -- the same with 2**-8: 1 ulp ~ 8e-3 relative.
# v is copied bit for bit in every dtype.
TOLERANCES = {
    "float32": {"atol": 1e-6, "rtol": 1e-6},
    "float16": {"atol": 1e-3, "rtol": 1e-3},
    "bfloat16": {"atol": 1.6e-2, "rtol": 1.6e-2},
}
MAX_POSITIONS = 4096

SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_cos_sin_cache(head_dim: int, theta: float = 10000.0) -> torch.Tensor:  # [MAX_POSITIONS, head_dim] fp32
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [head_dim / 2]
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def reference_rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos_sin [T, R] (cos | sin halves). Hugging Face's x * cos + rotate_half(x) * sin on the first
    R dims, the rest unchanged (Phi3's partial rotary; R = D for Llama)."""
    rotary_dim = cos_sin.shape[-1]
    half = rotary_dim // 2
    cos = cos_sin[:, None, :half].repeat(1, 1, 2)  # [T, 1, R]
    sin = cos_sin[:, None, half:].repeat(1, 1, 2)
    x = x.float()
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def check_rope_kv_write(kernel_ops, *, interpret: bool, device: str, dtype: str, head_dim: int, num_kv_heads: int,
                        group_size: int, block_size: int, num_tokens: int, seed: int,
                        partial_rotary_factor: float = 1.0) -> None:
    num_heads = num_kv_heads * group_size
    ops = kernel_ops(interpret=interpret, dtype=dtype, block_size=block_size, head_dim=head_dim,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                     partial_rotary_factor=partial_rotary_factor)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    # q, k, v as strided views of one fused projection output, as the model produces them
    qkv = torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), generator=gen).to(torch_dtype)
    q, k, v = qkv.to(device).split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q = q.view(num_tokens, num_heads, head_dim)  # [T, num_heads, D]
    k = k.view(num_tokens, num_kv_heads, head_dim)  # [T, num_kv_heads, D]
    v = v.view(num_tokens, num_kv_heads, head_dim)
    # positions include 0 and the last one; slots are distinct, scattered over all blocks
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    positions[0] = 0
    positions[-1] = MAX_POSITIONS - 1 if num_tokens > 1 else positions[-1]
    num_blocks = num_tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    cos_sin = make_cos_sin_cache(int(head_dim * partial_rotary_factor))
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, -7.0, dtype=torch_dtype, device=device)  # -7: "never written"
    v_cache = torch.full(cache_shape, -7.0, dtype=torch_dtype, device=device)

    q_rot, k_rot = ops.rope_kv_write(q, k, v, positions.to(device), cos_sin.to(device), k_cache, v_cache,
                                     slots.to(device))

    expected_q = reference_rotate(q.cpu(), cos_sin[positions])
    expected_k = reference_rotate(k.cpu(), cos_sin[positions])
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(q_rot.cpu().float(), expected_q, **tol)
    torch.testing.assert_close(k_rot.cpu().float(), expected_k, **tol)
    flat_k = k_cache.cpu().view(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, D]
    flat_v = v_cache.cpu().view(-1, num_kv_heads, head_dim)
    torch.testing.assert_close(flat_k[slots], k_rot.cpu(), atol=0, rtol=0)  # the cache holds the returned k
    torch.testing.assert_close(flat_v[slots], v.cpu(), atol=0, rtol=0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert bool((flat_k[untouched] == -7).all()) and bool((flat_v[untouched] == -7).all()), "wrote outside the slots"


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_kv_heads=st.integers(1, 3),
    group_size=st.integers(1, 8),
    block_size=st.sampled_from([16, 32]),
    num_tokens=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", head_dim=80, num_kv_heads=1, group_size=1, block_size=16, num_tokens=1, seed=0)
@example(dtype="float16", head_dim=96, num_kv_heads=2, group_size=8, block_size=32, num_tokens=33, seed=1)
def test_rope_kv_write_interpret(kernel_ops, dtype, head_dim, num_kv_heads, group_size, block_size, num_tokens,
                                 seed):
    check_rope_kv_write(kernel_ops, interpret=True, device="cpu", dtype=dtype, head_dim=head_dim,
                        num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                        num_tokens=num_tokens, seed=seed)


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    partial_rotary_factor=st.sampled_from([0.25, 0.5, 0.75]),
    num_kv_heads=st.integers(1, 3),
    group_size=st.integers(1, 4),
    num_tokens=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", head_dim=128, partial_rotary_factor=0.75, num_kv_heads=1, group_size=3, num_tokens=1, seed=0)
@example(dtype="float16", head_dim=80, partial_rotary_factor=0.25, num_kv_heads=2, group_size=1, num_tokens=17, seed=1)
def test_rope_kv_write_partial_rotary_interpret(kernel_ops, dtype, head_dim, partial_rotary_factor, num_kv_heads,
                                                group_size, num_tokens, seed):
    """Phi3's partial rotary: only the first int(head_dim * factor) dims turn; the rest reach q, k and the cache."""
    check_rope_kv_write(kernel_ops, interpret=True, device="cpu", dtype=dtype, head_dim=head_dim,
                        num_kv_heads=num_kv_heads, group_size=group_size, block_size=16, num_tokens=num_tokens,
                        seed=seed, partial_rotary_factor=partial_rotary_factor)


@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.75])
def test_cpu_backend_rotation_matches_reference(partial_rotary_factor):
    """The cpu backend's PyTorch rotation (used whenever its compiled kernel does not apply) against the reference."""
    from pllm.runtime.backends.cpu.cpu_ops import TorchOps

    gen = torch.Generator().manual_seed(5)
    head_dim, num_tokens = 64, 9
    q, k, v = (torch.randn((num_tokens, n, head_dim), generator=gen) for n in (4, 2, 2))
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    cos_sin = make_cos_sin_cache(int(head_dim * partial_rotary_factor))
    k_cache, v_cache = torch.zeros((2, 16, 2, head_dim)), torch.zeros((2, 16, 2, head_dim))
    slots = torch.randperm(32, generator=gen)[:num_tokens]
    q_rot, k_rot = TorchOps().rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q_rot, reference_rotate(q, cos_sin[positions]), **TOLERANCES["float32"])
    torch.testing.assert_close(k_rot, reference_rotate(k, cos_sin[positions]), **TOLERANCES["float32"])
    assert torch.equal(k_cache.view(-1, 2, head_dim)[slots], k_rot)
    assert torch.equal(v_cache.view(-1, 2, head_dim)[slots], v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_kv_heads=st.integers(1, 8),
    group_size=st.integers(1, 8),
    block_size=st.sampled_from([16, 32]),
    num_tokens=st.integers(1, 600),
    seed=st.integers(0, 2**16),
)
def test_rope_kv_write_cuda(kernel_ops, cuda_device, dtype, head_dim, num_kv_heads, group_size, block_size,
                            num_tokens, seed):
    check_rope_kv_write(kernel_ops, interpret=False, device=cuda_device, dtype=dtype, head_dim=head_dim,
                        num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                        num_tokens=num_tokens, seed=seed)


def test_partial_rotary_renders_its_own_kernel(tmp_path):
    """A family with partial rotary gets a different rendered file (a pass-through tile); full rotary has none."""
    from pllm.compiler.plan import make_plan
    from pllm.compiler.render import render_plan

    from .conftest import tiny_spec

    sources = {}
    for factor in (1.0, 0.75):
        render_plan(make_plan(tiny_spec(partial_rotary_factor=factor), "float32", 16), tmp_path / str(factor))
        sources[factor] = (tmp_path / str(factor) / "rope_kv_write.py").read_text()
    assert "ROTARY_DIM = 64" in sources[1.0] and "ROTARY_DIM = 48" in sources[0.75]
    assert "pass unchanged" in sources[0.75] and "pass unchanged" not in sources[1.0]
    assert "cpu_rope_kv_write" in [k.name for k in make_plan(tiny_spec(), "float32", 16).kernels]
    assert "cpu_rope_kv_write" not in [k.name for k in make_plan(tiny_spec(partial_rotary_factor=0.75), "float32",
                                                                  16).kernels]
