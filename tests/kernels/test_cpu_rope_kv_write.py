"""cpu_rope_kv_write (the cpu backend's compiled RoPE + KV-cache write) vs the PyTorch path, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.kernels.cpu_rope_kv_write import supported as cpu_rope_supported
from pllm.compiler.plan import make_plan
from pllm.runtime.backends.cpu.cpu_kernels import CpuRopeKvWrite
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

from .conftest import compile_cpu_kernel, tiny_spec
from .test_rope_kv_write import MAX_POSITIONS, make_cos_sin_cache, reference_rotate

# The kernel rounds exactly where the PyTorch path rounds (each product, then their sum, in the dtype; no fused
# multiply-add), and the PyTorch path is in turn bit for bit Hugging Face's rotation in float32. So the test asks
# for equality, no tolerance, in both dtypes; and, as a cross-check, that the result is the fp32 reference rotation
# to within one rounding of the dtype.
SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def cpu_rope(tmp_path_factory: pytest.TempPathFactory):
    """Factory: (dtype, head_dim, num_heads, num_kv_heads) -> the compiled kernel, cached per shape."""
    cache: dict[tuple, CpuRopeKvWrite] = {}

    def make(dtype: str, head_dim: int, num_heads: int, num_kv_heads: int) -> CpuRopeKvWrite:
        key = (dtype, head_dim, num_heads, num_kv_heads)
        if key not in cache:
            spec = tiny_spec(head_dim=head_dim, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
            plan = make_plan(spec, dtype, 16)
            library = compile_cpu_kernel(tmp_path_factory.mktemp("cpu_rope"), plan, "cpu_rope_kv_write")
            cache[key] = CpuRopeKvWrite(library, getattr(torch, dtype), num_heads, num_kv_heads, head_dim)
        return cache[key]

    return make


@SETTINGS
@given(dtype=st.sampled_from(["float32", "bfloat16"]), head_dim=st.sampled_from([64, 80, 96, 128]),
       num_kv_heads=st.integers(1, 3), group_size=st.sampled_from([1, 3, 8]), num_tokens=st.integers(1, 40),
       seed=st.integers(0, 2**16))
@example(dtype="float32", head_dim=64, num_kv_heads=3, group_size=3, num_tokens=1, seed=0)  # SmolLM2, batch 1
@example(dtype="bfloat16", head_dim=80, num_kv_heads=2, group_size=8, num_tokens=17, seed=1)  # threaded from 16
def test_equals_the_pytorch_path(cpu_rope, dtype, head_dim, num_kv_heads, group_size, num_tokens, seed):
    num_heads = num_kv_heads * group_size
    kernel = cpu_rope(dtype, head_dim, num_heads, num_kv_heads)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    # q, k, v as strided views of one fused projection output, as the model produces them
    qkv = (torch.randn((num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), generator=gen) * 4).to(torch_dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q = q.view(num_tokens, num_heads, head_dim)  # [T, H, D]
    k = k.view(num_tokens, num_kv_heads, head_dim)  # [T, KV, D]
    v = v.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    positions[0] = MAX_POSITIONS - 1
    block_size, num_blocks = 16, num_tokens // 16 + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    cos_sin = make_cos_sin_cache(head_dim)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = {name: torch.full(cache_shape, -7.0, dtype=torch_dtype) for name in ("k", "v", "k_ref", "v_ref")}

    ops, plain = TorchOps(rope_kernel=kernel), TorchOps()
    assert kernel.accepts(q, k, v)  # or the PyTorch path would run for both
    q_rot, k_rot = ops.rope_kv_write(q, k, v, positions, cos_sin, caches["k"], caches["v"], slots)
    q_ref, k_ref = plain.rope_kv_write(q, k, v, positions, cos_sin, caches["k_ref"], caches["v_ref"], slots)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    assert torch.equal(caches["k"], caches["k_ref"]) and torch.equal(caches["v"], caches["v_ref"])  # -7 elsewhere
    assert torch.equal(caches["v"].view(-1, num_kv_heads, head_dim)[slots], v)
    # and both are the fp32 rotation up to the dtype's roundings: of cos and sin, of the two products and of their
    # sum, each at most half a unit in the last place (2**-9 relative in bf16) of numbers no larger than
    # sqrt(2) * max|x| (|cos| + |sin| <= sqrt(2)), and the sum may cancel, so the bound is absolute: about
    # 4.3 * 2**-9 * max|x|, rounded up to 5 (float32: the same with 2**-24)
    unit = 2**-9 if dtype == "bfloat16" else 2**-24
    atol = 5 * unit * float(q.float().abs().max())
    torch.testing.assert_close(q_rot.float(), reference_rotate(q, cos_sin[positions]), rtol=0, atol=atol)


def test_torch_ops_fall_back_for_other_layouts(cpu_rope):
    """q, k, v that are not rows of one projection (separate tensors) take the PyTorch path."""
    kernel = cpu_rope("float32", 64, 2, 1)
    q, k, v = torch.randn(3, 2, 64), torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    assert not kernel.accepts(q, k, v)
    calls = []
    kernel_fn = kernel._fn
    kernel._fn = lambda *args: calls.append(args) or kernel_fn(*args)
    try:
        cache = torch.zeros(2, 16, 1, 64)
        TorchOps(rope_kernel=kernel).rope_kv_write(q, k, v, torch.arange(3), make_cos_sin_cache(64), cache,
                                                   cache.clone(), torch.arange(3))
    finally:
        kernel._fn = kernel_fn
    assert not calls


def test_plan_carries_the_kernel_where_it_applies():
    assert cpu_rope_supported(tiny_spec(head_dim=80), "float32") and cpu_rope_supported(tiny_spec(), "bfloat16")
    assert not cpu_rope_supported(tiny_spec(), "float16")
    assert not cpu_rope_supported(tiny_spec(head_dim=72), "float32")  # halves of 36: not whole 8-lane vectors
    assert "cpu_rope_kv_write" in {k.name for k in make_plan(tiny_spec(), "float32", 16).kernels}
