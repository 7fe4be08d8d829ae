"""cpu_quant_linear (the cpu backend's compiled packed-weight GEMV and dequantiser) vs dequantize-then-matmul.

Bounds, from the arithmetic (u = 2^-24, fp32's unit roundoff; gamma(n) = n u / (1 - n u)):
- The reference is x @ dequantize(W)^T in fp32: each w_i = fl(fl(c_i s) + m) is within 2.01 u (|c_i s| + |m|) of
  c_i s + m, and the matmul's sum of K products, in whatever order torch takes, is within gamma(K) sum |w_i x_i|
  of the exact sum over those w_i.
- The kernel sums the same terms regrouped (s * sum c_i x_i + m * sum x_i per group, vector lanes, group
  totals): every term passes through fewer than K + 8 roundings, so it is within gamma(K + 8) A of the exact
  sum_i (c_i s + m) x_i, where A = sum_i (|c_i s| + |m|) |x_i| + |b| (the bias add is one rounding more).
Together |kernel - reference| <= (gamma(K) + gamma(K + 8) + 2.01 u) A <= 2 gamma(K + 10) A. A bfloat16 output is
then rounded once more: within 2^-8 of the kernel's fp32 value, relatively. This bound is far from loose enough
to pass a wrong nibble, group or scale (those move results by O(A / K)), and a second test makes all arithmetic
exact (small-integer x, power-of-two scales and mins) where the two must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.plan import make_plan
from pllm.compiler.quantize import quantize_int4, quantize_int8
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme, dequantize, pack_int4
from pllm.runtime.backends.cpu.cpu_kernels import CpuQuantLinear
from pllm.runtime.backends.cpu.cpu_ops import QUANT_GEMV_MAX_TOKENS, TorchOps

from .conftest import compile_cpu_kernel, tiny_spec

SETTINGS = settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0**-24
BF16_U = 2.0**-8

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> CpuQuantLinear:
    plan = make_plan(tiny_spec(), "bfloat16", 16, quant=QuantFormat(QuantScheme.INT4, 32))
    return CpuQuantLinear(compile_cpu_kernel(tmp_path_factory.mktemp("cpu_quant_linear"), plan, "cpu_quant_linear"))


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def random_weight(int4: bool, n: int, k: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    w = torch.randn((n, k), generator=gen) * 0.05 + 0.01 * torch.randn((n, 1), generator=gen)
    return quantize_int4(w, group) if int4 else quantize_int8(w)


def error_bound(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """2 gamma(K + 10) A per output, A = sum_i (|c_i s| + |m|) |x_i| + |b| (module docstring), in float64."""
    n, k = weight.shape
    group = weight.fmt.group_size
    codes = (torch.stack((weight.codes & 15, weight.codes >> 4), -1).reshape(n, k) if weight.mins is not None
             else weight.codes).double().view(n, -1, group)
    magnitude = (codes * weight.scales.double()[..., None]).abs()
    if weight.mins is not None:
        magnitude = magnitude + weight.mins.double().abs()[..., None]
    a = x.double().abs() @ magnitude.reshape(n, k).T  # [T, N]
    if bias is not None:
        a = a + bias.double().abs()
    return 2 * gamma(k + 10) * a


def reference(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32: x @ dequantize(W)^T + b."""
    return F.linear(x.float(), dequantize(weight), None if bias is None else bias.float())


