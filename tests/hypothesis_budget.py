"""Hypothesis example counts, boundable from outside: tools/gpu_check.py runs the gpu-marked tests inside a short
device lease, where each new kernel shape costs a Triton compile, so it sets PLLM_MAX_EXAMPLES to cap every count."""

from __future__ import annotations

import os

from hypothesis import Phase, settings

ENV_VAR = "PLLM_MAX_EXAMPLES"
PROFILE = "pllm-bounded"


def _cap() -> int | None:
    cap = os.environ.get(ENV_VAR)
    if cap is None or cap == "":
        return None
    if not cap.isdigit() or int(cap) < 1:
        raise ValueError(f"{ENV_VAR}={cap!r}: must be a positive integer (the most hypothesis examples per test)")
    return int(cap)


def examples(default: int) -> int:
    """`default`, or the cap PLLM_MAX_EXAMPLES names where that is smaller."""
    cap = _cap()
    return default if cap is None else min(default, cap)


def load_bounded_profile() -> None:
    """Under a cap, a failing example is reported as found, not shrunk: shrinking compiles a kernel per try and
    would outlast the lease. Called from tests/conftest.py, before any test module builds its settings."""
    if _cap() is not None:
        settings.register_profile(PROFILE, phases=(Phase.explicit, Phase.reuse, Phase.generate))
        settings.load_profile(PROFILE)
