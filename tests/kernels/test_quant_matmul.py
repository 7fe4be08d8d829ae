"""quant_matmul (dequantise-in-the-matmul over models/quant.py's packed weights) vs dequantize-then-matmul."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.plan import make_plan
from pllm.models.ops import ACTIVATIONS
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme, dequantize, pack_int4, unpack_int4
from pllm.runtime.backends.triton.triton_ops import TritonOps

from .conftest import tiny_spec

# The bound, per output element, against the reference dequantize(W) in fp32 then a float64 matmul on the same
# (dtype-rounded) x. With u = 2**-24 (fp32) and A = sum_k |x_k| (|q_k s| + |m|) (+ |bias|):
# - the kernel: codes are exact in x's dtype; the products x * q are exact (fp16) or rounded once (fp32); tl.dot
#   sums at most K of them in fp32, the scale (and min times the tile's fp32 sum of x) costs two more roundings,
#   and the tiles and splits are added in fp32: at most (K + 4) u A in all;
# - the reference: dequantize rounds q * s (+ m) twice, 2 u A; adding the bias in fp32, u A;
# - the output is rounded once to x's dtype: u_out |y| (u_out 2**-24 fp32, 2**-11 fp16, 2**-8 bf16).
# So |kernel - reference| <= (K + 8) u A + u_out |reference| (the slack covers u_out times the fp32 error).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SCHEMES = {"int8": QuantScheme.INT8, "int4": QuantScheme.INT4, "int4_sym": QuantScheme.INT4_SYM,
           "int6": QuantScheme.INT6}  # int6 (the --lm-head int6 head): int8's kernels over codes -32..31

SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# The build's principal format: it decides only that the plan carries quant_matmul (each launch takes its weight's)
BUILD_FORMAT = QuantFormat(QuantScheme.INT4, 32)


@pytest.fixture(scope="session")
def quant_ops(kernel_ops: Callable[..., TritonOps]) -> Callable[..., TritonOps]:
    """kernel_ops over a build keeping BUILD_FORMAT weights (quantized=False: a float build of the same model)."""

    def make(*, interpret: bool, dtype: str, quantized: bool = True) -> TritonOps:
        return kernel_ops(interpret=interpret, dtype=dtype, quant=BUILD_FORMAT if quantized else None)

    return make


def random_weight(scheme: QuantScheme, out_features: int, in_features: int, group_size: int,
                  gen: torch.Generator) -> QuantizedWeight:
    """Codes over their whole range, scales making each product entry O(1) for O(1) inputs; int4 mins near -8
    scales (GGUF Q4_0's centring) with noise, so both terms of w = q * s + m matter; int4_sym's exactly -8 scales,
    not stored."""
    groups = in_features // group_size
    spread = (torch.rand((out_features, groups), generator=gen) + 0.5) * in_features**-0.5
    fmt = QuantFormat(scheme, group_size)
    if scheme is QuantScheme.INT8:
        codes = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
        return QuantizedWeight(codes, spread / 64, None, fmt)
    if scheme is QuantScheme.INT6:
        codes = torch.randint(-32, 32, (out_features, in_features), generator=gen, dtype=torch.int8)
        return QuantizedWeight(codes, spread / 16, None, fmt)
    values = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scales = spread / 8
    mins = -8 * scales + torch.randn((out_features, groups), generator=gen) * scales
    return QuantizedWeight(pack_int4(values), scales, mins if scheme.stores_mins else None, fmt)


def magnitudes(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """A = sum_k |x_k| (|q_k s| + |m|) for each output: [T, N] float64."""
    group_size = weight.fmt.group_size
    codes = unpack_int4(weight.codes) if weight.fmt.scheme.nibbles else weight.codes
    terms = (codes.double() * weight.scales.double().repeat_interleave(group_size, dim=1)).abs()
    mins = weight.group_mins()
    if mins is not None:
        terms = terms + mins.double().abs().repeat_interleave(group_size, dim=1)
    return x.double().abs() @ terms.T


def check_linear(ops: TritonOps, *, device: str, dtype: str, scheme: QuantScheme, group_size: int, num_tokens: int,
                 out_features: int, in_features: int, bias: bool, seed: int, half_scales: bool = False) -> None:
    """half_scales: the weight's scales and mins stored in fp16 (GGUF's Q8_0/Q4_0/Q4_1 blocks keep theirs so)."""
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    weight = random_weight(scheme, out_features, in_features, group_size, gen)
    if half_scales:  # the rounded values are the weight's meaning from here on
        weight = QuantizedWeight(weight.codes, weight.scales.half(), None if weight.mins is None
                                 else weight.mins.half(), weight.fmt)
    x = torch.randn((num_tokens, in_features), generator=gen).to(torch_dtype)  # [T, K]
    b = torch.randn((out_features,), generator=gen).to(torch_dtype) if bias else None
    on_device = QuantizedWeight(weight.codes.to(device), weight.scales.to(device),
                                None if weight.mins is None else weight.mins.to(device), weight.fmt)

    out = ops.linear(x.to(device), on_device, None if b is None else b.to(device))
    assert out.shape == (num_tokens, out_features) and out.dtype == torch_dtype

    assert_within_bound(out.cpu(), x, weight, b, dtype, f"{scheme.value} g{group_size} T={num_tokens} "
                        f"N={out_features} K={in_features} {dtype}")


def assert_within_bound(out: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight, b: torch.Tensor | None,
                        dtype: str, label: str) -> None:
    """out [T, N] against x @ dequantize(weight)^T (+ b) in float64, element by element, within the bound above."""
    expected = x.double() @ dequantize(weight).double().T  # the reference meaning, rounded in fp32 as defined
    magnitude = magnitudes(x, weight)  # A: [T, N]
    if b is not None:
        expected = expected + b.double()
        magnitude = magnitude + b.double().abs()
    in_features = x.shape[-1]
    bound = (in_features + 8) * UNIT_ROUNDOFF["float32"] * magnitude + UNIT_ROUNDOFF[dtype] * expected.abs()
    error = (out.double() - expected).abs()
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (
        f"{label}: error {error.flatten()[worst]:.3g} above its bound {bound.flatten()[worst]:.3g}")


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    scheme=st.sampled_from(list(SCHEMES.values())),
    group_size=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 4),
    # 1 and 3: decode-sized (split K when the weight is deep enough); 64 and 70: prefill tiles, one masked
    num_tokens=st.sampled_from([1, 3, 64, 70]),
    out_features=st.sampled_from([8, 40, 100]),
    bias=st.booleans(),
    half_scales=st.booleans(),
    seed=st.integers(0, 2**16),
)
# one decode step whose K splits (512 / 32 = 16 K tiles: 4 splits), and one per scheme at the largest group
@example(dtype="float16", scheme=QuantScheme.INT4, group_size=32, groups=16, num_tokens=1, out_features=40,
         bias=True, half_scales=True, seed=0)
@example(dtype="float32", scheme=QuantScheme.INT8, group_size=32, groups=16, num_tokens=3, out_features=100,
         bias=False, half_scales=False, seed=1)
@example(dtype="float32", scheme=QuantScheme.INT4, group_size=128, groups=4, num_tokens=70, out_features=100,
         bias=True, half_scales=False, seed=2)
@example(dtype="float32", scheme=QuantScheme.INT8, group_size=32, groups=2, num_tokens=64, out_features=40,
         bias=False, half_scales=True, seed=3)
@example(dtype="float16", scheme=QuantScheme.INT4_SYM, group_size=32, groups=16, num_tokens=1, out_features=40,
         bias=False, half_scales=True, seed=4)
@example(dtype="float16", scheme=QuantScheme.INT6, group_size=32, groups=16, num_tokens=1, out_features=40,
         bias=False, half_scales=True, seed=7)
@example(dtype="float32", scheme=QuantScheme.INT4_SYM, group_size=64, groups=2, num_tokens=70, out_features=100,
         bias=True, half_scales=False, seed=5)
def test_quant_matmul_interpret(quant_ops, dtype, scheme, group_size, groups, num_tokens, out_features, bias,
                                half_scales, seed):
    ops = quant_ops(interpret=True, dtype=dtype)
    check_linear(ops, device="cpu", dtype=dtype, scheme=scheme, group_size=group_size, num_tokens=num_tokens,
                 out_features=out_features, in_features=groups * group_size, bias=bias, seed=seed,
                 half_scales=half_scales)


def test_a_format_8_builds_kernel_is_called_as_it_was_rendered(quant_ops):
    """A build compiled before INT4_SYM (format 8) carries a quant_matmul that takes no `sym` argument: its int8 and
    int4 weights must reach it with the arguments it was rendered for."""
    ops = quant_ops(interpret=True, dtype="float32")
    calls = []

    def old_quant_matmul(x, codes, scales, mins, group_size, int4, bias=None):  # the format-8 signature
        calls.append(int4)
        return torch.zeros((x.shape[0], codes.shape[0]), dtype=x.dtype)

    kernels = dict(ops.kernels)
    ops.kernels = {**kernels, "quant_matmul": types.SimpleNamespace(quant_matmul=old_quant_matmul)}
    try:
        gen = torch.Generator().manual_seed(0)
        for scheme in (QuantScheme.INT8, QuantScheme.INT4):
            ops.linear(torch.randn((2, 64), generator=gen), random_weight(scheme, 8, 64, 32, gen))
    finally:
        ops.kernels = kernels
    assert calls == [False, True]


def test_decode_steps_split_k_and_prefill_steps_do_not(quant_ops):
    """The explicit examples above reach the split path: the launch's own arithmetic says so."""
    kernel = quant_ops(interpret=True, dtype="float16").kernels["quant_matmul"]
    assert kernel.block_k(32) == kernel.block_k(128) == 32 and kernel.block_k(48) == 16
    assert kernel.split_count(1, 40, 512, 32) == 4
    assert kernel.split_count(3, 100, 512, 32) == 4
    assert kernel.split_count(70, 100, 512, 32) == 1  # prefill: one tile row per 64 tokens, no split
    assert kernel.split_count(1, 40, 64, 32) == 1  # too shallow to split: fewer than MIN_K_TILES_PER_SPLIT per split


