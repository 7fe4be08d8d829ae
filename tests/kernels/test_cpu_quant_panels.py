"""INT4 weights repacked into panels of 16 rows (templates/cpu_quant_panels.cpp.inc), which cpu_quant_linear's
AVX512-VNNI code reads in place of the rows: which weights are repacked, what the repacked copy holds, and that a
row's output does not depend on the batch it is computed in. That the panels compute the packed linear's meaning is
test_cpu_quant_linear.py's business: its examples include weights in whole panels, checked against the reference
within its bound and, with exact arithmetic, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from pllm.compiler.cpu_compile import find_compiler
from pllm.models.quant import QuantScheme, unpack_int4
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear, QuantRows

from .test_cpu_quant_linear import SETTINGS, random_weight, with_scales

INT8, INT4, INT4_SYM = QuantScheme.INT8, QuantScheme.INT4, QuantScheme.INT4_SYM

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def vnni(compiled_quant: CpuQuantLinear) -> bool:
    """Whether this CPU runs the AVX512-VNNI rows, the only code that reads panels."""
    return compiled_quant.limit_isa(QuantRows.INT_VNNI) is QuantRows.INT_VNNI


def unpanel(panels: torch.Tensor, n: int, k: int, group: int, side_bytes: int, mins: bool):
    """The repacked buffer read back into the rows' layout: (codes [n, k / 2], scales bytes, mins bytes or None)."""
    blocks = k // 32
    codes = panels[: n * k // 2].view(n // 16, blocks, 4, 16, 4).permute(0, 3, 1, 2, 4).reshape(n, k // 2)
    side = n * (k // group) * side_bytes
    def rows(part: torch.Tensor) -> torch.Tensor:
        return part.view(n // 16, k // group, 16, side_bytes).permute(0, 2, 1, 3).reshape(n, -1)
    scales = rows(panels[n * k // 2 : n * k // 2 + side])
    return codes, scales, rows(panels[n * k // 2 + side : n * k // 2 + 2 * side]) if mins else None


@pytest.mark.parametrize("scheme", [INT4, INT4_SYM])
@pytest.mark.parametrize("half", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_rows_in_whole_panels_are_repacked_as_the_layout_says(compiled_quant, vnni, scheme, half, group):
    gen = torch.Generator().manual_seed(group + half)
    weight = with_scales(random_weight(scheme, 48, 256, group, gen), half)
    panels = compiled_quant.panels(weight)
    if not vnni:
        assert panels is None
        return
    side_bytes = 2 if half else 4
    codes, scales, mins = unpanel(panels, 48, 256, group, side_bytes, scheme.stores_mins)
    assert torch.equal(codes, weight.codes)
    assert torch.equal(unpack_int4(codes), unpack_int4(weight.codes))
    assert torch.equal(scales, weight.scales.contiguous().view(torch.uint8).view(48, -1))
    if scheme.stores_mins:
        assert torch.equal(mins, weight.mins.contiguous().view(torch.uint8).view(48, -1))
    sides = 2 if scheme.stores_mins else 1
    assert panels.numel() == weight.codes.numel() + sides * weight.scales.numel() * side_bytes
    assert compiled_quant.panels(weight) is panels  # made once, kept with the weight


@pytest.mark.parametrize(("scheme", "n", "k", "group", "why"), [
    (INT4, 40, 128, 32, "rows not in whole panels"),
    (INT4, 48, 96, 32, "width not in whole 64-element chunks"),
    (INT8, 48, 128, 32, "8-bit codes"),
    (INT8, 48, 128, 128, "8-bit codes per channel"),
])
def test_other_weights_are_read_as_rows(compiled_quant, scheme, n, k, group, why):
    weight = random_weight(scheme, n, k, group, torch.Generator().manual_seed(n))
    assert compiled_quant.runs(weight) and compiled_quant.panels(weight) is None, why


@SETTINGS
@given(scheme=st.sampled_from([INT4, INT4_SYM]), panels=st.integers(1, 5), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 128]), num_tokens=st.integers(2, 11), bf16=st.booleans(), half=st.booleans(),
       seed=st.integers(0, 2**16))
@example(scheme=INT4, panels=3, groups=9, group=64, num_tokens=9, bf16=True, half=True, seed=0)  # tiles 4, 4, 1
def test_a_row_sums_alike_in_every_batch(compiled_quant, scheme, panels, groups, group, num_tokens, bf16, half, seed):
    """Each token's outputs, computed in a batch (one panel at a time, tokens in tiles of up to 4), equal that token's
    alone (two panels a tile) bit for bit: the engine's outputs must not depend on what else is in the step. Run
    on the CPU's best row code (the panels where it has AVX512-VNNI)."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    weight = with_scales(random_weight(scheme, 16 * panels, k, group, gen), half)
    x = torch.randn((num_tokens, k), generator=gen)
    x = x.bfloat16() if bf16 else x
    bias = torch.randn(16 * panels, generator=gen)
    batch = compiled_quant.gemv(x, weight, bias)
    for t in range(num_tokens):
        assert torch.equal(compiled_quant.gemv(x[t : t + 1].contiguous(), weight, bias)[0], batch[t]), t
