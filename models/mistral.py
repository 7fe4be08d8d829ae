"""Mistral: the llama wiring; a `sliding_window` shorter than the context windows every layer (transformers reads no
`use_sliding_window` key for mistral)."""

from __future__ import annotations

from pllm.models.llama import ConfigRules, llama_family
from pllm.models.windows import WindowRule

MISTRAL = llama_family(ConfigRules("mistral", attention_bias_always=False,
                                   window=WindowRule.EVERY_LAYER))
