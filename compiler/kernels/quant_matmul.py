"""The Triton dequantise-in-the-matmul kernel: y = x @ dequant(W)^T (+ bias) over models/quant.py's packed layout.

The weight never exists in float in memory: each program loads a tile of codes (int8, or two int4 codes a byte),
turns them into x's dtype (exact: |code| <= 128 fits any float mantissa), multiplies them with tl.dot accumulating
in fp32, and applies its group's scale (and, for int4, min times the tile's sum of x) in fp32 after the dot. So
each dot covers one group: BLOCK_K divides the group size where it can, and where no tile does (an even
--quant-group-size such as 40; INT8's per-channel group over a width that is no multiple of 16) a tile of 16 holding
two groups' ends is dotted twice, once per group, its x zeroed outside each (the template's STRADDLE). A
decode-sized step (a few tokens) reads the whole weight for a handful of rows, so it splits the K loop across programs
(fp32 partial sums, reduced in a fixed order) until the GPU has enough programs streaming weights; a prefill-sized
step is a plain tiled GEMM.

One rendered file serves both schemes (a GGUF build may keep Q8_0 and Q4_x matrices side by side): the scheme and the
group size are constexprs of each launch, taken from the weight's QuantFormat, so each (scheme, group size) in use
is its own specialisation, compiled once. The plan carries it only for a build that keeps packed weights.
"""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import dot_precision, triton_dtype
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

# Decode-sized steps: tl.dot needs M >= 16, and at most SMALL_M_MAX_TOKENS rows all fit one row tile.
SMALL_M_MAX_TOKENS = 16
BLOCK_M_SMALL = 16
# Narrow N tiles for decode: the weight read dominates, and narrow tiles give more programs to stream it with.
BLOCK_N_SMALL = 32
# Prefill-sized steps: 64 x 128 output tiles reuse each dequantised weight tile across 64 rows (the shape Triton's
# matmul tutorial starts from).
BLOCK_M_LARGE = 64
BLOCK_N_LARGE = 128
# The K tile: the wide one wherever it divides the weight's group size (every GGUF type's 32, pllm's 32 to 128), the
# narrow one otherwise (groups of 16, 48, ...; and groups it does not divide, over 16: 40, 72, ..., each tile then
# dotted once per group it meets, at most two); the scale is applied per dot.
# Not 64: that made the int8 prefill tile spill registers on sm_80 (cuobjdump -res-usage of the compiled cubins).
# 16 is the smallest K tl.dot takes.
BLOCK_K_WIDE = 32
BLOCK_K_NARROW = 16
# The group size the ahead-of-time compile check renders (launches take the weight's own): GGUF's, and pllm's default.
AOT_GROUP_SIZE = 32
# A GEMV streams weights: to keep enough loads in flight it wants several programs per SM (132 on an H100/H200,
# 108 on an A100), so a decode launch splits K until it has at least this many programs...
MIN_PROGRAMS = 512
# ...but never below this many K tiles per split, so each program's loop amortises its start and its partial row.
MIN_K_TILES_PER_SPLIT = 4
REDUCE_BLOCK_N = 256  # the split reduce: one token's slice of N per program (it reads splits x T x N fp32, tiny)
NUM_WARPS = 4  # decode tiles (16 x 32) and the split reduce
# A prefill tile holds two fp32 [64, 128] arrays (the running sum and the K tile's dot before its scale is applied):
# 128 registers a thread over 4 warps, which spilled to the stack on sm_80 and sm_90 (cuobjdump -res-usage of the
# compiled cubins); over 8 warps, 64, and a bf16 build spills nothing. An fp32 build (ieee dots) still spills.
NUM_WARPS_LARGE = 8


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        **triton_dtype(dtype),
        "BLOCK_K_WIDE": BLOCK_K_WIDE,
        "BLOCK_K_NARROW": BLOCK_K_NARROW,
        "AOT_GROUP_SIZE": AOT_GROUP_SIZE,
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
        "NUM_WARPS_LARGE": NUM_WARPS_LARGE,
    }
    return constants, {}


KERNEL = Kernel("quant_matmul", op="quant_matmul", language=Language.TRITON, render=render, quantized=True)
