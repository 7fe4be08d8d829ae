"""Qwen3-MoE: qwen3's attention (q/k norms) with top-k experts in the layers decoder_sparse_step and mlp_only_layers
leave sparse, the dense MLP in the others."""

from __future__ import annotations

import dataclasses
import re
from functools import partial

from pllm.models.config import ConfigError, get_value, positive
from pllm.models.family import ModelFamily
from pllm.models.llama import ConfigRules, llama_spec, weight_layout
from pllm.models.moe import ExpertNames, MoeModel, moe_weight_layout, read_top_k
from pllm.models.spec import ModelSpec, MoeSpec
from pllm.models.windows import WindowRule

# Unlike qwen3, Qwen3MoeConfig has no head_dim default of its own: an omitted head_dim is hidden / heads
RULES = ConfigRules("qwen3_moe", attention_bias_always=False, qk_norm=True,
                    attention_bias_refused=True, window=WindowRule.SWITCHED_EVERY_LAYER)
NAMES = ExpertNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")


def qwen3_moe_spec(config: dict, source: str) -> ModelSpec:
    spec = llama_spec(config, source, RULES)
    # transformers 5 writes the count as `num_local_experts` (its attribute_map alias); Qwen's configs `num_experts`
    key = "num_experts" if config.get("num_experts") is not None else "num_local_experts"
    if config.get(key) is None:
        raise ConfigError(f"{source}: missing required key 'num_experts'")
    num_experts = positive(config, key, source)
    num_layers = spec.num_hidden_layers
    step = positive(config, "decoder_sparse_step", source, 1)
    mlp_only = get_value(config, "mlp_only_layers", list, source, [])
    for layer in mlp_only:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ConfigError(
                f"{source}: key 'mlp_only_layers' must list layer indices in [0, num_hidden_layers={num_layers}), "
                f"got {layer!r}"
            )
    moe = MoeSpec(
        num_experts=num_experts,
        num_experts_per_tok=read_top_k(config, num_experts, source),
        moe_intermediate_size=positive(config, "moe_intermediate_size", source),
        norm_topk_prob=get_value(config, "norm_topk_prob", bool, source, False),
        round_router_weights=True,  # Qwen3MoeTopKRouter casts the top-k weights to the model dtype
        # transformers' Qwen3MoeDecoderLayer: sparse unless listed in mlp_only_layers, every step-th layer
        sparse_layers=tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0),
    )
    return dataclasses.replace(spec, moe=moe)


QWEN3_MOE = ModelFamily(
    model_type="qwen3_moe",
    spec_from_config=qwen3_moe_spec,
    weight_layout=partial(moe_weight_layout, dense_layout=weight_layout, names=NAMES),
    model=MoeModel,
    hf_layer_pattern=re.compile(r"model\.layers\.([0-9]+)\."),
    hf_embedding="model.embed_tokens.weight",
    tensor_parallel=True,
)
