"""Numbers several kernels share: dtype names, padding to powers of two, head shapes, cpu vector width."""

from __future__ import annotations

from typing import Any

from pllm.models.spec import ModelSpec

# Each rendered module carries the torch dtype name and Triton's pointer type name for AOT signatures.
TRITON_TYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
CPU_LANES = 8  # fp32 lanes per vector in the cpu kernels: 32 bytes, one AVX2 register or two NEON ones
CPU_KERNEL_DTYPES = ("float32", "bfloat16")  # widening fp16 needs F16C/NEON intrinsics the templates do not use
# tl.dot takes no reduction dim under 16 on a GPU (Triton refuses "K >= 16" when it compiles): the attention kernels'
# head-dim tile pads (masked) at least this far, so a tiny checkpoint's head_dim 4 or 8 compiles too
MIN_DOT_K = 16


def next_power_of_2(n: int) -> int:
    assert n >= 1, n
    return 1 << (n - 1).bit_length()


def triton_dtype(dtype: str) -> dict[str, Any]:
    """The dtype constants every Triton template reads."""
    return {"DTYPE": dtype, "TL_DTYPE": TRITON_TYPE_NAMES[dtype]}


def head_shape(spec: ModelSpec) -> dict[str, Any]:
    """The attention heads as every template with attention reads them (Triton and C++)."""
    heads, kv_heads = spec.num_attention_heads, spec.num_key_value_heads
    if kv_heads < 1 or heads < 1 or heads % kv_heads:
        # GROUP_SIZE = heads // kv_heads would hand some query heads a KV head that does not exist
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}: the "
                         "attention kernels give every KV head the same number of query heads")
    return {
        "NUM_HEADS": spec.num_attention_heads,
        "NUM_KV_HEADS": spec.num_key_value_heads,
        "GROUP_SIZE": spec.group_size,
        "HEAD_DIM": spec.head_dim,
    }


def head_constants(spec: ModelSpec, dtype: str) -> dict[str, Any]:
    """The Triton attention templates' heads: head_shape, the dtype, and the head dim padded for tl.dot."""
    return {**triton_dtype(dtype), **head_shape(spec), "HEAD_DIM_PAD": max(MIN_DOT_K, next_power_of_2(spec.head_dim))}


def attention_quirks(spec: ModelSpec) -> tuple[dict[str, Any], dict[str, bool]]:
    """The attention constants and options every attention template reads: a window (windowed layers pick it at
    launch) and a score soft-cap, each present only when the model has it."""
    constants: dict[str, Any] = {}
    if spec.sliding_layers:
        constants["SLIDING_WINDOW"] = spec.sliding_window
    if spec.attn_logit_softcapping is not None:
        constants["SOFTCAP"] = spec.attn_logit_softcapping
    options = {"sliding_window": bool(spec.sliding_layers), "softcap": spec.attn_logit_softcapping is not None}
    return constants, options


def dot_precision(dtype: str) -> str:
    # fp32 builds promise greedy equality with Hugging Face in fp32: tf32 dots (10-bit mantissa) would break it
    return "ieee" if dtype == "float32" else "tf32"