@pytest.mark.parametrize("num_tokens", [1, 70])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_mlp_with_packed_weights(quant_ops, num_tokens, activation):
    """Ops.mlp over packed gate_up and down (and a float down beside a packed gate_up) equals the float MLP of
    the dequantised weights, computed as the cpu backend does, in fp64: each matmul is within the bound above
    (~1e-6 here), the activation's Lipschitz constant is about 1.1, so 1e-4 holds with room."""
    hidden, intermediate = 64, 96
    ops = quant_ops(interpret=True, dtype="float32")
    gen = torch.Generator().manual_seed(num_tokens)
    gate_up = random_weight(QuantScheme.INT4, 2 * intermediate, hidden, 32, gen)
    down = random_weight(QuantScheme.INT4, hidden, intermediate, 32, gen)
    x = torch.randn((num_tokens, hidden), generator=gen)
    g, u = (x.double() @ dequantize(gate_up).double().T).chunk(2, dim=-1)
    h = ACTIVATIONS[activation](g) * u
    expected = h @ dequantize(down).double().T
    torch.testing.assert_close(ops.mlp(x, gate_up, down, activation).double(), expected, atol=1e-4, rtol=1e-4)
    mixed = ops.mlp(x, gate_up, dequantize(down), activation)
    torch.testing.assert_close(mixed.double(), expected, atol=1e-4, rtol=1e-4)


