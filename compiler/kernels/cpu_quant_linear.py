"""The C++ packed-weight linear of the cpu backend: a GEMV that reads INT8/INT4 codes directly (decode), and the
dequantisation of a whole weight for the float GEMM (prefill)."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import CPU_KERNEL_DTYPES
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

# fp32 lanes per vector: 64 bytes, one AVX-512 register (the AVX2 clone uses two); an INT4 vector of codes is then
# 16 bytes, 32 weights, the smallest group the layout's GGUF types use
QUANT_LANES = 16
# tokens sharing each widened weight vector: 4 accumulators + 2 widened code vectors + x loads fit AVX2's 16
# registers (AVX-512's 32 with room), and 4 rows of x per row of W keep the FMAs ahead of the code widening
TOKEN_TILE = 4
# rows sharing each vector of x when fewer than TOKEN_TILE tokens remain (decode): 4 independent FMA chains hide the
# FMA latency that one row's single chain would wait on, and 4 accumulators still fit AVX2's registers
ROW_TILE = 4
# codes requested this far ahead of the row being read (rows are contiguous, so this reaches into the tiles to
# come): the row tiles interleave 4 short streams, too short for the hardware prefetcher to lock onto. Measured
# on the dev machine (tools/bench_quant.py's shapes, one thread): 1 KB 1.8x, 4 KB 2.4x, 16 KB 3.5x faster INT8 GEMV
# than none
PREFETCH_BYTES = 16384
# the AVX512-VNNI panels (packed weights repacked 16 rows a panel, one stream of codes per panel): how far ahead they
# request codes. A prototype of the INT4 panel loop on the 2-core Xeon VM, a 1B model's gate_up (11264 x 2048) in
# copies over 600 MB: 16-17 GB/s with 4 KB ahead against 12.5-14 with none (1, 2 and 8 KB: 16-16.7); SmolLM2's
# gate_up within the L3 (60 MB): level with none. In the engine's step on the same VM, builds taking turns
# (tools/bench_builds_decode.py), codes requested 768 bytes ahead into L1 and 4 KB ahead into L2 against 4 KB into
# L1 alone: the 1.17B llama's INT8 batch-1 decode 1.04-1.06x, batch 4 1.13x, batch 16 1.07x; its INT4_SYM and
# SmolLM2's INT8 and INT4_SYM level (1.00-1.01x). 768 into L1 alone: the 1.17B INT8 1.02-1.08x but SmolLM2's INT8,
# half of it served from the L3, 0.94x (the far L2 request is what the L3's latency wants); 768 and 2 KB: the 1.17B
# 1.08x, SmolLM2 0.94x; 768 and 8 KB: the 1.17B 0.99x; no prefetch at all: 0.98x. These distances are Intel's: on
# AMD the panels request each line as they read it (chosen at run time, cpu_quant_linear.cpp.jinja's panel_prefetch)
PANEL_PREFETCH_BYTES = 768
PANEL_PREFETCH_L2_BYTES = 4096
# the AVX512-VNNI rows: rows sharing each chunk of a token's quantised activations; 4 rows x 4 tokens is 16
# accumulators + 4 code vectors + 4 lane-scale vectors in AVX-512's 32 registers
VNNI_ROW_TILE = 4
# up to this many tokens the INT8 VNNI rows go one at a time instead (one sequential stream of codes per thread): a
# batch-1 decode step's INT8 linears ~10% faster on the AVX512-VNNI VM, batch 2 slower, INT4 25% slower
VNNI_SEQUENTIAL_TOKENS = 1
# the AVX2 integer rows (no VNNI; vpmaddubsw): rows per tile (2 rows x 4 tokens: 8 accumulators and 4 code vectors
# in AVX2's 16 registers), and up to how many tokens INT8 and INT4 rows go one at a time (a single sequential stream
# of codes per thread). Measured on the AVX2-only EPYC (tools/bench_quant.py, SmolLM2 shapes, 1 token): INT8 one row
# at a time 300-306 us a layer against 367 in tiles of 2; INT4 in tiles of 2 295-309 against 347-348 one at a time
# (a row of INT4 is short work beside its per-chunk scales, so two accumulator chains help); tiles of 1 or 4 at 4
# tokens were no faster than 2
AVX2_INT_ROW_TILE = 2
AVX2_INT8_SEQUENTIAL_TOKENS = 1
AVX2_INT4_SEQUENTIAL_TOKENS = 0
# the row ranges an including kernel should hand quant_rows (a multiple of every row tile)
QUANT_ROW_TILE = 16
# fp16 scales and mins are widened a few rows at a time into per-thread buffers of this many floats each (32 KB):
# L1-sized, and so rows of at most this many groups take fp16 scales (cpu_quant_linear.cpp.jinja, ScaleType)
WIDE_FLOATS = 8192


def supported(spec: ModelSpec, dtype: str) -> bool:
    """fp32 and bf16 activations (fp16 would need F16C widening the templates do not use)."""
    return dtype in CPU_KERNEL_DTYPES


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    return {"LANES": QUANT_LANES, "TOKEN_TILE": TOKEN_TILE, "ROW_TILE": ROW_TILE, "PREFETCH_BYTES": PREFETCH_BYTES,
            "PANEL_PREFETCH_BYTES": PANEL_PREFETCH_BYTES,
            "PANEL_PREFETCH_L2_BYTES": PANEL_PREFETCH_L2_BYTES,
            "VNNI_ROW_TILE": VNNI_ROW_TILE, "VNNI_SEQUENTIAL_TOKENS": VNNI_SEQUENTIAL_TOKENS,
            "AVX2_INT_ROW_TILE": AVX2_INT_ROW_TILE, "AVX2_INT8_SEQUENTIAL_TOKENS": AVX2_INT8_SEQUENTIAL_TOKENS,
            "AVX2_INT4_SEQUENTIAL_TOKENS": AVX2_INT4_SEQUENTIAL_TOKENS, "QUANT_ROW_TILE": QUANT_ROW_TILE,
            "WIDE_FLOATS": WIDE_FLOATS}, {}


KERNEL = Kernel("cpu_quant_linear", op="quant_linear", language=Language.CPP, render=render, applies=supported,
                quantized=True)
