"""The step library's SiLU-and-multiply (bf16): the prompt MLP's one pass (pllm_silu_mul) and the decode step's gate_up
epilogue, each 16 elements at a time where the CPU has AVX-512 and one at a time, against torch's two ops."""

from __future__ import annotations

import pytest
import torch

from pllm.compiler.cpu_compile import find_compiler

from .cpu_step_harness import make_build_ops, run_both, spec_of

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def build_ops(tmp_path_factory: pytest.TempPathFactory):
    return make_build_ops(tmp_path_factory)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_prefill_silu_mul_is_the_two_ops_bit_for_bit(build_ops, simd):
    """The MLP's activation for prompt rows (TorchOps.mlp) through the step library's one pass, 16 elements at a time
    (where the CPU has AVX-512) and one at a time: the bits of F.silu(gate) * up in bf16, for every bf16 gate value
    (NaN and infinities included) against random ups and ups of every special kind (signed zeros, infinities, NaN,
    denormals, the largest and least normal values), rows of a width that leaves a tail past the last 16; the two
    codes agree to the bit, NaN payloads included, but where a NaN gate meets a NaN up (which payload survives is
    the multiply's operand order, the compiler's choice: a NaN either way). An fp32 library has no pass (None) and no
    16-at-a-time SiLU, so fp32 builds keep PyTorch's ops."""
    step = build_ops(spec_of("smollm2-like-1"), "bfloat16")[1].decode_step
    gen = torch.Generator().manual_seed(0)
    inter = 4099  # 65536 = 16 * 4096: every gate value once, plus 3 per row past the last whole 16
    gate = torch.arange((1 << 16) + 16 * 3, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(16, inter)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3.3895e38,
                            -3.3895e38, 1.1755e-38, -1.1755e-38, 2.0**-133], dtype=torch.float32).bfloat16()
    up = (torch.randn(gate.shape, generator=gen) * 4).bfloat16()
    up.view(-1)[::7][: 8 * special.numel()] = special.repeat(8)
    nan_gates = gate.isnan().nonzero()[:64]
    up[nan_gates[:, 0], nan_gates[:, 1]] = torch.tensor(float("nan")).bfloat16()  # NaN times NaN
    gate_up = torch.cat([gate, up], dim=-1)  # [16 rows, 2 * inter], the gate half first
    ran_simd = step.use_silu_simd(simd)
    try:
        act = step.silu_mul(gate_up)
        other = (step.use_silu_simd(not simd), step.silu_mul(gate_up))[1]
    finally:
        step.use_silu_simd(True)
    assert ran_simd == (simd and step.use_silu_simd(True))
    expected = torch.nn.functional.silu(gate) * up
    assert act is not None and act.shape == expected.shape
    same = (act.view(torch.int16) == expected.view(torch.int16)) | (act.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} elements differ"
    both_nan = gate.isnan() & up.isnan()
    assert both_nan.sum() == 64 and bool(act[both_nan].isnan().all()) and bool(other[both_nan].isnan().all())
    assert torch.equal(act.view(torch.int16)[~both_nan], other.view(torch.int16)[~both_nan])
    fp32_step = build_ops(spec_of("smollm2-like-1"), "float32")[1].decode_step
    assert fp32_step.silu_mul(gate_up.float()) is None and not fp32_step.use_silu_simd(True)


@pytest.mark.parametrize("context_lens", [[15], [3, 40, 7, 19, 0, 22, 31, 64, 5, 9, 11, 2, 8, 13, 17, 60]])
def test_the_step_gate_up_epilogue_is_the_same_16_at_a_time(build_ops, context_lens):
    """The step's SiLU-and-multiply of the gate_up sums 16 elements at a time (where the CPU has AVX-512) and one at a
    time: a whole bf16 step gives the same bits either way."""
    spec = spec_of("smollm2-like-1")
    step = build_ops(spec, "bfloat16")[1].decode_step
    if not step.use_silu_simd(True):
        pytest.skip("this CPU runs the scalar SiLU only")
    try:
        (simd, simd_caches), _ = run_both(build_ops, spec, "bfloat16", context_lens, seed=3)
        step.use_silu_simd(False)
        (scalar, scalar_caches), _ = run_both(build_ops, spec, "bfloat16", context_lens, seed=3)
    finally:
        step.use_silu_simd(True)
    assert torch.equal(simd, scalar)
    for a, b in zip(simd_caches, scalar_caches, strict=True):
        assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b, strict=True))