@SETTINGS
@given(int4=st.booleans(), n=st.integers(1, 70), groups=st.integers(1, 6), group=st.sampled_from([32, 64, 128]),
       num_tokens=st.integers(1, 2 * QUANT_GEMV_MAX_TOKENS), bf16=st.booleans(), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
@example(int4=False, n=576, groups=1, group=576, num_tokens=1, bf16=True, with_bias=False, seed=0)  # SmolLM2 qkv
@example(int4=True, n=1536, groups=9, group=64, num_tokens=4, bf16=True, with_bias=True, seed=1)
@example(int4=True, n=3, groups=1, group=32, num_tokens=7, bf16=False, with_bias=False, seed=2)  # tile remainder
def test_gemv_equals_dequantize_then_matmul(kernel, int4, n, groups, group, num_tokens, bf16, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    weight = random_weight(int4, n, k, group if int4 else k, gen)
    x = torch.randn((num_tokens, k), generator=gen)
    x = x.bfloat16() if bf16 else x
    bias = torch.randn(n, generator=gen) if with_bias else None

    got = kernel.gemv(x, weight, bias)
    assert got.dtype == x.dtype and got.shape == (num_tokens, n)
    want = reference(x, weight, bias).double()
    bound = error_bound(x, weight, bias)
    if bf16:
        bound = bound + BF16_U * (want.abs() + bound)
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max():.3g}"


@SETTINGS
@given(int4=st.booleans(), n=st.integers(1, 40), groups=st.integers(1, 4), group=st.sampled_from([32, 64]),
       num_tokens=st.integers(1, 9), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_gemv_exact_when_arithmetic_is_exact(kernel, int4, n, groups, group, num_tokens, bf16, seed):
    """Small-integer x, power-of-two scales and mins: every product and partial sum is an integer multiple of a
    power of two below 2^24, so any summation order gives the same fp32 value, and the kernel must equal the
    reference bit for bit: a misplaced nibble, group, scale or min cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    g = groups if int4 else 1
    scales = 2.0 ** torch.randint(-4, 2, (n, g), generator=gen).float()
    if int4:
        codes = pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
        mins = -(2.0 ** torch.randint(-3, 3, (n, g), generator=gen).float())
        weight = QuantizedWeight(codes, scales, mins, QuantFormat(QuantScheme.INT4, group))
    else:
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        weight = QuantizedWeight(codes, scales, None, QuantFormat(QuantScheme.INT8, k))
    x = torch.randint(-8, 9, (num_tokens, k), generator=gen).float()
    x = x.bfloat16() if bf16 else x
    want = reference(x, weight, None)
    assert torch.equal(kernel.gemv(x, weight, None), want.to(x.dtype))


@SETTINGS
@given(int4=st.booleans(), n=st.integers(1, 50), groups=st.integers(1, 5), group=st.sampled_from([32, 64, 128]),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_dequantize_is_bit_exact(kernel, int4, n, groups, group, bf16, seed):
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    weight = random_weight(int4, n, k, group if int4 else k, gen)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert torch.equal(kernel.dequantize(weight, dtype), dequantize(weight, dtype))


@pytest.mark.parametrize("num_tokens", [1, QUANT_GEMV_MAX_TOKENS, QUANT_GEMV_MAX_TOKENS + 1, 70])
@pytest.mark.parametrize("with_kernel", [True, False])
def test_ops_linear_and_mlp_take_packed_weights(kernel, num_tokens, with_kernel):
    """TorchOps.linear: the GEMV up to QUANT_GEMV_MAX_TOKENS rows (within the bound above), beyond it (or with no
    compiled kernel) exactly the float GEMM of dequantize(W) in x's dtype; mlp goes through linear."""
    gen = torch.Generator().manual_seed(num_tokens)
    ops = TorchOps(quant_kernel=kernel if with_kernel else None)
    weight = random_weight(True, 96, 128, 32, gen)
    x = torch.randn((num_tokens, 128), generator=gen).bfloat16()
    got = ops.linear(x, weight)
    float_path = F.linear(x, dequantize(weight, torch.bfloat16))
    if with_kernel and num_tokens <= QUANT_GEMV_MAX_TOKENS:
        want = reference(x, weight, None).double()
        bound = error_bound(x, weight, None)
        assert bool(((got.double() - want).abs() <= bound + BF16_U * (want.abs() + bound)).all())
    else:
        assert torch.equal(got, float_path)
    down = random_weight(False, 128, 48, 48, gen)
    h = F.silu(got[:, :48]) * got[:, 48:]
    assert torch.equal(ops.mlp(x, weight, down), ops.linear(h, down))
