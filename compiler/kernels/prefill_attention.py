"""The Triton paged prefill attention: causal attention of prompt chunks (and mixed steps) over the KV cache."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import attention_quirks, dot_precision, head_constants, next_power_of_2
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

BLOCK_M = 64  # query rows (tokens x heads of one group) per prefill program
TILE_N = 64  # KV tokens per prefill iteration


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    head = head_constants(spec, dtype)
    group_pad = next_power_of_2(spec.group_size)
    # a program takes BLOCK_Q query tokens times all GROUP_PAD heads of one KV head: K/V tiles are loaded once
    # for the whole group, and the rows still fill a tensor-core tile
    block_q = max(1, BLOCK_M // group_pad)
    constants = {
        **head,
        "GROUP_PAD": group_pad,
        "BLOCK_Q": block_q,
        "BLOCK_M": block_q * group_pad,
        "BLOCK_SIZE": block_size,
        # head_dim > 128 would need more shared memory per stage than a 64-token tile leaves room for
        "TILE_N": TILE_N if head["HEAD_DIM_PAD"] <= 128 else TILE_N // 2,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": 4,
    }
    options = {"mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim, "mask_group": group_pad != spec.group_size}
    quirk_constants, quirk_options = attention_quirks(spec)
    return {**constants, **quirk_constants}, {**options, **quirk_options}


KERNEL = Kernel("prefill_attention", op="prefill_attention", language=Language.TRITON, render=render)
