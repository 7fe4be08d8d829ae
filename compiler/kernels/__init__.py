"""The kernel registry: every kernel pllm can build, in plan order (render order, manifest order)."""

from __future__ import annotations

from pllm.compiler.kernels import (
    cpu_decode_attention,
    cpu_decode_step,
    cpu_prefill_attention,
    cpu_quant_linear,
    cpu_rms_norm,
    cpu_rope_kv_write,
    decode_attention,
    encoder_attention,
    layer_norm,
    lora,
    mlp,
    moe,
    prefill_attention,
    qk_norm,
    quant_matmul,
    rms_norm,
    rope_kv_write,
)
from pllm.compiler.kernels.kernel import Kernel, KernelSpec, Language

KERNELS: tuple[Kernel, ...] = (
    rms_norm.KERNEL,
    qk_norm.KERNEL,
    rope_kv_write.KERNEL,
    decode_attention.KERNEL,
    prefill_attention.KERNEL,
    mlp.KERNEL,
    quant_matmul.KERNEL,  # quantised builds only
    moe.KERNEL,
    lora.SHRINK,
    lora.EXPAND,
    cpu_decode_attention.KERNEL,
    cpu_prefill_attention.KERNEL,
    cpu_rms_norm.KERNEL,
    cpu_rope_kv_write.KERNEL,
    cpu_quant_linear.KERNEL,
    cpu_decode_step.KERNEL,
    # encoders
    layer_norm.KERNEL,
    encoder_attention.KERNEL,
)

__all__ = ["KERNELS", "Kernel", "KernelSpec", "Language"]
