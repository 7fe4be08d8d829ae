"""The Triton RMSNorm kernel (optionally fused with the residual add): one row per program."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import next_power_of_2, triton_dtype
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    block_h = next_power_of_2(spec.hidden_size)
    constants = {
        **triton_dtype(dtype),
        "HIDDEN_SIZE": spec.hidden_size,
        "BLOCK_H": block_h,
        "EPS": spec.rms_norm_eps,
        # one row per program: ~8 elements per thread keeps loads vectorised without spilling
        "NUM_WARPS": max(1, min(16, block_h // 256)),
    }
    if spec.norm_weight_offset:
        constants["NORM_OFFSET"] = spec.norm_weight_offset
    return constants, {"mask_hidden": block_h != spec.hidden_size, "weight_offset": bool(spec.norm_weight_offset)}


KERNEL = Kernel("rms_norm", op="rms_norm", language=Language.TRITON, render=render)
