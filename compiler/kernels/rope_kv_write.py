"""The Triton rotary-embedding kernel that also writes k and v into the paged KV cache."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import head_constants, next_power_of_2
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    if spec.head_dim % 2:
        # the kernel moves each head as two halves of head_dim // 2: an odd head_dim's last dim would never be written
        raise ValueError(f"head_dim {spec.head_dim} is odd: rope_kv_write rotates and copies heads in two halves")
    if spec.rotary_dim < 2 or spec.rotary_dim % 2:
        raise ValueError(f"rotary_dim {spec.rotary_dim} (head_dim {spec.head_dim} x partial_rotary_factor "
                         f"{spec.partial_rotary_factor}): rotate-half RoPE needs an even count of at least 2")
    half = spec.head_dim // 2
    rotary_half = spec.rotary_dim // 2
    pass_dim = spec.head_dim - spec.rotary_dim
    constants = {
        **head_constants(spec, dtype),
        "HALF_DIM": half,
        "HALF_DIM_PAD": next_power_of_2(half),
        "ROTARY_DIM": spec.rotary_dim,
        "ROTARY_HALF": rotary_half,
        "ROTARY_HALF_PAD": next_power_of_2(rotary_half),
        # the pass-through tile of partial rotary (1 when there is none: the template then never reads it)
        "PASS_DIM_PAD": next_power_of_2(max(pass_dim, 1)),
        "NUM_HEADS_PAD": next_power_of_2(spec.num_attention_heads),
        "NUM_KV_HEADS_PAD": next_power_of_2(spec.num_key_value_heads),
        "BLOCK_SIZE": block_size,
        "NUM_WARPS": 4,
    }
    options = {
        "mask_half_dim": next_power_of_2(half) != half,
        "mask_rotary_half": next_power_of_2(rotary_half) != rotary_half,
        "partial_rotary": pass_dim > 0,
    }
    return constants, options


KERNEL = Kernel("rope_kv_write", op="rope_kv_write", language=Language.TRITON, render=render)
