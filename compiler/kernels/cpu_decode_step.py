"""The C++ whole-stack decode step of the cpu backend: every layer of the llama wiring in one call per step."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels import cpu_decode_attention, cpu_quant_linear
from pllm.compiler.kernels.common import CPU_KERNEL_DTYPES, CPU_LANES, head_shape
from pllm.compiler.kernels.cpu_decode_attention import PREFETCH_TOKENS
from pllm.compiler.kernels.cpu_rope_kv_write import COMPILE_FLAGS as ROPE_COMPILE_FLAGS
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

# The families whose forward is models/llama.py's LlamaModel unchanged and that tests/models check against
# transformers through this kernel (qwen3: with its q/k norm); phi3 shares the class but its partial rotary and
# longrope stay per-op.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# The most sequences one call takes (the library says so: pllm_decode_step_max_batch); each GEMV work item keeps
# MAX_BATCH x its rows (ROW_TILE, or AMX_ROWS on AMX tiles) fp32 sums on the stack. How far the engine uses it is the
# runtime's choice, by what the per-op path would run instead (runtime/backends/cpu/cpu_decode_step.py's
# compiled_batch_limit): past 16 sequences (32 on AMX tiles) oneDNN's packed bf16 GEMM wins where the CPU has one,
# while F.linear (fp32; bf16 widened where oneDNN has no bf16 GEMM) lost to the step's tiles at 32 and 64 sequences
# on the AVX2-only EPYC
MAX_BATCH = 64
ROW_TILE = 4  # weight rows per GEMV tile: 4 independent sums per activation row hide the FMA/dot latency
BATCH_TILE = 4  # activation rows per pass over a tile: 4 x 4 accumulators fit the 32 AVX-512 registers
# The GEMV requests the weight rows this many tiles ahead into L1 (prefetch instructions never fault past the end):
# the hardware prefetcher alone left a streaming batch-4 GEMV at a third of the machine's read bandwidth
PREFETCH_TILES = 2
# Few sequences with short rows (x's rows, all of them, within SEQUENTIAL_X_BYTES: a third of a 48 KiB L1) read the
# weight rows one after another instead, requesting the row PREFETCH_ROWS ahead: one sequential stream per thread
# took batches 1-4 from ~0.7 to 0.85-0.9 of the read bandwidth on the AVX-512 BF16 VM (tools/bench_gemv_bandwidth.py)
PREFETCH_ROWS = 8
# At the end of each float linear every thread requests this much of its first rows of the next one into L2, so the
# norm, RoPE, attention and barriers between two GEMVs keep the memory bus busy, and the next GEMV does not start on
# a cold stream (the stack alone taking turns with and without: within the dev VM's noise, a few percent either way)
NEXT_PREFETCH_BYTES = 16384
SEQUENTIAL_X_BYTES = 16384
# ... and only up to this many sequences: a row at a time is BATCH_TILE accumulator chains, too few to hide the
# dot product's latency past 4 (batch 8 on SmolLM2's linears: 0.36-0.71 of the read bandwidth a row at a time,
# 0.53-0.76 in tiles of 4 rows)
SEQUENTIAL_MAX_BATCH = 4
# Packed weights (builds that keep some): output rows per work-sharing item of a packed GEMV, handed whole to the
# packed linear's row code (cpu_quant_linear), which takes them 4 at a time; 32 rows of INT8 codes of a 576-wide
# model are 18 KB, enough per item to keep the prefetcher streaming and few enough items to share out evenly
PACKED_ROWS = 32
# From this many sequences a float linear's items (oneDNN's panels) that do not divide evenly among the threads are
# each cut among all of them by sequences (share_work): there a panel costs its arithmetic more than its reading
# (tools/bench_gemv_bandwidth.py: SmolLM2's bf16 GEMVs turn compute-bound past ~7 rows on the AVX-512 BF16 VM)
SPLIT_MIN_BATCH = 8
# bf16 builds on a CPU with AMX-BF16 (cpu_decode_step_amx.cpp.inc): output rows per work-sharing item of a float
# linear, two tiles of 16 (each B tile of x loaded serves two tile products), and how far ahead in each weight row
# its next chunk is requested (elements: one 64-byte line past the chunk the tile loads next)
AMX_ROWS = 32
AMX_PREFETCH_K = 64
# ... from this many sequences: one or two stream their weights faster through the AVX-512 rows, one row after
# another (SmolLM2's qkv, gate_up and down on a 2-core Sapphire Rapids VM, tools/bench_gemv_bandwidth.py: batch 1
# 0.85-0.95x as fast as AVX-512 in tiles, batch 2 0.93-1.04x, batch 3 1.05-1.17x, batch 8 1.6-1.9x)
AMX_MIN_BATCH = 3
# Up to this many rows each thread quantises a packed linear's input itself rather than wait for one thread to
PRIVATE_PREPARE_ROWS = 4
PARALLEL_MIN_TOKENS = 1  # the included kernels' entry points (unused here) read it; the step threads every phase
COMPILE_FLAGS = ROPE_COMPILE_FLAGS  # the included RoPE rounds as PyTorch does: no contraction, no fast-math


def supported(spec: ModelSpec, dtype: str) -> bool:
    """The llama wiring's plain decoder layer, or with qwen3's q/k norm (no window, soft-cap, experts, gemma norm,
    partial rotary), with shapes the included kernels take (head rows of whole vector halves, rows of whole
    vectors)."""
    return (
        spec.model_type in FAMILIES
        and dtype in CPU_KERNEL_DTYPES
        and not spec.sliding_layers
        and spec.moe is None
        and spec.attn_logit_softcapping is None
        and not spec.norm_weight_offset
        and spec.hidden_act == "silu"
        and spec.rotary_dim == spec.head_dim
        and spec.head_dim % (2 * CPU_LANES) == 0
        and spec.hidden_size % CPU_LANES == 0
        and spec.intermediate_size % CPU_LANES == 0
    )


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        "HIDDEN_SIZE": spec.hidden_size,
        "INTERMEDIATE_SIZE": spec.intermediate_size,
        "NUM_LAYERS": spec.num_hidden_layers,
        **head_shape(spec),
        "HALF_DIM": spec.head_dim // 2,
        "Q_SIZE": spec.q_size,
        "KV_SIZE": spec.kv_size,
        "QKV_SIZE": spec.q_size + 2 * spec.kv_size,
        "EPS": spec.rms_norm_eps,
        "BLOCK_SIZE": block_size,
        "LANES": CPU_LANES,
        "PREFETCH_TOKENS": PREFETCH_TOKENS,
        "PARALLEL_MIN_TOKENS": PARALLEL_MIN_TOKENS,
        "MAX_BATCH": MAX_BATCH,
        "ROW_TILE": ROW_TILE,
        "BATCH_TILE": BATCH_TILE,
        "PREFETCH_TILES": PREFETCH_TILES,
        "PREFETCH_ROWS": PREFETCH_ROWS,
        "NEXT_PREFETCH_BYTES": NEXT_PREFETCH_BYTES,
        "SEQUENTIAL_X_BYTES": SEQUENTIAL_X_BYTES,
        "SEQUENTIAL_MAX_BATCH": SEQUENTIAL_MAX_BATCH,
        "PACKED_ROWS": PACKED_ROWS,
        "SPLIT_MIN_BATCH": SPLIT_MIN_BATCH,
        "AMX_ROWS": AMX_ROWS,
        "AMX_PREFETCH_K": AMX_PREFETCH_K,
        "AMX_MIN_BATCH": AMX_MIN_BATCH,
        "PRIVATE_PREPARE_ROWS": PRIVATE_PREPARE_ROWS,
        # the included packed linear's own constants, renamed so they do not meet the step's (the template gives
        # them back their names around the include)
        **{f"QUANT_{name}": value for name, value in cpu_quant_linear.render(spec, dtype, block_size)[0].items()},
    }
    bf16 = dtype == "bfloat16"
    options = {"bf16": bf16, "bf16_cache": bf16, "qkv_bias": spec.attention_bias, "qk_norm": spec.qk_norm,
               "sliding_window": False, "softcap": False}
    return constants, {**options, "simd_bf16": cpu_decode_attention.simd_bf16(options)}


# Built again without the AMX tiles where the first compile fails (an assembler older than their instructions: the
# library then runs the AVX-512 rows, and says so: pllm_decode_step_amx_compiled)
FALLBACK_FLAGS = ("-DHAVE_AMX=0",)
KERNEL = Kernel("cpu_decode_step", op="decode_step", language=Language.CPP, render=render, applies=supported,
                compile_flags=COMPILE_FLAGS, fallback_flags=FALLBACK_FLAGS, packed_option=True)
