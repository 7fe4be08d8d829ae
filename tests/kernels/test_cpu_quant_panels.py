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
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme, dequantize
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear, PanelPrefetch, QuantRows

from .test_cpu_quant_linear import SETTINGS, random_weight, with_scales

INT8, INT4, INT4_SYM, INT6 = QuantScheme.INT8, QuantScheme.INT4, QuantScheme.INT4_SYM, QuantScheme.INT6

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


@pytest.mark.parametrize("scheme", list(QuantScheme))
@pytest.mark.parametrize("num_tokens", [1, 6])
def test_the_panels_sum_alike_with_and_without_software_prefetch(compiled_quant, vnni, scheme, num_tokens):
    """Requesting codes ahead is the CPU maker's choice (AMD: as read); it may change the speed, never a bit of the
    sums: each choice's outputs equal the other's, at one token (two panels a tile) and in a batch."""
    gen = torch.Generator().manual_seed(7)
    weight = with_scales(random_weight(scheme, 48, 256, 32 if scheme.nibbles else 64, gen), True)
    x = torch.randn((num_tokens, 256), generator=gen).bfloat16()
    try:
        assert compiled_quant.set_panel_prefetch(PanelPrefetch.AHEAD)
        ahead = compiled_quant.gemv(x, weight, None)
        assert not compiled_quant.set_panel_prefetch(PanelPrefetch.AS_READ)
        as_read = compiled_quant.gemv(x, weight, None)
    finally:
        compiled_quant.set_panel_prefetch(PanelPrefetch.BY_CPU)
    assert torch.equal(ahead, as_read)
    assert compiled_quant.panels(weight) is not None or not vnni


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


def six_bit_codes(panels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """INT6 panels' codes read back into the rows' layout (int8 [n, k]), as cpu_quant_panels.cpp.inc lays them out:
    per panel and block, 4 vectors of low nibbles (element 4j + i low, 16 + 4j + i high, in byte i of vector j) and 2
    of 2-bit pieces (element 4p + i, and 16 + 4p + i, at bits 2p of byte i), each row 4 bytes of a vector."""
    v = panels[: n * k * 3 // 4].view(n // 16, k // 32, 6, 16, 4).permute(0, 3, 1, 2, 4).long()  # [P, 16, B, 6, 4]
    lo_first, lo_second = v[..., :4, :] & 15, v[..., :4, :] >> 4  # [P, 16, B, j, i]
    p = torch.arange(4).view(4, 1)
    hi_first, hi_second = (v[..., 4:5, :] >> (2 * p)) & 3, (v[..., 5:6, :] >> (2 * p)) & 3  # [P, 16, B, p, i]
    first, second = lo_first + 16 * hi_first, lo_second + 16 * hi_second  # elements 4j + i and 16 + 4j + i
    return (torch.cat((first, second), dim=-2).reshape(n, k) - 32).to(torch.int8)


@pytest.mark.parametrize("half", [True, False])
def test_int6_panels_keep_six_bits_a_code(compiled_quant, vnni, half):
    """An INT6 weight's panels hold its codes in three quarters of the rows' bytes, as the layout says, and its scales
    as stored: what the step streams is 6 bits a code, not the rows' 8."""
    gen = torch.Generator().manual_seed(6 + half)
    weight = with_scales(random_weight(INT6, 48, 256, 32, gen), half)
    assert int(weight.codes.min()) >= -32 and int(weight.codes.max()) <= 31
    panels = compiled_quant.panels(weight)
    if not vnni:
        assert panels is None
        return
    n, k = weight.shape
    assert panels.numel() == n * k * 3 // 4 + weight.scales.numel() * weight.scales.element_size()
    assert torch.equal(six_bit_codes(panels, n, k), weight.codes)
    scales = panels[n * k * 3 // 4 :].view(n // 16, k // 32, 16, -1).permute(0, 2, 1, 3).reshape(n, -1)
    assert torch.equal(scales, weight.scales.contiguous().view(torch.uint8).view(n, -1))


@pytest.mark.parametrize("num_tokens", [1, 3, 9])
@pytest.mark.parametrize(("half", "per_channel"), [(True, False), (False, False), (False, True)])
def test_int6_computes_what_int8_computes_on_its_codes(compiled_quant, num_tokens, half, per_channel):
    """INT6 is INT8 whose codes fit 6 bits: over the same codes and scales, its GEMV (panels at 6 bits where the CPU
    has AVX512-VNNI, else the INT8 rows) and its dequantiser equal INT8's bit for bit, extreme codes -32 and 31
    included; the 6-bit sums are exact integers, so no order of theirs may show."""
    gen = torch.Generator().manual_seed(num_tokens + 2 * half + 4 * per_channel)
    n, k = 64, 384
    group = k if per_channel else 32
    codes = torch.randint(-32, 32, (n, k), generator=gen, dtype=torch.int8)
    codes[0, :32], codes[1, :32] = -32, 31
    scales = torch.rand((n, k // group), generator=gen) * 0.01 + 0.001
    six = with_scales(QuantizedWeight(codes, scales, None, QuantFormat(INT6, group)), half)
    eight = with_scales(QuantizedWeight(codes.clone(), scales.clone(), None, QuantFormat(INT8, group)), half)
    x = torch.randn((num_tokens, k), generator=gen).bfloat16()
    assert torch.equal(compiled_quant.gemv(x, six, None), compiled_quant.gemv(x, eight, None))
    assert torch.equal(compiled_quant.dequantize(six, torch.float32), dequantize(eight))


def test_int6_codes_past_six_bits_are_refused(compiled_quant, vnni):
    """A code outside -32..31 (a damaged build: the compiler makes -31..31) would wrap in 6 bits; the panels are not
    made and the error says so."""
    if not vnni:
        pytest.skip("panels are made only where the CPU has AVX512-VNNI")
    codes = torch.zeros((16, 64), dtype=torch.int8)
    codes[3, 5] = 40
    weight = QuantizedWeight(codes, torch.ones((16, 2)), None, QuantFormat(INT6, 32))
    with pytest.raises(ValueError, match="outside -32..31"):
        compiled_quant.gemv(torch.randn((1, 64)), weight, None)
