"""cpu_quant_linear (the cpu backend's compiled packed-weight rows and dequantiser) vs its meaning in models/quant.py:
dequantize(W) times the activations rounded by quantize_activation (int8 per block of 32), in float.

Bounds, from the arithmetic (u = 2^-24, fp32's unit roundoff; gamma(n) = n u / (1 - n u)). Write xq_i = q_i d_b
for the exact product of an activation code and its block's scale, and xr_i = fl(q_i d_b) for the reference's
dequantised activation; the kernel computes the same codes and scales as quantize_activation (every step one
correctly rounded IEEE operation; the exact test below would catch a differing code).
- The reference is xr @ dequantize(W)^T in fp32: each w_i = fl(fl(c_i s) + m) is within 2.01 u (|c_i s| + |m|) of
  c_i s + m, each xr_i within u |xq_i| of xq_i, and the matmul's sum of K products, in whatever order torch takes,
  is within gamma(K) sum |w_i xr_i| of the exact sum over those values.
- The kernel sums the same terms regrouped. The integer rows (AVX512-VNNI, AVX2) sum c_i q_i exactly in int32
  per block (at most 32 * 255 * 127, exact in fp32 too), then multiply by fl(d_b * s) (2 roundings) and
  accumulate; INT4 adds min * fl(sum of the block-dequantised activations over the group) (fewer than 32 + 3
  roundings a term). The float rows multiply fp32 xr_i by the codes as before. Either way every term passes
  through fewer than K + 8 roundings, so the kernel is within gamma(K + 8) A of the exact sum_i (c_i s + m) xq_i
  (plus u A for xr against xq), where A = sum_i (|c_i s| + |m|) |xq_i| + |b| (the bias add is one rounding more).
Together |kernel - reference| <= (gamma(K) + gamma(K + 8) + 3.01 u) A <= 2 gamma(K + 10) A. A bfloat16 output is
then rounded once more: within 2^-8 of the kernel's fp32 value, relatively. This bound is far from loose enough
to pass a wrong nibble, group, scale, lane or activation block (those move results by O(A / K)), and a second
test makes all arithmetic exact (activations whose quantisation is exact, power-of-two scales and mins, sums below
2^24 of the finest unit) where the two must agree bit for bit. Each test runs every row code this CPU has: the
integer rows of AVX512-VNNI and of AVX2, the AVX-512 float rows and the AVX2 baseline's float rows.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.kernels import cpu_quant_linear as cpu_quant_kernel
from pllm.compiler.quantize import quantize_int4, quantize_int4_sym, quantize_int6, quantize_int8
from pllm.models.quant import (
    QuantFormat,
    QuantizedWeight,
    QuantScheme,
    dequantize,
    dequantize_activation,
    pack_int4,
    quantize_activation,
    unpack_int4,
)
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.cpu_ops import TorchOps
from pllm.runtime.backends.cpu.cpu_quant_linear import QUANT_GEMV_MAX_TOKENS, WIDE_FLOATS, CpuQuantLinear, QuantRows

# `kernel` is function-scoped only to pick the row code; every example of a test runs under the same one
SETTINGS = settings(max_examples=examples(30), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
U = 2.0**-24
INT8, INT4, INT4_SYM = QuantScheme.INT8, QuantScheme.INT4, QuantScheme.INT4_SYM
BF16_U = 2.0**-8

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


# every row code (CpuQuantLinear.limit_isa) this CPU runs; a level it does not have runs the next below it, tested
# under that one's own name
@pytest.fixture(params=list(QuantRows), ids=lambda rows: rows.name.lower())
def kernel(compiled_quant: CpuQuantLinear, request: pytest.FixtureRequest):
    runs = compiled_quant.limit_isa(request.param)
    try:
        if runs is not request.param:
            pytest.skip(f"this CPU runs {runs.name} for {request.param.name}")
        yield compiled_quant
    finally:
        compiled_quant.limit_isa(QuantRows.INT_VNNI)


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def random_weight(scheme: QuantScheme, n: int, k: int, group: int, gen: torch.Generator) -> QuantizedWeight:
    """INT4, INT4_SYM or INT6 at `group`; INT8 per channel when group == k, else grouped (GGUF's Q8_0 is INT8 in
    groups of 32)."""
    w = torch.randn((n, k), generator=gen) * 0.05 + 0.01 * torch.randn((n, 1), generator=gen)
    if scheme is QuantScheme.INT4:
        return quantize_int4(w, group)
    if scheme is QuantScheme.INT4_SYM:
        return quantize_int4_sym(w, group)
    if scheme is QuantScheme.INT6:
        return quantize_int6(w, group)
    if group == k:
        return quantize_int8(w)
    blocks = w.view(n, -1, group)
    scales = blocks.abs().amax(-1) / 127
    codes = torch.round(blocks / scales[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return QuantizedWeight(codes, scales, None, QuantFormat(QuantScheme.INT8, group))


def with_scales(weight: QuantizedWeight, half: bool) -> QuantizedWeight:
    """The weight with its scales and mins stored in fp16 (half; rounded, and the rounded values are then the
    weight's meaning) or fp32: the kernel reads either (models.quant.SCALE_DTYPES)."""
    dtype = torch.float16 if half else torch.float32
    mins = None if weight.mins is None else weight.mins.to(dtype)
    return QuantizedWeight(weight.codes, weight.scales.to(dtype), mins, weight.fmt)


def rounded(x: torch.Tensor) -> torch.Tensor:
    """The activations the packed rows multiply: x quantised per block of 32, dequantised to fp32."""
    return dequantize_activation(*quantize_activation(x))


def error_bound(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """2 gamma(K + 10) A per output, A = sum_i (|c_i s| + |m|) |x_i| + |b| (module docstring), in float64."""
    n, k = weight.shape
    group = weight.fmt.group_size
    codes = (unpack_int4(weight.codes) if weight.fmt.scheme.nibbles else weight.codes).double().view(n, -1, group)
    magnitude = (codes * weight.scales.double()[..., None]).abs()
    mins = weight.group_mins()
    if mins is not None:
        magnitude = magnitude + mins.double().abs()[..., None]
    a = rounded(x).double().abs() @ magnitude.reshape(n, k).T  # [T, N] (|xq_i| = |xr_i| to within u, covered)
    if bias is not None:
        a = a + bias.double().abs()
    return 2 * gamma(k + 10) * a


def reference(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32: dequantize_activation(quantize_activation(x)) @ dequantize(W)^T + b."""
    return F.linear(rounded(x), dequantize(weight), None if bias is None else bias.float())


@SETTINGS
@given(scheme=st.sampled_from(list(QuantScheme)), n=st.integers(1, 70), groups=st.integers(1, 6),
       group=st.sampled_from([32, 64, 96, 128]),
       num_tokens=st.integers(1, QUANT_GEMV_MAX_TOKENS + 9), bf16=st.booleans(), with_bias=st.booleans(),
       half=st.booleans(), seed=st.integers(0, 2**16))
# SmolLM2's qkv; a chunk across groups; chunks within one; tile remainders; Q8_0-like; INT8 chunks across groups
@example(scheme=INT8, n=576, groups=1, group=576, num_tokens=1, bf16=True, with_bias=False, half=False, seed=0)
@example(scheme=INT4, n=37, groups=2, group=96, num_tokens=1, bf16=True, with_bias=False, half=True, seed=4)
@example(scheme=INT4, n=37, groups=2, group=128, num_tokens=1, bf16=True, with_bias=False, half=False, seed=5)
@example(scheme=INT4, n=1536, groups=9, group=64, num_tokens=4, bf16=True, with_bias=True, half=True, seed=1)
@example(scheme=INT4, n=3, groups=1, group=32, num_tokens=7, bf16=False, with_bias=False, half=True, seed=2)
@example(scheme=INT8, n=9, groups=3, group=32, num_tokens=64, bf16=True, with_bias=True, half=True, seed=3)
@example(scheme=INT8, n=37, groups=2, group=96, num_tokens=5, bf16=False, with_bias=True, half=False, seed=1)
# GGUF's Q4_0 (symmetric, no mins): decode, a batch, groups across chunks, mins from fp16 scales of 18 groups a row
@example(scheme=INT4_SYM, n=576, groups=18, group=32, num_tokens=1, bf16=True, with_bias=False, half=True, seed=10)
@example(scheme=INT4_SYM, n=37, groups=2, group=96, num_tokens=6, bf16=False, with_bias=True, half=False, seed=11)
# rows in whole panels of 16 (AVX512-VNNI reads them repacked, tests/kernels/test_cpu_quant_panels.py): one token
# (two panels a tile, then one), tokens in tiles of 4 and a tail, fp32 scales, groups of whole chunks; INT8 per
# channel (even seed) and in groups of 32 (odd)
@example(scheme=INT8, n=48, groups=2, group=64, num_tokens=1, bf16=True, with_bias=True, half=False, seed=16)
@example(scheme=INT8, n=32, groups=4, group=32, num_tokens=6, bf16=False, with_bias=False, half=True, seed=17)
@example(scheme=INT4, n=48, groups=9, group=64, num_tokens=1, bf16=True, with_bias=True, half=True, seed=12)
@example(scheme=INT4, n=32, groups=4, group=32, num_tokens=7, bf16=False, with_bias=False, half=False, seed=13)
@example(scheme=INT4_SYM, n=64, groups=18, group=32, num_tokens=1, bf16=True, with_bias=False, half=True, seed=14)
@example(scheme=INT4_SYM, n=16, groups=2, group=128, num_tokens=5, bf16=False, with_bias=True, half=False, seed=15)
# fp16 mins of 18 and 13 groups a row: the last vector's 2 or 5 (loaded as the row's last 8, moved down)
@example(scheme=INT4, n=40, groups=18, group=32, num_tokens=5, bf16=True, with_bias=False, half=True, seed=8)
@example(scheme=INT4, n=9, groups=13, group=64, num_tokens=1, bf16=False, with_bias=True, half=True, seed=9)
# fp16 scales of rows so long (600 groups) that each thread widens them a few rows at a time (wide_rows: 3 of each
# thread's 20 rows), bias and outputs moved along with them (the float rows; AVX2's integer rows read them directly)
@example(scheme=INT4, n=40, groups=600, group=32, num_tokens=3, bf16=True, with_bias=True, half=True, seed=6)
@example(scheme=INT8, n=40, groups=600, group=32, num_tokens=2, bf16=False, with_bias=True, half=True, seed=7)
def test_gemv_equals_its_reference(kernel, scheme, n, groups, group, num_tokens, bf16, with_bias, half, seed):
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    weight = random_weight(scheme, n, k, group if scheme.nibbles or seed % 2 else k, gen)  # INT8 per channel or not
    weight = with_scales(weight, half)
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


def exact_activations(num_tokens: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """x whose quantisation is exact: per block of 32, d = 2^e (e in -2..0) and codes q, one of them +-127 (so max|x|
    = 127 d and max|x| / 127 = d exactly), the rest in -8..8: x = q d, and quantize_activation gives back q and d."""
    q = torch.randint(-8, 9, (num_tokens, k // 32, 32), generator=gen).float()
    peak = torch.randint(0, 32, (num_tokens, k // 32, 1), generator=gen)
    q.scatter_(-1, peak, 127.0 * (torch.randint(0, 2, peak.shape, generator=gen).float() * 2 - 1))
    d = 2.0 ** torch.randint(-2, 1, (num_tokens, k // 32, 1), generator=gen).float()
    return (q * d).reshape(num_tokens, k)


@SETTINGS
@given(scheme=st.sampled_from(list(QuantScheme)), n=st.integers(1, 40), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64]), per_channel=st.booleans(), num_tokens=st.integers(1, 9), bf16=st.booleans(),
       half=st.booleans(), seed=st.integers(0, 2**16))
# rows in whole panels of 16 (read repacked where the CPU has AVX512-VNNI): one token and a batch; INT8 grouped and
# per channel
@example(scheme=INT4, n=32, groups=2, group=64, per_channel=False, num_tokens=1, bf16=True, half=True, seed=1)
@example(scheme=INT4_SYM, n=48, groups=4, group=32, per_channel=False, num_tokens=6, bf16=False, half=False, seed=2)
@example(scheme=INT8, n=32, groups=2, group=32, per_channel=False, num_tokens=1, bf16=True, half=True, seed=3)
@example(scheme=INT8, n=16, groups=4, group=64, per_channel=True, num_tokens=5, bf16=False, half=False, seed=4)
def test_gemv_exact_when_arithmetic_is_exact(kernel, scheme, n, groups, group, per_channel, num_tokens, bf16, half,
                                             seed):
    """Exactly quantisable activations, power-of-two scales and mins, small codes: every product and partial sum is
    an integer multiple of 2^-6 below 2^24 * 2^-6 = 2^18 in magnitude (K <= 256, so at most 8 blocks, each of |q|
    sum <= 127 + 31 * 8 = 375, at d <= 1: the codes' terms total at most 8 * 375 * 15 * 2 = 90000 (INT8 codes
    -15..15 at scales <= 1/4, less), the mins' (|min| <= 2, INT4_SYM's -8 * scale <= 16) at most 8 * 375 * 16 =
    48000), so any summation order gives the same fp32 value, and the kernel must equal the reference bit for bit:
    a misplaced nibble, group, scale, min, lane or activation code cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    if not scheme.nibbles and per_channel:
        group = k
    g = k // group
    if scheme.nibbles:
        scales = 2.0 ** torch.randint(-4, 2, (n, g), generator=gen).float()
        codes = pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
        mins = -(2.0 ** torch.randint(-3, 2, (n, g), generator=gen).float()) if scheme.stores_mins else None
        weight = QuantizedWeight(codes, scales, mins, QuantFormat(scheme, group))
    else:
        scales = 2.0 ** torch.randint(-4, -1, (n, g), generator=gen).float()
        codes = torch.randint(-15, 16, (n, k), generator=gen, dtype=torch.int8)
        weight = QuantizedWeight(codes, scales, None, QuantFormat(scheme, group))  # INT8 or INT6: codes -15..15
    weight = with_scales(weight, half)  # powers of two: exact in fp16 too
    x = exact_activations(num_tokens, k, gen)
    assert torch.equal(rounded(x), x)  # the construction's claim
    x = x.bfloat16() if bf16 else x  # q d is exact in bf16 too (|q| < 2^8)
    want = reference(x, weight, None)
    assert torch.equal(kernel.gemv(x, weight, None), want.to(x.dtype))


@SETTINGS
@given(scheme=st.sampled_from(list(QuantScheme)), n=st.integers(1, 50), groups=st.integers(1, 5),
       group=st.sampled_from([32, 64, 128]), bf16=st.booleans(), half=st.booleans(), seed=st.integers(0, 2**16))
@example(scheme=INT4, n=40, groups=700, group=32, bf16=True, half=True, seed=1)  # widened 2 rows at a time
@example(scheme=INT8, n=40, groups=3000, group=32, bf16=False, half=True, seed=2)  # and one
@example(scheme=INT4_SYM, n=40, groups=700, group=32, bf16=True, half=True, seed=3)
def test_dequantize_is_bit_exact(kernel, scheme, n, groups, group, bf16, half, seed):
    """On each instruction set's dequantiser (the float rows')."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    weight = with_scales(random_weight(scheme, n, k, group if scheme.nibbles or seed % 2 else k, gen), half)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert torch.equal(kernel.dequantize(weight, dtype), dequantize(weight, dtype))


@pytest.mark.parametrize("num_tokens", [1, QUANT_GEMV_MAX_TOKENS, QUANT_GEMV_MAX_TOKENS + 1, 70])
@pytest.mark.parametrize("with_kernel", [True, False])
@pytest.mark.parametrize("onednn_bf16", [True, False])
def test_ops_linear_and_mlp_take_packed_weights(compiled_quant, num_tokens, with_kernel, onednn_bf16, monkeypatch):
    """TorchOps.linear: up to QUANT_GEMV_MAX_TOKENS rows the packed rows' meaning (the compiled rows within the
    bound above; with no compiled kernel, the reference itself in PyTorch ops), beyond it exactly the float GEMM of
    dequantize(W) in x's dtype, or where oneDNN has no bf16 GEMM in fp32 of the activations rounded as the packed
    rows round them (the same meaning), rounded to bf16; mlp goes through linear."""
    monkeypatch.setattr(onednn, "onednn_packs_bf16", lambda: onednn_bf16)  # either CPU's routes, on any CPU
    gen = torch.Generator().manual_seed(num_tokens)
    ops = TorchOps(quant_kernel=compiled_quant if with_kernel else None)
    weight = random_weight(INT4, 96, 128, 32, gen)
    x = torch.randn((num_tokens, 128), generator=gen).bfloat16()
    got = ops.linear(x, weight)
    want = reference(x, weight, None)
    gemm = torch.bfloat16 if onednn_bf16 else torch.float32
    assert ops.gemm_dtype(torch.bfloat16) == gemm and ops.gemm_dtype(torch.float32) == torch.float32
    if num_tokens > QUANT_GEMV_MAX_TOKENS:
        taken = x.to(gemm) if gemm == torch.bfloat16 else dequantize_activation(*quantize_activation(x))
        assert torch.equal(got, F.linear(taken, dequantize(weight, gemm)).bfloat16())
    elif with_kernel:
        bound = error_bound(x, weight, None)
        want = want.double()
        assert bool(((got.double() - want).abs() <= bound + BF16_U * (want.abs() + bound)).all())
    else:
        assert torch.equal(got, want.bfloat16())
    down = random_weight(INT8, 128, 48, 48, gen)  # no whole activation blocks: the float GEMM at any row count
    h = F.silu(got[:, :48]) * got[:, 48:]
    assert torch.equal(ops.mlp(x, weight, down), ops.linear(h, down))
    assert torch.equal(ops.linear(h, down), F.linear(h.to(gemm), dequantize(down, gemm)).bfloat16())


def test_fp16_scales_of_rows_past_the_widening_buffer_are_left_to_pytorch(compiled_quant):
    """The kernel widens fp16 scales a few rows at a time into WIDE_FLOATS-float buffers: rows with more groups than
    that are not its to read (the linear then dequantises in PyTorch); fp32 scales of the same shape are."""
    assert WIDE_FLOATS == cpu_quant_kernel.WIDE_FLOATS  # the runtime's copy of the rendered constant
    k = 32 * (WIDE_FLOATS + 1)
    weight = QuantizedWeight(torch.zeros(2, k, dtype=torch.int8), torch.ones(2, k // 32, dtype=torch.float16), None,
                             QuantFormat(QuantScheme.INT8, 32))
    assert not compiled_quant.accepts(weight) and not compiled_quant.runs(weight)
    assert compiled_quant.accepts(with_scales(weight, half=False))
    narrower = QuantizedWeight(weight.codes[:, : k - 32].contiguous(), weight.scales[:, :-1].contiguous(), None,
                               weight.fmt)
    assert compiled_quant.accepts(narrower)


@pytest.mark.parametrize("portable", [True, False])
def test_fp16_scales_widen_exactly_for_every_half(quant_library, portable):
    """The kernels' fp16 -> fp32 widening of scales and mins, portable and as this CPU does it (F16C), against
    PyTorch's on all 65536 bit patterns: zeros, subnormals, infinities and NaNs included (NaNs stay NaNs of the same
    sign and payload)."""
    halves = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    got = torch.empty(1 << 16, dtype=torch.float32)
    widen = ctypes.CDLL(str(quant_library)).pllm_quant_widen_halves
    widen.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    widen.restype = None
    widen(halves.data_ptr(), got.data_ptr(), 1 << 16, int(portable))
    want = halves.view(torch.float16).float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
