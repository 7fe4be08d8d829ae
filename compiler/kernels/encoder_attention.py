"""The Triton bidirectional attention of encoders: each sequence whole in the step, no KV cache."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import dot_precision, head_constants
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelKind, ModelSpec

BLOCK_M = 64  # query tokens per program: fills a tensor-core tile (one head per program, no GQA packing needed)
TILE_N = 64  # keys per iteration


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    head = head_constants(spec, dtype)
    constants = {
        **head,
        "BLOCK_M": BLOCK_M,
        # head_dim > 128 would need more shared memory per stage than a 64-key tile leaves room for
        "TILE_N": TILE_N if head["HEAD_DIM_PAD"] <= 128 else TILE_N // 2,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": 4,
    }
    return constants, {"mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim}


KERNEL = Kernel("encoder_attention", op="encoder_attention", language=Language.TRITON, render=render,
                kinds=frozenset({ModelKind.ENCODER}))
