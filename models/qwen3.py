"""Qwen3: the llama wiring with an RMSNorm per q and k head before RoPE, and an explicit head_dim (128 if omitted)."""

from __future__ import annotations

from pllm.models.llama import ConfigRules, llama_family
from pllm.models.windows import WindowRule

QWEN3 = llama_family(ConfigRules("qwen3", attention_bias_always=False, qk_norm=True,
                                 default_head_dim=128, attention_bias_refused=True,
                                 window=WindowRule.SWITCHED_BY_LAYER_TYPE))
