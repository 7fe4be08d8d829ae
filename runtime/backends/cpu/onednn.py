"""What oneDNN offers the cpu backend on this CPU: whether it packs bf16 linear weights for its bf16 GEMM."""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("pllm")

HAS_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether oneDNN packs bf16 linear weights on this CPU: its bf16 path needs AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT, and says so only by raising (an AVX2-only CPU, e.g. AMD Zen 3, has neither). Asked once, on a
    small weight. Without it the cpu backend's bf16 float GEMMs run F.linear widened to fp32 (cpu_linear.py), and
    the compiled decode step takes bigger batches (cpu_decode_step.compiled_batch_limit)."""
    if not HAS_ONEDNN_LINEAR:
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(64, 64, dtype=torch.bfloat16), 64)
    except RuntimeError as e:
        logger.info("cpu backend: bf16 linears use F.linear, not oneDNN's packed weights (%s)", e)
        return False
    return True
