"""Phi3: the llama wiring over Hugging Face's fused qkv_proj and gate_up_proj, with partial rotary and longrope."""

from __future__ import annotations

import dataclasses
import math
import re

from pllm.models.config import ConfigError, finite_positive, get_value, original_length, rope_parameter
from pllm.models.family import ModelFamily, RuntimeTensor
from pllm.models.llama import ConfigRules, LlamaModel, llama_spec
from pllm.models.llama import weight_layout as llama_layout
from pllm.models.spec import ModelSpec, RopeScaling
from pllm.models.windows import WindowRule

# Phi3 configs name a window that transformers applies whenever it is set (no use_sliding_window key); Phi3 has no
# qkv bias (a stray attention_bias key would otherwise add one).
RULES = ConfigRules("phi3", attention_bias_always=False, attention_bias_refused=True,
                    window=WindowRule.EVERY_LAYER)
# rope types Phi3Config accepts; it renames the "su" and "yarn" of older Phi-3 configs to longrope
ROPE_TYPES = {"default": None, "longrope": "longrope", "su": "longrope", "yarn": "longrope"}
# Phi3Config's declared original_max_position_embeddings: transformers 5 takes it over the rope block's when
# config.json gives none (standardize_rope_params prefers the attribute, and the class always has one)
PHI3_ORIGINAL_MAX_POSITION_EMBEDDINGS = 4096


def phi3_spec(config: dict, source: str) -> ModelSpec:
    """Validate a Phi3 config dict: the llama rules, then partial rotary and the rope scaling Phi3 knows."""
    rope_parameters = get_value(config, "rope_parameters", dict, source, {})
    scaling = config.get("rope_scaling") or rope_parameters
    if not isinstance(scaling, dict):
        raise ConfigError(f"{source}: key 'rope_scaling' must be an object or null, got {scaling!r}")
    # the llama rules read theta only, from the block transformers reads (rope_scaling when given, which drops
    # rope_parameters whole); scaling is Phi3's own (llama's reader refuses longrope)
    theta = {"rope_type": "default", **{k: v for k, v in scaling.items() if k == "rope_theta"}}
    spec = llama_spec({**config, "rope_scaling": None, "rope_parameters": theta}, source, RULES)

    factor = rope_parameter(config, "partial_rotary_factor", _number, source, 1.0)
    rotary_dim = int(spec.head_dim * factor)
    if not 0 < factor <= 1 or rotary_dim < 2 or rotary_dim % 2:
        raise ConfigError(f"{source}: key 'partial_rotary_factor' is {factor!r}: it must be in (0, 1] and turn an "
                          f"even number of head dims (head_dim {spec.head_dim} -> {rotary_dim})")
    spec = dataclasses.replace(spec, partial_rotary_factor=float(factor))
    return dataclasses.replace(spec, rope_scaling=_rope_scaling(config, scaling, spec, source))


def _number(config: dict, key: str, source: str, default: float | None) -> float | None:
    return get_value(config, key, (int, float), source, default)


def _rope_scaling(config: dict, rs: dict, spec: ModelSpec, source: str) -> RopeScaling | None:
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported for phi3 (supported: "
                          f"{', '.join(ROPE_TYPES)})")
    if ROPE_TYPES[rope_type] is None:
        return None
    where = f"{source}: longrope rope_scaling"
    original = original_length(config, rs, source, where, PHI3_ORIGINAL_MAX_POSITION_EMBEDDINGS)
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = get_value(rs, key, list, where)
        if len(values) != spec.rotary_dim // 2 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in values
        ):
            raise ConfigError(f"{where}: key '{key}' must list {spec.rotary_dim // 2} finite positive numbers (one "
                              f"per rotary frequency), got {values!r}")
        factors[key] = tuple(float(x) for x in values)
    # transformers' _compute_longrope_parameters: factor defaults to max_position_embeddings / original, and the
    # attention factor (on cos and sin) to sqrt(1 + ln(factor) / ln(original)), 1 when factor <= 1
    factor = finite_positive(rs, "factor", where, spec.max_position_embeddings / original)
    attention_factor = finite_positive(rs, "attention_factor", where, None)
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling("longrope", factor, original_max_position_embeddings=original,
                       attention_factor=attention_factor, **factors)


def weight_layout(spec: ModelSpec) -> dict[str, RuntimeTensor]:
    """The llama runtime layout; its fused qkv_proj and gate_up_proj are Phi3's own tensors, already fused (q, k, v
    rows and gate, up rows in the runtime's order)."""
    layout = llama_layout(spec)
    for i in range(spec.num_hidden_layers):
        hf, rt = f"model.layers.{i}.", f"layers.{i}."
        layout[rt + "qkv_proj"] = RuntimeTensor((hf + "self_attn.qkv_proj.weight",), layout[rt + "qkv_proj"].shape)
        layout[rt + "gate_up_proj"] = RuntimeTensor((hf + "mlp.gate_up_proj.weight",),
                                                    layout[rt + "gate_up_proj"].shape)
    return layout


PHI3 = ModelFamily(
    model_type="phi3",
    spec_from_config=phi3_spec,
    weight_layout=weight_layout,
    model=LlamaModel,
    hf_layer_pattern=re.compile(r"model\.layers\.([0-9]+)\."),
    hf_embedding="model.embed_tokens.weight",
)
