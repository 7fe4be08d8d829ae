"""The Triton per-head RMSNorm of q and k (qwen3, gemma3): in the plan only for models with q/k norms."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import head_constants, next_power_of_2
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec


def applies(spec: ModelSpec, dtype: str) -> bool:
    return spec.qk_norm


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    head = head_constants(spec, dtype)
    constants = {
        **head,
        "NUM_HEADS_PAD": next_power_of_2(spec.num_attention_heads),
        "NUM_KV_HEADS_PAD": next_power_of_2(spec.num_key_value_heads),
        "EPS": spec.rms_norm_eps,
        "NORM_OFFSET": float(spec.norm_weight_offset),
        # one token's heads per program (32 heads x 128 dims = 4096 values): 4 warps hold it without spilling
        "NUM_WARPS": 4,
    }
    options = {
        "mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim,
        # gemma's (1 + w) norm multiplies in fp32 and rounds once; llama-style norms round before the multiply
        "weight_in_fp32": spec.norm_weight_offset != 0.0,
    }
    return constants, options


KERNEL = Kernel("qk_norm", op="qk_norm", language=Language.TRITON, render=render, applies=applies)
