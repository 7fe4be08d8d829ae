"""The Triton per-head RMSNorm of q and k (models whose config asks for q/k norms)."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import head_constants
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec


def applies(spec: ModelSpec, dtype: str) -> bool:
    return spec.qk_norm


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    head = head_constants(spec, dtype)
    constants = {
        **{key: head[key] for key in ("DTYPE", "TL_DTYPE", "NUM_HEADS", "NUM_KV_HEADS", "HEAD_DIM", "HEAD_DIM_PAD")},
        "EPS": spec.rms_norm_eps,
        "NUM_WARPS": 1,  # one head row (<= 256 values) per program: one warp holds it
    }
    if spec.norm_weight_offset:
        constants["NORM_OFFSET"] = spec.norm_weight_offset
    options = {"mask_head_dim": head["HEAD_DIM_PAD"] != spec.head_dim, "weight_offset": bool(spec.norm_weight_offset)}
    return constants, options


KERNEL = Kernel("qk_norm", op="qk_norm", language=Language.TRITON, render=render, applies=applies)
