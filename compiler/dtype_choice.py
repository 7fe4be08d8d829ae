"""--dtype auto: the weight dtype a build gets when the user names none, and why (torch-free, so it can be tested
on any machine with any CPU's flags)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from pllm.models.spec import DTYPES

# CPU flags (Linux /proc/cpuinfo) that mean bf16 dot products in hardware: x86's AVX512-BF16 (vdpbf16ps; Cooper
# Lake, Sapphire Rapids, Zen 4 on) and AMX-BF16 (Sapphire Rapids on); Arm's FEAT_BF16 (bfdot, bfmmla; Graviton 3,
# Neoverse V1/N2, Apple M2 on). oneDNN, which runs torch's bf16 matmuls, uses them directly. Without them a bf16
# matmul converts every operand to fp32 first (oneDNN's avx512_core path; on AVX2 the cpu backend widens both to
# fp32 itself): no faster arithmetic, so those CPUs keep fp32. (Measured on an AVX2-only EPYC since the backend
# widens: a bf16 build decodes 2.06x faster at batch 1, bytes-bound, 1.12x at 16, prefills level; README.)
NATIVE_BF16_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # one of models.spec.DTYPES
    reason: str  # said at compile time, so a user knows what --dtype auto did


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU listed in /proc/cpuinfo's text (x86 'flags', Arm 'Features')."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def host_cpu_flags() -> frozenset[str]:
    try:
        return cpu_flags(CPUINFO.read_text())
    except OSError:  # not Linux: no flags known, so no bf16 claimed
        return frozenset()


def choose_dtype(option: str, checkpoint_dtype: str, for_gpu: bool, machine: str | None = None,
                 flags: frozenset[str] | None = None) -> DtypeChoice:
    """An explicit dtype is kept. `auto`: a build for a GPU keeps the checkpoint's dtype; a build for this CPU gets
    bfloat16 where the CPU has bf16 dot products in hardware (the fast path: half the bytes per weight and the
    native instructions), else float32. float32 stays the choice for bit-level comparison with transformers."""
    if option != "auto":
        if option not in DTYPES:
            raise ValueError(f"--dtype {option!r}: must be auto or one of {', '.join(DTYPES)}")
        return DtypeChoice(option, "--dtype given")
    if for_gpu:
        return DtypeChoice(checkpoint_dtype, "auto: a GPU build keeps the checkpoint's dtype")
    machine = machine or platform.machine()
    flags = host_cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS.get(machine, ()) if f in flags]
    if native:
        return DtypeChoice("bfloat16", f"auto: this CPU has native bf16 arithmetic ({', '.join(native)}), the fast "
                                       "path; --dtype float32 matches transformers token for token")
    wanted = " or ".join(NATIVE_BF16_FLAGS.get(machine, ())) or "a known bf16 flag"
    return DtypeChoice("float32", f"auto: this {machine} CPU has no native bf16 arithmetic (no {wanted}), so "
                                  "float32: bf16 would be widened to fp32 for every matmul (--dtype bfloat16 still "
                                  "halves the bytes a decode step reads)")
