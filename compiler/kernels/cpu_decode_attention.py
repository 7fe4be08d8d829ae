"""The C++ paged decode attention of the cpu backend: one query token per sequence, K/V read in place."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import CPU_KERNEL_DTYPES, CPU_LANES, attention_quirks, head_shape
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

PREFETCH_TOKENS = 16  # K/V rows requested this far ahead: ~2 tiles of compute hide DRAM


def supported(spec: ModelSpec, dtype: str) -> bool:
    """Whether the plan carries the cpu backend's compiled decode attention (block sizes are all multiples of 8)."""
    return dtype in CPU_KERNEL_DTYPES and spec.head_dim % CPU_LANES == 0


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        **head_shape(spec),
        "BLOCK_SIZE": block_size,
        "LANES": CPU_LANES,
        "PREFETCH_TOKENS": PREFETCH_TOKENS,
    }
    quirk_constants, quirk_options = attention_quirks(spec)
    options = {"bf16_cache": dtype == "bfloat16", **quirk_options}
    return {**constants, **quirk_constants}, {**options, "simd_bf16": simd_bf16(options)}


def simd_bf16(options: dict[str, bool]) -> bool:
    """Whether the kernel carries its AVX-512 BF16 code (chosen at load where the CPU has it): bf16 caches, no
    window, no soft-cap (the code also needs head rows of whole 32-element pairs and blocks of whole 16-token tiles,
    which the template checks)."""
    return options["bf16_cache"] and not options["sliding_window"] and not options["softcap"]


KERNEL = Kernel("cpu_decode_attention", op="decode_attention", language=Language.CPP, render=render,
                applies=supported)
