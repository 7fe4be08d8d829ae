"""The packed quantised layout: nibble order, shape checks, and dequantize's meaning."""

import pytest
import torch

from pllm.models.quant import (
    ACTIVATION_BLOCK,
    QuantFormat,
    QuantizedWeight,
    QuantScheme,
    as_asymmetric,
    dequantize,
    dequantize_activation,
    pack_int4,
    quantize_activation,
    unpack_int4,
)


def test_int4_nibbles_round_trip_with_even_elements_low():
    values = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (3, 4)
    assert int(packed[0, 0]) == int(values[0, 0]) | (int(values[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), values)


def test_dequantize_int4_is_code_times_scale_plus_min_per_group():
    values = torch.randint(0, 16, (2, 8), dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    mins = torch.tensor([[-4.0, 1.0], [0.0, 3.0]])
    w = QuantizedWeight(pack_int4(values), scales, mins, QuantFormat(QuantScheme.INT4, 4))
    expected = values.float() * scales.repeat_interleave(4, 1) + mins.repeat_interleave(4, 1)
    assert torch.equal(dequantize(w), expected)
    assert w.shape == (2, 8)


def test_dequantize_int4_sym_is_code_minus_8_times_scale_and_equals_its_asymmetric_form():
    """INT4_SYM (GGUF's Q4_0): w = (code - 8) * scale with no mins stored; as_asymmetric stores -8 * scale as the
    mins (fp16 where the scales are) and means the same values."""
    values = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0], [1.0, -1.5], [6e4, 3e-5]], dtype=torch.float16)  # -8 * 6e4 overflows fp16
    w = QuantizedWeight(pack_int4(values), scales, None, QuantFormat(QuantScheme.INT4_SYM, 4))
    expected = (values.float() - 8) * scales.float().repeat_interleave(4, 1)
    assert torch.equal(dequantize(w), expected) and w.shape == (3, 8)
    wide = as_asymmetric(w)
    assert wide.fmt == QuantFormat(QuantScheme.INT4, 4) and torch.equal(dequantize(wide), expected)
    assert wide.mins.dtype == torch.float32  # -8 * 6e4 is no fp16: both kept in fp32
    narrow = as_asymmetric(QuantizedWeight(w.codes[:2], scales[:2].contiguous(), None, w.fmt))
    assert narrow.mins.dtype == torch.float16 and torch.equal(narrow.mins.float(), -8 * scales[:2].float())


def test_dequantize_int8_is_code_times_scale():
    codes = torch.randint(-127, 128, (3, 6), dtype=torch.int8)
    scales = torch.rand(3, 1)
    w = QuantizedWeight(codes, scales, None, QuantFormat(QuantScheme.INT8, 6))
    assert torch.equal(dequantize(w), codes.float() * scales)


@pytest.mark.parametrize("make", [
    lambda: QuantizedWeight(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(2, 1), None,
                            QuantFormat(QuantScheme.INT8, 4)),  # wrong code dtype
    lambda: QuantizedWeight(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(2, 2), None,
                            QuantFormat(QuantScheme.INT8, 4)),  # scales for the wrong group count
    lambda: QuantizedWeight(torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, 1), None,
                            QuantFormat(QuantScheme.INT4, 4)),  # int4 without mins
    lambda: QuantizedWeight(torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, 1), torch.zeros(2, 1),
                            QuantFormat(QuantScheme.INT4_SYM, 4)),  # symmetric int4 with mins
    lambda: QuantFormat(QuantScheme.INT4_SYM, 5),
    lambda: QuantFormat(QuantScheme.INT4, 3),
])
def test_malformed_weights_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_activation_quantiser_rounds_each_block_to_its_own_scale():
    """quantize_activation: per block of 32, d = max|x| / 127 and each element within d / 2 of code * d (plus fp32
    rounding); an all-zero block keeps scale 0 and codes 0; a width that is not whole blocks is refused."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, 4 * ACTIVATION_BLOCK), generator=gen) * torch.tensor([1e-3, 1.0, 1e3, 0.0]).repeat_interleave(
        ACTIVATION_BLOCK)
    codes, scales = quantize_activation(x)
    assert codes.dtype == torch.int8 and scales.shape == (3, 4)
    blocks = x.view(3, 4, ACTIVATION_BLOCK)
    assert torch.equal(scales, blocks.abs().amax(-1) / 127)
    assert int(codes.abs().max()) == 127 and bool((codes.view(3, 4, -1)[:, 3] == 0).all())
    err = (dequantize_activation(codes, scales) - x).view(3, 4, -1).abs()
    assert bool((err <= scales[..., None] * (0.5 + 1e-5)).all())
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quantize_activation(torch.zeros(2, 48))
