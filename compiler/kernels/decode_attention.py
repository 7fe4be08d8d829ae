"""The Triton paged decode attention (flash-decoding: one query token per sequence, context split across programs)."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import attention_quirks, dot_precision, head_constants, next_power_of_2
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

# Reasoned defaults for Ampere/Hopper, not tuned results (the manifest records what each build was rendered with).
TILE_N = 64  # KV tokens per decode iteration: 64 tokens x 128 dims x 2 bytes = 16 KiB per K or V tile
MAX_NUM_SPLITS = 16  # flash-decoding: most context splits a decode program group may use
TARGET_PROGRAMS = 512  # enough decode programs to fill ~132 SMs about four times over
MIN_DOT_M = 16  # tl.dot needs M >= 16 on tensor cores: decode pads the GQA group up to it


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    head = head_constants(spec, dtype)
    constants = {
        **head,
        "GROUP_PAD": max(MIN_DOT_M, next_power_of_2(spec.group_size)),
        "BLOCK_SIZE": block_size,
        "TILE_N": max(TILE_N, block_size),
        "MAX_NUM_SPLITS": MAX_NUM_SPLITS,
        "TARGET_PROGRAMS": TARGET_PROGRAMS,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": 4,
        "REDUCE_NUM_WARPS": 1 if head["HEAD_DIM_PAD"] <= 64 else 2,
    }
    quirk_constants, quirk_options = attention_quirks(spec)
    return {**constants, **quirk_constants}, {"mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim, **quirk_options}


KERNEL = Kernel("decode_attention", op="decode_attention", language=Language.TRITON, render=render)
