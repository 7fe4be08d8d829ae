"""Hypothesis example counts, boundable from outside: tools/gpu_check.py runs the gpu-marked tests inside a short
device lease, where each new kernel shape costs a Triton compile, so it sets PLLM_MAX_EXAMPLES to cap every count."""

from __future__ import annotations

import os

ENV_VAR = "PLLM_MAX_EXAMPLES"


def examples(default: int) -> int:
    """`default`, or the cap PLLM_MAX_EXAMPLES names where that is smaller (a positive integer, else an error)."""
    cap = os.environ.get(ENV_VAR)
    if cap is None or cap == "":
        return default
    if not cap.isdigit() or int(cap) < 1:
        raise ValueError(f"{ENV_VAR}={cap!r}: must be a positive integer (the most hypothesis examples per test)")
    return min(default, int(cap))
