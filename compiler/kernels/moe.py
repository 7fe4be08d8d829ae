"""The Triton mixture-of-experts MLP: tokens grouped by expert, grouped gate_up (SiLU fused) and down matmuls."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import dot_precision, triton_dtype
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

# Rows of one expert's tile: an expert sees about T * K / E token rows (a handful while decoding), and every active
# expert pads its rows up to a multiple of BLOCK_M; 16 is tl.dot's smallest M, so padding wastes the least.
BLOCK_M = 16
BLOCK_N = 64  # output columns per tile: wide enough to reuse each loaded row of x, narrow enough for many tiles
BLOCK_K = 64
SUM_BLOCK = 128  # hidden columns per program of the top-k sum, a plain elementwise pass


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    moe = spec.moe
    assert moe is not None, "the moe kernel applies to mixture-of-experts models only"
    if spec.hidden_act != "silu":  # the template's experts (and the cpu backend's, cpu_moe.py) compute SiLU
        raise ValueError(f"hidden_act {spec.hidden_act!r}: the mixture-of-experts kernels compute SiLU experts only")
    constants = {
        **triton_dtype(dtype),
        "HIDDEN_SIZE": spec.hidden_size,
        "INTERMEDIATE_SIZE": moe.moe_intermediate_size,
        "NUM_EXPERTS": moe.num_experts,
        "TOP_K": moe.num_experts_per_tok,
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_K": BLOCK_K,
        "SUM_BLOCK": SUM_BLOCK,
        "DOT_PRECISION": dot_precision(dtype),
        "NUM_WARPS": 4,
    }
    options = {
        # the K loop of gate_up runs over hidden, the one of down over the expert width
        "mask_k_hidden": spec.hidden_size % BLOCK_K != 0,
        "mask_k_intermediate": moe.moe_intermediate_size % BLOCK_K != 0,
    }
    return constants, options


def _is_moe(spec: ModelSpec, dtype: str) -> bool:
    return spec.moe is not None


KERNEL = Kernel("moe", op="moe", language=Language.TRITON, render=render, applies=_is_moe)
