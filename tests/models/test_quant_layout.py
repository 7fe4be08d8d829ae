"""The packed quantised layout: nibble order, shape checks, and dequantize's meaning."""

import pytest
import torch

from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme, dequantize, pack_int4, unpack_int4


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
    lambda: QuantFormat(QuantScheme.INT4, 3),
])
def test_malformed_weights_are_refused(make):
    with pytest.raises(ValueError):
        make()
