"""The Multi-LoRA kernels (Punica's segmented shrink and expand): what both render with and when they apply.

A step's adapted tokens arrive grouped by adapter (models/lora.py LoraInputs): group g is a run of token rows all
under one adapter. Each kernel's grid is (row tiles of the largest group, column tiles, groups): a program loads its
group's adapter once and multiplies a tile of that group's rows by it, so every adapter's weight tile is read once
per row tile, not once per token, and tokens of the base model cost nothing.
"""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import dot_precision, triton_dtype
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.lora import LORA_FAMILIES, MAX_LORA_RANK, TARGETS
from pllm.models.spec import ModelSpec

BLOCK_M = 16  # rows per tile: decode steps hold a few tokens per adapter, and tl.dot needs at least 16
BLOCK_K = 64  # the shrink's reduction tile over the layer's input width (a masked tail covers any width)
SHRINK_BLOCK_N = 32  # rank columns per shrink tile: a fused target's n * R columns (up to 3 * 64) in a few tiles
EXPAND_BLOCK_N = 64  # output columns per expand tile: the output is wide (the layer's out features)
EXPAND_BLOCK_R = 32  # the expand's reduction tile over the rank columns
NUM_WARPS = 4


def applies(spec: ModelSpec, dtype: str) -> bool:
    """The llama-wiring families adapters are stacked for: every such build carries the kernels, so adapters given
    at serve time (--lora-modules) run on cuda without a rebuild."""
    return spec.model_type in LORA_FAMILIES and spec.moe is None


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    widest = max(len(modules) for modules in TARGETS.values())
    constants = {
        **triton_dtype(dtype),
        # the widest stacked rank a launch may see: qkv's three modules at the largest rank accepted
        "MAX_RANK_COLUMNS": widest * MAX_LORA_RANK,
        "BLOCK_M": BLOCK_M,
        "BLOCK_K": BLOCK_K,
        "SHRINK_BLOCK_N": SHRINK_BLOCK_N,
        "EXPAND_BLOCK_N": EXPAND_BLOCK_N,
        "EXPAND_BLOCK_R": EXPAND_BLOCK_R,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": NUM_WARPS,
    }
    return constants, {}


SHRINK = Kernel("lora_shrink", op="lora_shrink", language=Language.TRITON, render=render, applies=applies)
EXPAND = Kernel("lora_expand", op="lora_expand", language=Language.TRITON, render=render, applies=applies)
