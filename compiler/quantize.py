"""pllm's own weight quantisation (`pllm-compile --quantization int8|int4|int4_sym`) into models/quant.py's packed
layout, and how a build stores packed weights in its safetensors file and manifest."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from pllm.compiler.manifest import QUANT_PARTS
from pllm.models.quant import INT6_LIMIT, QuantFormat, QuantizedWeight, QuantScheme, half_if_exact, pack_int4
from pllm.models.spec import ModelKind, ModelSpec

# The runtime tensors kept packed in the build's format: every decoder layer's four linear weights. The embedding
# stays float (a row gather per token, not a matmul); the LM head is packed apart, at 8 or 6 bits (compiler/lm_head.py).
QUANTIZED_TARGETS = re.compile(r"layers\.[0-9]+\.(qkv_proj|o_proj|gate_up_proj|down_proj)")
# int4 group sizes offered: 32 (what GGUF's 4-bit types use) to 128 (AWQ's and GPTQ's usual choice)
INT4_GROUP_SIZES = (32, 64, 128)
# The default: what llama.cpp's 4-bit types use on the CPU (Q4_0, Q4_1, Q4_K's sub-blocks), 5 bits per weight with
# the fp16 scale and min (Q4_1's size). Measured on the default model (README, Quantised weights): group 64 raised
# perplexity 1.64x over bf16, group 32 not at all (its weights are Q4_1 at group 32, which int4/32 reproduces exactly).
INT4_DEFAULT_GROUP = 32
INT8_MAX = 127  # symmetric codes -127..127: -128 is never used, so negation stays in range
FP16_NORMAL_MIN = 2.0**-14  # the least normal float16: a scale or min rounded below it keeps fewer than 11 bits


class Quantization(enum.Enum):
    """What pllm-compile does to the decoder's linear weights."""

    INT8 = "int8"  # per output channel, symmetric
    INT4 = "int4"  # groups along the input, with a scale and a min each
    INT4_SYM = "int4_sym"  # groups along the input, a scale each (llama.cpp's Q4_0 rule at group 32)
    GGUF = "gguf"  # a GGUF input's Q8_0, Q4_0, Q4_1 and Q4_K blocks kept as they are (compiler/gguf_blocks.py)

    @property
    def grouped(self) -> bool:
        """Takes --quant-group-size (the 4-bit methods)."""
        return self in (Quantization.INT4, Quantization.INT4_SYM)


class QuantizeError(ValueError):
    """The requested quantisation cannot apply to this model; the message names the option and the reason."""


def check_quantizable(spec: ModelSpec, quantization: Quantization) -> None:
    """Refuse the models whose weights pllm cannot keep packed, naming why."""
    if spec.kind is not ModelKind.DECODER:
        raise QuantizeError(f"--quantization {quantization.value}: {spec.model_type} is an encoder; only decoder "
                            "builds keep quantised weights")
    if spec.moe is not None:
        raise QuantizeError(f"--quantization {quantization.value}: {spec.model_type} is a mixture of experts; the "
                            "expert kernels (cpu_moe.py, moe.py.jinja) read float weights only")


def int4_group_size(spec: ModelSpec, requested: int | None) -> int:
    """The int4 group size: the requested one (even, 32..128, dividing every quantised input width), else
    INT4_DEFAULT_GROUP."""
    widths = {spec.hidden_size, spec.q_size, spec.intermediate_size}
    size = INT4_DEFAULT_GROUP if requested is None else requested
    if size not in range(INT4_GROUP_SIZES[0], INT4_GROUP_SIZES[-1] + 1) or size % 2:
        raise QuantizeError(f"--quant-group-size {size}: 4-bit groups are even sizes from {INT4_GROUP_SIZES[0]} to "
                            f"{INT4_GROUP_SIZES[-1]}")
    bad = sorted(w for w in widths if w % size)
    if bad:
        which = f"--quant-group-size {size}" if requested is not None else f"4-bit groups of {size} (the default)"
        raise QuantizeError(f"{which}: the model's input widths {bad} are not multiples of it; --quant-group-size "
                            f"takes even sizes from {INT4_GROUP_SIZES[0]} to {INT4_GROUP_SIZES[-1]} that divide them")
    return size


