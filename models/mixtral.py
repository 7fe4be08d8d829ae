"""Mixtral: the llama attention (a sliding window on every layer, as transformers applies it) and a top-k of N
experts MLP."""

from __future__ import annotations

import dataclasses
import re
from functools import partial

from pllm.models.config import positive
from pllm.models.family import ModelFamily
from pllm.models.llama import ConfigRules, llama_spec, weight_layout
from pllm.models.moe import ExpertNames, MoeModel, moe_weight_layout, read_top_k
from pllm.models.spec import ModelSpec, MoeSpec
from pllm.models.windows import WindowRule

# Mixtral applies `sliding_window` whenever it is set: no `use_sliding_window` key switches it off (none is read)
# MixtralConfig's default_theta is 1e6 (the other llama-wired families' 1e4)
RULES = ConfigRules("mixtral", attention_bias_always=False, window=WindowRule.EVERY_LAYER, default_rope_theta=1e6)
NAMES = ExpertNames(block="block_sparse_moe", gate="w1", up="w3", down="w2")


def mixtral_spec(config: dict, source: str) -> ModelSpec:
    spec = llama_spec(config, source, RULES)
    num_experts = positive(config, "num_local_experts", source)
    moe = MoeSpec(
        num_experts=num_experts,
        num_experts_per_tok=read_top_k(config, num_experts, source),
        moe_intermediate_size=spec.intermediate_size,  # every MLP is sparse, its experts `intermediate_size` wide
        norm_topk_prob=True,  # transformers' MixtralTopKRouter always renormalises the top-k
        round_router_weights=False,  # and weights the experts' outputs with the float32 probabilities
        sparse_layers=tuple(range(spec.num_hidden_layers)),
    )
    return dataclasses.replace(spec, moe=moe)


MIXTRAL = ModelFamily(
    model_type="mixtral",
    spec_from_config=mixtral_spec,
    weight_layout=partial(moe_weight_layout, dense_layout=weight_layout, names=NAMES),
    model=MoeModel,
    hf_layer_pattern=re.compile(r"model\.layers\.([0-9]+)\."),
    hf_embedding="model.embed_tokens.weight",
    tensor_parallel=True,
)
