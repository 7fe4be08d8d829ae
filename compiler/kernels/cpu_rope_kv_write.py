"""The C++ rotary embedding + paged KV write of the cpu backend, rounding exactly as PyTorch does."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import CPU_KERNEL_DTYPES, CPU_LANES
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

PARALLEL_MIN_TOKENS = 16  # fewer tokens: one thread; a token does ~H + KV head rows, cheaper than waking threads
# It promises PyTorch's rounding: no fused multiply-add (GCC contracts a * b + c into one at -O3, even across
# statements, rounding once where PyTorch rounds twice), and no fast-math from a $CXX that defaults to it.
COMPILE_FLAGS = ("-ffp-contract=off", "-fno-fast-math")


def supported(spec: ModelSpec, dtype: str) -> bool:
    """Each half of a head row is whole vectors (head_dim 64, 80, 96, 128 all are), and RoPE turns all of it (with
    partial rotary the cpu backend rotates in PyTorch)."""
    return (dtype in CPU_KERNEL_DTYPES and spec.head_dim % (2 * CPU_LANES) == 0
            and spec.rotary_dim == spec.head_dim)


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        "NUM_HEADS": spec.num_attention_heads,
        "NUM_KV_HEADS": spec.num_key_value_heads,
        "HEAD_DIM": spec.head_dim,
        "HALF_DIM": spec.head_dim // 2,
        "LANES": CPU_LANES,
        "PARALLEL_MIN_TOKENS": PARALLEL_MIN_TOKENS,
    }
    return constants, {"bf16": dtype == "bfloat16"}


KERNEL = Kernel("cpu_rope_kv_write", op="rope_kv_write", language=Language.CPP, render=render, applies=supported,
                compile_flags=COMPILE_FLAGS)