def test_one_build_serves_both_schemes_and_any_group_of_16s(quant_ops):
    """A GGUF build may keep Q8_0 and Q4_x matrices side by side: one rendered file launches either scheme and any
    group size the K tiles divide (the launch's constexprs), keeps x's leading dims, and names what it refuses."""
    ops = quant_ops(interpret=True, dtype="float32")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 96), generator=gen)
    for scheme, group_size in ((QuantScheme.INT8, 96), (QuantScheme.INT4, 48), (QuantScheme.INT8, 16),
                              (QuantScheme.INT4_SYM, 48)):
        weight = random_weight(scheme, 24, 96, group_size, gen)
        out = ops.linear(x, weight)
        assert out.shape == (2, 3, 24)
        assert_within_bound(out.reshape(6, 24), x.reshape(6, 96), weight, None, "float32",
                            f"{scheme.value} g{group_size}")
    with pytest.raises(ValueError, match="group size 8: the Triton quant kernel needs a multiple of 16"):
        ops.linear(x, random_weight(QuantScheme.INT4, 24, 96, 8, gen))  # a K tile of 16 would span two groups
    float_build = quant_ops(interpret=True, dtype="float32", quantized=False)
    with pytest.raises(RuntimeError, match="no quant_matmul kernel"):
        float_build.linear(x, random_weight(QuantScheme.INT8, 24, 96, 32, gen))


def test_only_a_quantised_plan_carries_the_kernel():
    spec = tiny_spec()
    assert "quant_matmul" not in [k.name for k in make_plan(spec, "bfloat16", 16).kernels]
    kernel = make_plan(spec, "bfloat16", 16, QuantFormat(QuantScheme.INT4, 32)).kernel("quant_matmul")
    assert kernel.constants["TL_DTYPE"] == "bf16" and kernel.constants["DOT_PRECISION"] == "tf32"
    assert kernel.constants["BLOCK_K_WIDE"] == 32 and kernel.constants["BLOCK_K_NARROW"] == 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])  # fp32 (ieee dots) is the interpreted test's dtype
@pytest.mark.parametrize("scheme", list(SCHEMES.values()))
@SETTINGS
@given(
    group_size=st.sampled_from([32, 64, 128]),
    num_tokens=st.sampled_from([1, 8, 17, 256]),
    shape=st.sampled_from([(576, 576), (1536, 576), (576, 1536), (4096, 4096)]),
    bias=st.booleans(),
    half_scales=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quant_matmul_cuda(quant_ops, cuda_device, dtype, scheme, group_size, num_tokens, shape, bias, half_scales,
                           seed):
    ops = quant_ops(interpret=False, dtype=dtype)
    check_linear(ops, device=cuda_device, dtype=dtype, scheme=scheme, group_size=group_size, num_tokens=num_tokens,
                 out_features=shape[0], in_features=shape[1], bias=bias, seed=seed, half_scales=half_scales)
