"""ModelSpec + build options -> KernelPlan: each registered kernel that applies to the model, with its numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pllm.compiler.kernels import KERNELS, KernelSpec, Language
from pllm.compiler.kernels.common import next_power_of_2
from pllm.models.quant import QuantFormat
from pllm.models.spec import DTYPES, ModelSpec

# KV-cache tokens per block the kernels are written for (multiples of the cpu kernels' 8 lanes, and powers of two
# for Triton's tiles); pllm-compile offers exactly these.
BLOCK_SIZES = (8, 16, 32, 64, 128)

__all__ = ["BLOCK_SIZES", "KernelPlan", "KernelSpec", "make_plan", "next_power_of_2"]


@dataclass(frozen=True)
class KernelPlan:
    """Every kernel of one model build, in a fixed order (render order, manifest order)."""

    dtype: str  # activation and weight dtype, one of DTYPES
    block_size: int  # KV-cache tokens per block
    kernels: tuple[KernelSpec, ...]
    quant: QuantFormat | None = None  # the packed weights' principal format; None: float weights

    def kernel(self, name: str) -> KernelSpec:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"no kernel named {name!r} in the plan ({', '.join(k.name for k in self.kernels)})")

    def op_files(self, language: Language) -> dict[str, str]:
        """op -> file name of the plan's kernels in one language: what a backend binds (a build's manifest says the
        same through BuildManifest.kernels)."""
        return {k.op: k.file_name for k in self.kernels if k.language is language}

    def to_manifest(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "block_size": self.block_size,
            "kernels": {k.name: k.to_manifest() for k in self.kernels},
        }


def make_plan(spec: ModelSpec, dtype: str, block_size: int, quant: QuantFormat | None = None) -> KernelPlan:
    """Every registered kernel that applies to this model and dtype, specialised to it and the block size; the
    kernels that read packed weights (Kernel.quantized) only when the build keeps some (`quant`: their principal
    format)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported (supported: {BLOCK_SIZES})")
    kernels = tuple(
        k.spec(spec, dtype, block_size, quant) for k in KERNELS
        if spec.kind in k.kinds and (quant is not None or not k.quantized) and k.applies(spec, dtype)
    )
    return KernelPlan(dtype=dtype, block_size=block_size, kernels=kernels, quant=quant)
