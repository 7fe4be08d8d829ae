"""cpu_rms_norm (the cpu backend's compiled residual add + RMSNorm, bfloat16) vs Hugging Face's numerics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.kernels.cpu_rms_norm import supported as cpu_rms_norm_supported
from pllm.compiler.plan import make_plan
from pllm.runtime.backends.cpu.cpu_kernels import CpuRmsNorm
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

from .conftest import compile_cpu_kernel, tiny_spec
from .test_rms_norm import reference_rms_norm

# The kernel rounds where Hugging Face's bfloat16 RMSNorm rounds (the residual sum, the normed row, the product
# with the weight), so outputs are equal bit for bit except where the one difference, the order in which the
# squares are summed, moves 1/sqrt(mean + eps) by an fp32 ulp and that flips the rounding of the normed value to
# its bf16 neighbour: then the output is exactly weight * that neighbour, rounded. Such flips are rare. The
# residual sum is one rounded add in both: exactly equal. No tolerance: every output is one of these values.
SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def cpu_rms_norm(tmp_path_factory: pytest.TempPathFactory):
    """Factory: (hidden_size, eps) -> the compiled kernel, cached per shape."""
    cache: dict[tuple, CpuRmsNorm] = {}

    def make(hidden_size: int, eps: float) -> CpuRmsNorm:
        if (hidden_size, eps) not in cache:
            plan = make_plan(tiny_spec(hidden_size=hidden_size, rms_norm_eps=eps), "bfloat16", 16)
            library = compile_cpu_kernel(tmp_path_factory.mktemp("cpu_rms_norm"), plan, "cpu_rms_norm")
            cache[hidden_size, eps] = CpuRmsNorm(library, hidden_size, eps)
        return cache[hidden_size, eps]

    return make


@SETTINGS
@given(hidden_size=st.sampled_from([64, 576, 2048]), num_tokens=st.integers(1, 140), with_residual=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6]), seed=st.integers(0, 2**16))
@example(hidden_size=576, num_tokens=1, with_residual=True, eps=1e-5, seed=0)
@example(hidden_size=576, num_tokens=64, with_residual=True, eps=1e-5, seed=1)  # the first multi-threaded size
@example(hidden_size=2048, num_tokens=73, with_residual=False, eps=1e-6, seed=0)  # flips 2 ulps of out (w ~ 1.3)
def test_matches_hugging_face_numerics(cpu_rms_norm, hidden_size, num_tokens, with_residual, eps, seed):
    kernel = cpu_rms_norm(hidden_size, eps)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((num_tokens, hidden_size), generator=gen) * 3).bfloat16()  # [T, H]
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=gen)).bfloat16()  # [H]
    residual = torch.randn((num_tokens, hidden_size), generator=gen).bfloat16() if with_residual else None

    out, new_residual = kernel(x, weight, residual)
    expected, expected_residual = reference_rms_norm(x, weight, eps, residual)
    assert torch.equal(new_residual, expected_residual)
    if residual is None:
        assert new_residual is x
    assert_equal_but_for_flipped_roundings(out, expected, expected_residual, weight, eps)


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values one step above and below each of x (by magnitude, whatever the sign)."""
    bits = x.view(torch.int16)
    return (bits + 1).view(torch.bfloat16), (bits - 1).view(torch.bfloat16)


def assert_equal_but_for_flipped_roundings(out, expected, residual, weight, eps) -> None:
    r32 = residual.float()
    normed = (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).bfloat16()  # as the reference rounds it
    explained = out == expected
    for neighbour in bf16_neighbours(normed):
        explained |= out == neighbour * weight  # bf16 product, rounded once, as the kernel and HF round it
    assert explained.all(), (out[~explained], expected[~explained])
    if out.numel() >= 4096:  # one row's rs can flip several of its few elements: judge rarity on larger samples
        assert (out != expected).float().mean() < 0.01, "more than rare flips: the kernel rounds somewhere else"


def test_zero_tokens_and_special_values(cpu_rms_norm):
    kernel = cpu_rms_norm(64, 1e-5)
    out, residual = kernel(torch.empty((0, 64), dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16),
                           torch.empty((0, 64), dtype=torch.bfloat16))
    assert out.shape == (0, 64) and residual.shape == (0, 64)
    x = torch.zeros((3, 64), dtype=torch.bfloat16)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    out, _ = kernel(x, torch.ones(64, dtype=torch.bfloat16), None)
    expected, _ = reference_rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, None)
    assert torch.equal(out[0], expected[0]) and torch.all(out[0] == 0)  # an all-zero row: eps keeps it finite
    assert torch.isnan(out[1]).all() and torch.isnan(expected[1]).all()  # NaN spreads over its row, as in torch
    assert torch.equal(torch.isnan(out[2]), torch.isnan(expected[2]))


def test_torch_ops_use_it_and_check_eps(cpu_rms_norm):
    kernel = cpu_rms_norm(64, 1e-5)
    ops, plain = TorchOps(rms_norm_kernel=kernel), TorchOps()
    x, r = torch.randn((5, 64)).bfloat16(), torch.randn((5, 64)).bfloat16()
    w = torch.ones(64, dtype=torch.bfloat16)
    calls = []
    kernel_call = kernel._fn
    kernel._fn = lambda *args: calls.append(args) or kernel_call(*args)
    try:
        got, expected = ops.rms_norm(x, w, 1e-5, r), plain.rms_norm(x, w, 1e-5, r)
    finally:
        kernel._fn = kernel_call
    assert len(calls) == 1 and torch.equal(got[1], expected[1])
    assert_equal_but_for_flipped_roundings(got[0], expected[0], expected[1], w, 1e-5)
    with pytest.raises(AssertionError, match="eps"):
        ops.rms_norm(x, w, 1e-6, r)


def test_plan_carries_the_kernel_for_bfloat16_only():
    for dtype, expected in [("bfloat16", True), ("float32", False), ("float16", False)]:
        plan = make_plan(tiny_spec(), dtype, 16)
        assert cpu_rms_norm_supported(tiny_spec(), dtype) is expected
        assert ("cpu_rms_norm" in {k.name for k in plan.kernels}) is expected
    assert not cpu_rms_norm_supported(tiny_spec(hidden_size=100), "bfloat16")