def fp16_grid(values: torch.Tensor, down: bool = False) -> torch.Tensor | None:
    """float32 values on float16's grid (still float32): the nearest float16, or with `down` the largest float16 at
    most each value; None unless every one is a normal float16 or zero (a tiny or huge value would keep fewer than
    11 bits: the caller then keeps float32, exact)."""
    halves = values.half()
    if down:
        halves = torch.where(halves.float() > values, torch.nextafter(halves, torch.full_like(halves, -torch.inf)),
                             halves)
    grid = halves.float()
    magnitude = grid.abs()
    # zero only where the value is zero: a tiny one that rounds to zero would lose its whole group
    normal = torch.isfinite(grid) & ((values == 0) | (magnitude >= FP16_NORMAL_MIN))
    return grid if bool(normal.all()) else None


def in_groups(weight: torch.Tensor, group_size: int, method: str) -> torch.Tensor:
    """float [out, in] -> float32 [out, in // group_size, group_size], refusing a group that does not divide `in`."""
    out, in_features = weight.shape
    if in_features % group_size:
        raise QuantizeError(f"{method} group size {group_size} does not divide the input width {in_features}")
    return weight.float().view(out, in_features // group_size, group_size)


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """float [out, in] -> INT8 codes with one scale per group of `group_size` inputs (None: per output channel):
    scale = the group's max|w| / 127 (groups: rounded to float16 and kept so, as Q8_0 keeps its scales, where all
    are normal float16s), code = round(w / scale)."""
    return _quantize_symmetric(weight, group_size, QuantScheme.INT8, INT8_MAX)


def quantize_int6(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """float [out, in] -> INT6 (INT8's formula, codes -31..31) with a float16 scale per group (where all are normal
    float16s, else float32): scale = the group's max|w| / 31, code = round(w / scale). 6.5 bits a weight at group 32,
    as llama.cpp's Q6_K spends 6.56 on its output matrix."""
    return _quantize_symmetric(weight, group_size, QuantScheme.INT6, INT6_LIMIT)


def _quantize_symmetric(weight: torch.Tensor, group_size: int | None, scheme: QuantScheme,
                        limit: int) -> QuantizedWeight:
    """float [out, in] -> codes -limit..limit, one scale per group (None: per output channel, kept fp32)."""
    out, in_features = weight.shape
    group = in_features if group_size is None else group_size
    fmt = QuantFormat(scheme, group)
    w = in_groups(weight, group, scheme.value)
    scale = w.abs().amax(dim=-1) / limit  # [out, groups]
    if group_size is not None:  # one scale per channel is a negligible share of the bytes: kept exact
        # the nearest fp16 is within 2^-11 of the scale, so a group's largest |w| is at most limit * (1 + 2^-11)
        # steps: its code clamps to the limit within a tenth of a step
        narrow = fp16_grid(scale)
        scale = scale if narrow is None else narrow
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: codes 0, scale 0
    codes = torch.round(w / safe[..., None]).clamp_(-limit, limit).to(torch.int8)
    scales, _ = half_if_exact(scale.contiguous())
    return QuantizedWeight(codes.view(out, in_features), scales, None, fmt)


def quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """float [out, in] -> INT4 with a scale and a min per group: min = the group's least value, scale = range / 15,
    code = round((w - min) / scale), so every weight is within half a step of its value. Where they land on normal
    float16s (all of a matrix's, else none), the min is rounded down to float16 (no weight falls below the grid),
    the scale then taken from it and rounded to the nearest float16 (within 2^-11: the group's top stays within
    15.01 steps of the min), and both kept so."""
    out, in_features = weight.shape
    fmt = QuantFormat(QuantScheme.INT4, group_size)
    w = in_groups(weight, group_size, "4-bit")
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
    scale = (high - low) / 15
    low16 = fp16_grid(low, down=True)
    scale16 = None if low16 is None else fp16_grid((high - low16) / 15)
    if scale16 is not None:  # both on fp16's grid, or both exact in fp32
        low, scale = low16, scale16
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: codes 0, w = min exactly
    codes = torch.round((w - low[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    scales, mins = half_if_exact(scale.contiguous(), low.contiguous())
    return QuantizedWeight(pack_int4(codes.view(out, in_features)), scales, mins, fmt)


def quantize_int4_sym(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """float [out, in] -> INT4_SYM by llama.cpp's Q4_0 rule, step for step in float32: per group, d = (the value of
    largest magnitude) / -8 and code = trunc(w * (1 / d) + 8.5) clamped to 0..15, so w ~ (code - 8) d (the largest
    magnitude on code 0 exactly, the others within half a step); d is then stored in float16, as Q4_0 stores it,
    where every d of the matrix is a normal float16 or zero, else kept in float32. At group 32 with float16 d this
    gives Q4_0's very blocks (tests/compiler/test_gguf_blocks.py)."""
    out, in_features = weight.shape
    w = in_groups(weight, group_size, "4-bit")
    peak = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))  # [out, groups, 1], signed
    scale = peak / -8
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))  # an all-zero group: codes 8, w = 0
    codes = torch.trunc(w * inverse + 8.5).clamp_(0, 15).to(torch.uint8)
    scale = scale.squeeze(-1)
    narrow = fp16_grid(scale)
    scales, _ = half_if_exact((scale if narrow is None else narrow).contiguous())
    return QuantizedWeight(pack_int4(codes.view(out, in_features)), scales, None,
                           QuantFormat(QuantScheme.INT4_SYM, group_size))


@dataclass(frozen=True)
class Quantizer:
    """Turns each quantised target of a build into a QuantizedWeight; other tensors pass through."""

    quantization: Quantization  # one of QUANTISERS' (GGUF keeps the file's blocks instead: compiler/gguf_blocks.py)
    group_size: int  # the 4-bit methods' group; int8 uses one group per output channel

    def applies(self, name: str) -> bool:
        return QUANTIZED_TARGETS.fullmatch(name) is not None

    def __call__(self, weight: torch.Tensor) -> QuantizedWeight:
        return QUANTISERS[self.quantization](weight, self.group_size)


# pllm's own methods: (float weight [out, in], group size) -> the packed weight
QUANTISERS = {
    Quantization.INT8: lambda weight, _group: quantize_int8(weight),
    Quantization.INT4: quantize_int4,
    Quantization.INT4_SYM: quantize_int4_sym,
}


def flatten(weights: dict[str, torch.Tensor | QuantizedWeight]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The build's safetensors dict (a packed weight as name.codes, name.scales, name.mins) and the manifest's record
    of the packed ones: name -> {"scheme", "group_size"}."""
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, dict] = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            parts = (w.codes, w.scales, w.mins)
            tensors.update({f"{name}.{part}": t.contiguous() for part, t in zip(QUANT_PARTS, parts) if t is not None})
            record[name] = {"scheme": w.fmt.scheme.value, "group_size": w.fmt.group_size}
        else:
            tensors[name] = w
    return tensors, record


def principal_format(record: dict[str, dict]) -> QuantFormat | None:
    """The format most of a build's packed weights share (what the kernel plan is specialised to), or None."""
    counts: dict[tuple[str, int], int] = {}
    for entry in record.values():
        key = (entry["scheme"], entry["group_size"])
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    scheme, group = max(counts, key=lambda k: (counts[k], k))
    return QuantFormat(QuantScheme(scheme), group)
