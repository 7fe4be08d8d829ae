"""Qwen2: the llama wiring with a bias on the q, k and v projections, whatever the config says."""

from __future__ import annotations

from pllm.models.llama import ConfigRules, llama_family
from pllm.models.windows import WindowRule

QWEN2 = llama_family(ConfigRules("qwen2", attention_bias_always=True,
                                window=WindowRule.SWITCHED_BY_LAYER_TYPE))
