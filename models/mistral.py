"""Mistral: the llama wiring; its configs mean a sliding window (on every layer) unless `use_sliding_window` says
otherwise."""

from __future__ import annotations

from pllm.models.llama import ConfigRules, llama_family

MISTRAL = llama_family(ConfigRules("mistral", sliding_window_by_default=True, attention_bias_always=False,
                                   every_layer_windowed=True))
