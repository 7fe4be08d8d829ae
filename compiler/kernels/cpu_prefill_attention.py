"""The C++ paged causal attention of prompt chunks on the cpu backend: bf16 products by AVX-512 BF16, K/V read in
place (chosen at load where the CPU has the instructions; torch's SDPA elsewhere)."""

from __future__ import annotations

from typing import Any

from pllm.compiler.kernels.common import head_shape
from pllm.compiler.kernels.kernel import Kernel, Language
from pllm.models.spec import ModelSpec

# Queries of one sequence a work item takes (with one KV head): a 128-token prompt is 4 items a KV head, so 16 such
# prompts of a 3-KV-head model are 192 items to share out; each item lays out the keys its queries see once
QUERY_CHUNK = 32


def supported(spec: ModelSpec, dtype: str) -> bool:
    """bf16 caches, head rows of whole 32-element pairs, scores without a soft-cap (soft-capped models keep torch's
    SDPA for prompts); windowed layers take their window at each call."""
    return dtype == "bfloat16" and spec.head_dim % 32 == 0 and spec.attn_logit_softcapping is None


def render(spec: ModelSpec, dtype: str, block_size: int) -> tuple[dict[str, Any], dict[str, bool]]:
    constants = {
        **head_shape(spec),
        "BLOCK_SIZE": block_size,
        "QUERY_CHUNK": QUERY_CHUNK,
    }
    return constants, {}


KERNEL = Kernel("cpu_prefill_attention", op="prefill_attention", language=Language.CPP, render=render,
                applies=supported)
