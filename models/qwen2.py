"""Qwen2: the llama wiring with a bias on the q, k and v projections, whatever the config says."""

from __future__ import annotations

from pllm.models.llama import ConfigRules, llama_family

QWEN2 = llama_family(ConfigRules("qwen2", sliding_window_by_default=False, attention_bias_always=True,
                                windows_by_layer_type=True))
