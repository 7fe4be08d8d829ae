"""The Triton dequantise-in-the-matmul kernel: y = x @ dequant(W)^T (+ bias) over models/quant.py's packed layout.

The weight never exists in float in memory: each program loads a tile of codes (int8, or two int4 codes a byte),
turns them into x's dtype (exact: |code| <= 128 fits any float mantissa), multiplies them with tl.dot accumulating
in fp32, and applies its group's scale (and, for int4, min times the tile's sum of x) in fp32 after the dot. So
a K tile must not straddle two groups: BLOCK_K divides the group size. A decode-sized step (a few tokens) reads the
whole weight for a handful of rows, so it splits the K loop across programs (fp32 partial sums, reduced in a fixed
order) until the GPU has enough programs streaming weights; a prefill-sized step is a plain tiled GEMM.
"""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import dot_precision, triton_dtype
from pllm.compiler.kernels.kernel import Language, QuantKernel
from pllm.models.quant import QuantFormat, QuantScheme
from pllm.models.spec import ModelSpec

# Decode-sized steps: tl.dot needs M >= 16, and at most SMALL_M_MAX_TOKENS rows all fit one row tile.
SMALL_M_MAX_TOKENS = 16
BLOCK_M_SMALL = 16
# Narrow N tiles for decode: the weight read dominates, and narrow tiles give more programs to stream it with.
BLOCK_N_SMALL = 32
# Prefill-sized steps: 64 x 128 output tiles reuse each dequantised weight tile across 64 rows, and an fp32
# accumulator of 64 x 128 fits four warps' registers (the shape Triton's matmul tutorial starts from).
BLOCK_M_LARGE = 64
BLOCK_N_LARGE = 128
# The widest K tile: more per iteration amortises the loop, but a tile may not span two groups (the scale is applied
# per tile), so the build takes the largest of these that divides its group size; a launch accepts any group size
# that is a multiple of it (an int8 weight quantised per output channel has one group per row, its width).
BLOCK_K_CHOICES = (64, 32, 16)  # 16: the smallest K tl.dot takes
# A GEMV streams weights: to keep enough loads in flight it wants several programs per SM (132 on an H100/H200,
# 108 on an A100), so a decode launch splits K until it has at least this many programs...
MIN_PROGRAMS = 512
# ...but never below this many K tiles per split, so each program's loop amortises its start and its partial row.
MIN_K_TILES_PER_SPLIT = 4
REDUCE_BLOCK_N = 256  # the split reduce: one token's slice of N per program (it reads splits x T x N fp32, tiny)
NUM_WARPS = 4


def block_k(group_size: int) -> int:
    """The K tile for a group size: the largest choice that divides it (a tile never spans two groups)."""
    for choice in BLOCK_K_CHOICES:
        if group_size % choice == 0:
            return choice
    raise ValueError(f"group size {group_size}: the Triton quant kernel needs a multiple of {BLOCK_K_CHOICES[-1]}")


def applies(spec: ModelSpec, dtype: str, quant: QuantFormat) -> bool:
    """Every quantised decoder build whose group size some K tile divides (GGUF's 32, pllm's 32 to 128)."""
    return any(quant.group_size % choice == 0 for choice in BLOCK_K_CHOICES)


def render(spec: ModelSpec, dtype: str, block_size: int, quant: QuantFormat) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        **triton_dtype(dtype),
        "SCHEME": quant.scheme.value,
        "GROUP_SIZE": quant.group_size,
        "BLOCK_K": block_k(quant.group_size),
        "SMALL_M_MAX_TOKENS": SMALL_M_MAX_TOKENS,
        "BLOCK_M_SMALL": BLOCK_M_SMALL,
        "BLOCK_N_SMALL": BLOCK_N_SMALL,
        "BLOCK_M_LARGE": BLOCK_M_LARGE,
        "BLOCK_N_LARGE": BLOCK_N_LARGE,
        "MIN_PROGRAMS": MIN_PROGRAMS,
        "MIN_K_TILES_PER_SPLIT": MIN_K_TILES_PER_SPLIT,
        "REDUCE_BLOCK_N": REDUCE_BLOCK_N,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": NUM_WARPS,
    }
    # the scheme's tile load and epilogue are rendered, the other's are not there at all
    return constants, {"int4": quant.scheme is QuantScheme.INT4}


KERNEL = QuantKernel("quant_matmul", op="quant_matmul", language=Language.TRITON, render=render, applies=applies)
