"""The C++ residual add + RMSNorm of the cpu backend, for bfloat16 rows."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import CPU_LANES
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

PARALLEL_MIN_TOKENS = 64  # fewer rows than this: one thread (waking the others costs more than a row)


def supported(spec: ModelSpec, dtype: str) -> bool:
    """bfloat16 only: in float32 the PyTorch RMSNorm stays, bit for bit the one Hugging Face runs."""
    # Gemma's (1 + w) rounding is PyTorch's alone (the kernel rounds as Llama does)
    return dtype == "bfloat16" and spec.hidden_size % CPU_LANES == 0 and not spec.norm_weight_offset


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        "HIDDEN_SIZE": spec.hidden_size,
        "EPS": spec.rms_norm_eps,
        "LANES": CPU_LANES,
        "PARALLEL_MIN_TOKENS": PARALLEL_MIN_TOKENS,
    }
    return constants, {}


KERNEL = Kernel("cpu_rms_norm", op="rms_norm", language=Language.CPP, render=render, applies=supported)
