"""Quantised linear weights: the packed layout every backend reads, and the dequantiser that defines its meaning.

One layout serves pllm's own quantisation (`pllm-compile --quantization int8|int4|int4_sym`) and GGUF blocks kept
as they are: Q8_0 is INT8 with groups of 32; Q4_1 (w = d * q + m) and Q4_K (per 32-element sub-block: w = d * sc *
q - dmin * m) are INT4 groups of 32 whose scale and min are those products, exact in float32; Q4_0 (w = d * (q - 8))
is INT4_SYM, INT4 whose min is -8 times its scale and not stored (the file's 4.5 bits a weight). INT6 is INT8 whose
codes lie in -32..31 (`--lm-head int6`: the LM head at llama.cpp's Q6_K share of bits); stored a byte a code, so every
reader of INT8 reads it as it is, and the cpu backend's panels keep it at 6 bits. Scales and mins
are float16 where every one of a weight's values is a float16 (GGUF's Q8_0, Q4_0 and Q4_1 store theirs so; pllm's
own grouped quantisation rounds them so), which keeps a Q4_1 block's 5 bits a weight rather than 6, else float32. A
kernel reading this layout is correct when it equals `dequantize` followed by a float matmul, of the activations
as given or, where the kernel multiplies integers (the cpu backend's packed rows, as llama.cpp does),
of the activations rounded by `quantize_activation`: `dequantize(W) @ dequantize_activation(*quantize_activation(x))`
(the cpu backend's fp32 GEMM over the dequantised weight, for steps longer than its packed rows take, rounds them
too, so in fp32 every step size computes the one meaning there).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class QuantScheme(enum.Enum):
    INT8 = "int8"  # codes int8 [out, in]; w = code * scale (symmetric)
    INT4 = "int4"  # codes uint8 [out, in // 2], two per byte; w = code * scale + min (code 0..15)
    INT4_SYM = "int4_sym"  # INT4's codes and formula with min = -8 * scale, not stored: w = (code - 8) * scale
    INT6 = "int6"  # INT8's codes and formula, each code in -INT6_LIMIT - 1 .. INT6_LIMIT (6 bits; stored a byte each)

    @property
    def nibbles(self) -> bool:
        """Two 4-bit codes a byte (element 2j in byte j's low nibble, 2j + 1 in its high one)."""
        return self in (QuantScheme.INT4, QuantScheme.INT4_SYM)

    @property
    def stores_mins(self) -> bool:
        return self is QuantScheme.INT4


# INT6's largest code (its least is -32): the panels the cpu backend streams hold code + 32, in 0..63
INT6_LIMIT = 31

# INT4_SYM's min, as a multiple of its scale: a power of two, so the product is exact in float32 (every kernel
# takes it there, after widening fp16 scales), and INT4_SYM means exactly INT4 with those mins
SYM_MIN_PER_SCALE = -8.0


@dataclass(frozen=True)
class QuantFormat:
    scheme: QuantScheme
    group_size: int  # consecutive input elements sharing one scale (and min); in_features: one per output channel

    def __post_init__(self) -> None:
        if self.group_size <= 0 or (self.scheme.nibbles and self.group_size % 2):
            raise ValueError(f"{self.scheme.value}: group size {self.group_size} must be positive (and even for "
                             "4-bit codes)")


# The dtypes a packed weight's scales (and mins) come in: float32, or float16 where every value is one (half the
# bytes: a group of 32 INT4 codes with its scale and min reads 20 bytes, not 24)
SCALE_DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear layer's weight [out, in], packed. INT4: input element 2j is byte j's low nibble, 2j + 1 its high one."""

    codes: torch.Tensor  # INT8 and INT6: int8 [out, in]; INT4 and INT4_SYM: uint8 [out, in // 2]
    scales: torch.Tensor  # a SCALE_DTYPES dtype [out, in // group_size]
    mins: torch.Tensor | None  # INT4: the scales' dtype [out, in // group_size]; the others: None
    fmt: QuantFormat

    def __post_init__(self) -> None:
        out, packed = self.codes.shape
        in_features = packed * 2 if self.fmt.scheme.nibbles else packed
        code_dtype = torch.uint8 if self.fmt.scheme.nibbles else torch.int8
        groups = in_features // self.fmt.group_size
        if self.codes.dtype != code_dtype:
            raise ValueError(f"{self.fmt.scheme.value} codes must be {code_dtype}, got {self.codes.dtype}")
        if in_features % self.fmt.group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group size {self.fmt.group_size}")
        if self.scales.shape != (out, groups) or self.scales.dtype not in SCALE_DTYPES:
            raise ValueError(f"scales {tuple(self.scales.shape)} {self.scales.dtype}: expected ({out}, {groups}) "
                             "float32 or float16")
        has_mins = self.fmt.scheme.stores_mins
        if (self.mins is not None) != has_mins:
            raise ValueError(f"{self.fmt.scheme.value} weights {'need' if has_mins else 'take no'} mins")
        if self.mins is not None and (self.mins.shape != self.scales.shape or self.mins.dtype != self.scales.dtype):
            raise ValueError(f"mins {tuple(self.mins.shape)} {self.mins.dtype}: expected the scales' shape and dtype")

    @property
    def shape(self) -> tuple[int, int]:
        out, packed = self.codes.shape
        return (out, packed * 2 if self.fmt.scheme.nibbles else packed)

    def group_mins(self) -> torch.Tensor | None:
        """Each group's min as the INT4 formula reads it, in float32: the stored ones (INT4), -8 * the scales
        (INT4_SYM), None (INT8)."""
        if self.fmt.scheme is QuantScheme.INT4_SYM:
            return self.scales.float() * SYM_MIN_PER_SCALE
        return None if self.mins is None else self.mins.float()


def as_asymmetric(weight: QuantizedWeight) -> QuantizedWeight:
    """An INT4_SYM weight as INT4 with its mins stored (the same values; fp16 where both are exact there, as
    half_if_exact), so it can join INT4 parts; other weights unchanged."""
    if weight.fmt.scheme is not QuantScheme.INT4_SYM:
        return weight
    scales, mins = half_if_exact(weight.scales.float(), weight.group_mins())
    return QuantizedWeight(weight.codes, scales, mins, QuantFormat(QuantScheme.INT4, weight.fmt.group_size))


def half_if_exact(scales: torch.Tensor, mins: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 scales (and mins) as float16 where every value survives the round trip exactly (GGUF's fp16 block
    scales, pllm's rounded ones), else unchanged: a lossless narrowing."""
    parts = [t for t in (scales, mins) if t is not None]
    if any(t.dtype != torch.float32 for t in parts):
        return scales, mins
    halves = [t.half() for t in parts]
    if not all(torch.equal(h.float(), t) for h, t in zip(halves, parts)):
        return scales, mins
    return halves[0], (halves[1] if mins is not None else None)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in // 2] -> uint8 [out, in], each value 0..15."""
    return torch.stack((codes & 0x0F, codes >> 4), dim=-1).reshape(codes.shape[0], -1)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] of values 0..15 -> [out, in // 2], element 2j in the low nibble."""
    if values.dtype != torch.uint8 or values.shape[-1] % 2 or (values.numel() and int(values.max()) > 15):
        raise ValueError("int4 packing takes uint8 values 0..15 along an even last dimension")
    pairs = values.reshape(values.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference meaning of a packed weight: float [out, in], computed in float32 and rounded once to dtype."""
    out, in_features = weight.shape
    group = weight.fmt.group_size
    if weight.fmt.scheme.nibbles:
        codes = unpack_int4(weight.codes).float().view(out, -1, group)
        values = codes * weight.scales.float()[..., None] + weight.group_mins()[..., None]
    else:
        values = weight.codes.float().view(out, -1, group) * weight.scales.float()[..., None]
    return values.reshape(out, in_features).to(dtype)


ACTIVATION_BLOCK = 32  # consecutive input elements sharing one activation scale (llama.cpp's Q8_0 block)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [..., in] (in a multiple of ACTIVATION_BLOCK) -> (int8 codes [..., in], float32 scales
    [..., in // ACTIVATION_BLOCK]): per block d = max|x| / 127 and q = x * (1 / d) rounded to nearest even (q = 0
    where d = 0), all in float32. Symmetric 8-bit, so a block's largest element keeps its value to 1/254 of it."""
    if x.shape[-1] % ACTIVATION_BLOCK:
        raise ValueError(f"activation width {x.shape[-1]} is not a multiple of {ACTIVATION_BLOCK}")
    blocks = x.float().reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    scales = blocks.abs().amax(-1) / 127
    inverse = torch.where(scales != 0, 1 / scales, torch.zeros_like(scales))
    codes = torch.round(blocks * inverse[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(x.shape), scales


def dequantize_activation(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_activation's meaning: float32 [..., in], each element code * its block's scale, rounded once."""
    blocks = codes.float().reshape(*scales.shape, ACTIVATION_BLOCK) * scales[..., None]
    return blocks.reshape(codes.shape)
