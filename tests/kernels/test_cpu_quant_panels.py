"""Packed weights repacked into panels of 16 rows (templates/cpu_quant_panels.cpp.inc), which cpu_quant_linear's
AVX512-VNNI code reads in place of the rows: which weights are repacked, what the repacked copy holds, and that a
row's output does not depend on the batch it is computed in. That the panels compute the packed linear's meaning is
test_cpu_quant_linear.py's business: its examples include weights in whole panels, checked against the reference
within its bound and, with exact arithmetic, bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from proc_smaps import thp_offered, vm_flags

from pllm.compiler.cpu_compile import find_compiler
from pllm.models.quant import QuantScheme, dequantize
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear, QuantRows

from .test_cpu_quant_linear import SETTINGS, random_weight, with_scales

INT8, INT4, INT4_SYM = QuantScheme.INT8, QuantScheme.INT4, QuantScheme.INT4_SYM

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def vnni(compiled_quant: CpuQuantLinear) -> bool:
    """Whether this CPU runs the AVX512-VNNI rows, the only code that reads panels."""
    return compiled_quant.limit_isa(QuantRows.INT_VNNI) is QuantRows.INT_VNNI


def unpanel(panels: torch.Tensor, weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The repacked buffer read back into the rows' layout: (codes as uint8, scales and mins as bytes [n, -1])."""
    n, k = weight.shape
    group, row_bytes = weight.fmt.group_size, weight.codes.shape[1]
    vecs, side_bytes = row_bytes // (k // 32) // 4, weight.scales.element_size()
    codes = panels[: n * row_bytes].view(n // 16, k // 32, vecs, 16, 4).permute(0, 3, 1, 2, 4).reshape(n, row_bytes)
    side = n * (k // group) * side_bytes

    def rows(part: torch.Tensor) -> torch.Tensor:
        return part.view(n // 16, k // group, 16, side_bytes).permute(0, 2, 1, 3).reshape(n, -1)

    scales = rows(panels[n * row_bytes : n * row_bytes + side])
    mins = rows(panels[n * row_bytes + side : n * row_bytes + 2 * side]) if weight.mins is not None else None
    return codes, scales, mins


@pytest.mark.parametrize(("scheme", "group"), [(INT4, 32), (INT4, 128), (INT4_SYM, 32), (INT4_SYM, 128), (INT8, 32),
                                               (INT8, 256)])
@pytest.mark.parametrize("half", [True, False])
def test_rows_in_whole_panels_are_repacked_as_the_layout_says(compiled_quant, vnni, scheme, half, group):
    """INT4 codes as they are, INT8 codes plus 128 (their top bit flipped), each row's 4 bytes at a time in its
    lane; scales and mins as stored, 16 rows a group; all of it in the weight's own size. (INT8 at group 256 is per
    channel: one group a row.)"""
    gen = torch.Generator().manual_seed(group + half)
    weight = with_scales(random_weight(scheme, 48, 256, group, gen), half)
    panels = compiled_quant.panels(weight)
    if not vnni:
        assert panels is None
        return
    codes, scales, mins = unpanel(panels, weight)
    flip = 0 if scheme.nibbles else 0x80
    assert torch.equal(codes ^ flip, weight.codes.view(torch.uint8))
    assert torch.equal(scales, weight.scales.contiguous().view(torch.uint8).view(48, -1))
    assert (mins is None) == (weight.mins is None)
    if mins is not None:
        assert torch.equal(mins, weight.mins.contiguous().view(torch.uint8).view(48, -1))
    sides = 1 if weight.mins is None else 2
    assert panels.numel() == weight.codes.numel() + sides * weight.scales.numel() * weight.scales.element_size()
    assert compiled_quant.panels(weight) is panels  # made once, kept with the weight
    if thp_offered():  # in memory that asked for 2 MiB pages, as every weight's panels (huge_page_memory.PageArena)
        assert "hg" in vm_flags(panels.data_ptr())


@pytest.mark.parametrize(("scheme", "n", "k", "group", "why"), [
    (INT4, 40, 128, 32, "rows not in whole panels"),
    (INT8, 40, 128, 128, "rows not in whole panels"),
    (INT4, 48, 96, 32, "width not in whole 64-element chunks"),
    (INT8, 48, 96, 32, "width not in whole 64-element chunks"),
])
def test_other_weights_are_read_as_rows(compiled_quant, scheme, n, k, group, why):
    weight = random_weight(scheme, n, k, group, torch.Generator().manual_seed(n))
    assert compiled_quant.runs(weight) and compiled_quant.panels(weight) is None, why


@SETTINGS
@given(scheme=st.sampled_from(list(QuantScheme)), panels=st.integers(1, 5), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 128]), num_tokens=st.integers(2, 11), bf16=st.booleans(), half=st.booleans(),
       seed=st.integers(0, 2**16))
@example(scheme=INT4, panels=3, groups=9, group=64, num_tokens=9, bf16=True, half=True, seed=0)  # tiles 4, 4, 1
@example(scheme=INT8, panels=3, groups=2, group=64, num_tokens=6, bf16=True, half=False, seed=1)  # per channel
def test_a_row_sums_alike_in_every_batch(compiled_quant, scheme, panels, groups, group, num_tokens, bf16, half, seed):
    """Each token's outputs, computed in a batch (one panel at a time, tokens in tiles of up to 4), equal that token's
    alone (two panels a tile) bit for bit: the engine's outputs must not depend on what else is in the step. Run
    on the CPU's best row code (the panels where it has AVX512-VNNI)."""
    gen = torch.Generator().manual_seed(seed)
    k = groups * group
    # INT8 per channel (one group a row) for odd seeds, in groups for even ones
    weight = with_scales(random_weight(scheme, 16 * panels, k, group if scheme.nibbles or seed % 2 == 0 else k, gen),
                         half)
    x = torch.randn((num_tokens, k), generator=gen)
    x = x.bfloat16() if bf16 else x
    bias = torch.randn(16 * panels, generator=gen)
    batch = compiled_quant.gemv(x, weight, bias)
    for t in range(num_tokens):
        assert torch.equal(compiled_quant.gemv(x[t : t + 1].contiguous(), weight, bias)[0], batch[t]), t


@SETTINGS
@given(scheme=st.sampled_from(list(QuantScheme)), panels=st.integers(1, 5), groups=st.integers(1, 6),
       group=st.sampled_from([32, 64, 128]), bf16=st.booleans(), half=st.booleans(), seed=st.integers(0, 2**16))
@example(scheme=INT4, panels=3, groups=350, group=32, bf16=True, half=True, seed=1)  # fp16 widened 2 rows at a time
@example(scheme=INT8, panels=2, groups=3, group=64, bf16=False, half=False, seed=3)  # per channel
def test_the_dequantiser_reads_the_panels_and_not_the_rows(compiled_quant, vnni, scheme, panels, groups, group, bf16,
                                                           half, seed):
    """Where a weight has panels, the dequantiser (the prefill GEMM's weights) reads them, not the rows, so the rows
    can go cold once they are made: its output equals models.quant.dequantize of the weight bit for bit, and stays
    so with the rows' codes, scales and mins then overwritten. (INT8 per channel for odd seeds.)"""
    gen = torch.Generator().manual_seed(seed)
    k = groups * 128
    group = group if scheme.nibbles or seed % 2 == 0 else k
    weight = with_scales(random_weight(scheme, 16 * panels, k, group, gen), half)
    dtype = torch.bfloat16 if bf16 else torch.float32
    want = dequantize(weight, dtype)
    if compiled_quant.panels(weight) is None:
        assert not vnni
        return
    for part in (weight.codes, weight.scales, weight.mins):
        if part is not None:
            part.view(torch.uint8).fill_(0x5A)  # what the rows hold no longer matters
    assert torch.equal(compiled_quant.dequantize(weight, dtype), want)
