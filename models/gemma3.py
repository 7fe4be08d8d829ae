"""Gemma 3 (gemma3_text, and the text part of gemma3 checkpoints): config rules, weight layout and forward pass."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from pllm.models.config import (
    MAX_POSITION_EMBEDDINGS,
    ConfigError,
    eos_token_ids,
    finite_positive,
    get_value,
    positive,
    rope_scaling,
    token_id,
)
from pllm.models.family import ModelFamily, RuntimeTensor, lm_head_weight
from pllm.models.ops import ACTIVATIONS, AttentionMetadata, Ops
from pllm.models.rotary import rope_cos_sin
from pllm.models.spec import DTYPES, ModelSpec, RopeScaling

# Gemma3TextConfig's defaults: checkpoint configs leave out the keys that hold them, and transformers fills them in.
TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,  # every 6th layer global, when the config has no layer_types
    "rope_theta": 1_000_000.0,  # global layers
    "rope_local_base_freq": 10_000.0,  # windowed layers
    "bos_token_id": 2,
    "eos_token_id": 1,
}
LAYER_TYPES = ("sliding_attention", "full_attention")  # transformers' names, as config.json spells them
NORM_WEIGHT_OFFSET = 1.0  # Gemma's RMSNorm multiplies by (1 + w)


def gemma3_text_spec(config: dict, source: str, model_type: str = "gemma3_text") -> ModelSpec:
    """Validate a Gemma3TextConfig dict and derive the ModelSpec; errors name the key and the file."""
    # An explicit null stays null: get_value() refuses it where Gemma3TextConfig's typed field does (sliding_window,
    # query_pre_attn_scalar, rms_norm_eps, ...) and reads it as "off" where the field is optional.
    c = {**TEXT_DEFAULTS, **config}
    hidden = positive(c, "hidden_size", source)
    num_heads = positive(c, "num_attention_heads", source)
    num_kv = positive(c, "num_key_value_heads", source)
    if num_heads % num_kv:
        raise ConfigError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv})"
        )
    head_dim = positive(c, "head_dim", source)
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings")
    max_pos = positive(c, "max_position_embeddings", source)
    if max_pos > MAX_POSITION_EMBEDDINGS:
        raise ConfigError(
            f"{source}: key 'max_position_embeddings' is {max_pos}; pllm supports at most {MAX_POSITION_EMBEDDINGS}"
        )
    num_layers = positive(c, "num_hidden_layers", source)
    dtype = c.get("torch_dtype", c.get("dtype", "float32")) or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: key 'torch_dtype' is {dtype!r}; supported: {', '.join(DTYPES)}")
    act = get_value(c, "hidden_activation", str, source)
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    # use_bidirectional_attention is `bool | None` in Gemma3TextConfig (null: off); attention_bias a plain bool
    for key, default in (("attention_bias", False), ("use_bidirectional_attention", None)):
        if get_value(c, key, bool, source, default):
            raise ConfigError(f"{source}: {key}=true is not supported")
    vocab_size = positive(c, "vocab_size", source)
    bos = c.get("bos_token_id")
    global_theta, local_theta, scaling = _rope(c, source)
    sliding_layers = _sliding_layers(c, num_layers, source)
    # a null window is refused (transformers fails to build the mask) unless no layer slides
    window = positive(c, "sliding_window", source, ... if sliding_layers else None)
    return ModelSpec(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=positive(c, "intermediate_size", source),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        vocab_size=vocab_size,
        rms_norm_eps=finite_positive(c, "rms_norm_eps", source),
        rope_theta=global_theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=get_value(c, "tie_word_embeddings", bool, source),
        attention_bias=False,
        torch_dtype=dtype,
        bos_token_id=None if bos is None else token_id(bos, "bos_token_id", vocab_size, source),
        eos_token_ids=eos_token_ids(c, vocab_size, source),
        hidden_act=act,
        norm_weight_offset=NORM_WEIGHT_OFFSET,
        qk_norm=True,
        query_pre_attn_scalar=finite_positive(c, "query_pre_attn_scalar", source),
        attn_logit_softcapping=finite_positive(c, "attn_logit_softcapping", source, None),
        final_logit_softcapping=finite_positive(c, "final_logit_softcapping", source, None),
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_local_theta=local_theta,
    )


def gemma3_spec(config: dict, source: str) -> ModelSpec:
    """Gemma3ForConditionalGeneration: the text model in `text_config`; the vision tower is not read."""
    text = get_value(config, "text_config", dict, source)
    # token ids may sit at the top level (transformers reads them from there for generation)
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
    dtype = {k: config[k] for k in ("torch_dtype", "dtype") if config.get(k) is not None}
    return gemma3_text_spec({**dtype, **text, **ids}, f"{source}: text_config", model_type="gemma3")


def _sliding_layers(c: dict, num_layers: int, source: str) -> tuple[int, ...]:
    types = c.get("layer_types")
    if types is None:
        pattern = positive(c, "sliding_window_pattern", source)
        return tuple(i for i in range(num_layers) if (i + 1) % pattern)
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(
            f"{source}: key 'layer_types' must list one of {', '.join(LAYER_TYPES)} per layer "
            f"(num_hidden_layers={num_layers}), got {types!r}"
        )
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _rope(c: dict, source: str) -> tuple[float, float, RopeScaling | None]:
    """(global theta, local theta, global scaling), read as Gemma3TextConfig.convert_rope_params_to_dict does:
    transformers 5's `rope_parameters` per layer type (each {"rope_type": "default"} when absent or null), the older
    top-level `rope_scaling` merged over its full_attention entry, and the top-level `rope_theta` /
    `rope_local_base_freq` (or the class defaults) for an entry that gives no theta."""
    params = c.get("rope_parameters")
    where = f"{source}: rope_parameters"
    if params is None:
        params = {}
    elif not isinstance(params, dict) or not params or not set(params) <= set(LAYER_TYPES):
        raise ConfigError(f"{where}: must map layer types ({', '.join(LAYER_TYPES)}) to their RoPE parameters, "
                          f"got {params!r}")
    full = get_value(params, "full_attention", dict, where, None) or {"rope_type": "default"}
    local = get_value(params, "sliding_attention", dict, where, None) or {"rope_type": "default"}
    legacy = c.get("rope_scaling")
    if legacy is not None:
        if not isinstance(legacy, dict):
            raise ConfigError(f"{source}: key 'rope_scaling' must be an object or null, got {legacy!r}")
        if "rope_type" not in legacy and legacy.get("type", "default") != "default" and "rope_type" in full:
            # transformers merges it over {"rope_type": "default", ...}, so the `type` spelling is ignored and no
            # scaling applied; the config says otherwise, so it is refused rather than run either way in silence
            raise ConfigError(f"{source}: key 'rope_scaling' is {legacy!r}: for gemma3, transformers 5 ignores the "
                              f"legacy 'type' spelling (it keeps rope_type {full['rope_type']!r} and applies no "
                              "scaling); spell it 'rope_type'")
        full = {**full, **legacy}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ConfigError(f"{where}: sliding_attention rope_type {local.get('rope_type')!r} is not supported "
                          "(only 'default')")
    global_theta = _theta(full, c, "rope_theta", f"{where}.full_attention", source)
    local_theta = _theta(local, c, "rope_local_base_freq", f"{where}.sliding_attention", source)
    return global_theta, local_theta, _global_scaling(full, f"{where}.full_attention")


def _theta(entry: dict, c: dict, top_key: str, where: str, source: str) -> float:
    """An entry's rope_theta, else the top-level key's (transformers' setdefault: a top-level null becomes the theta,
    and the model fails to build, so it is refused here)."""
    if "rope_theta" in entry:
        return finite_positive(entry, "rope_theta", where)
    return finite_positive(c, top_key, source)


def _global_scaling(params: dict, source: str) -> RopeScaling | None:
    """The global layers' RoPE scaling: none, or linear (Gemma 3's 4B and larger); others are refused."""
    scaling = rope_scaling({"rope_scaling": params}, source)
    if scaling is not None and scaling.rope_type != "linear":
        raise ConfigError(f"{source}: rope_type {scaling.rope_type!r} is not supported for gemma3 (only 'default' "
                          "and 'linear')")
    return scaling


def weight_layout(spec: ModelSpec, prefix: str, lm_head: str) -> dict[str, RuntimeTensor]:
    """Runtime tensor name -> the Hugging Face tensors it is made of (under `prefix`), and its shape."""
    h, q, kv, inter, d = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size, spec.head_dim
    layout = {
        "embed_tokens": RuntimeTensor((prefix + "embed_tokens.weight",), (spec.vocab_size, h)),
        "norm": RuntimeTensor((prefix + "norm.weight",), (h,)),
    }
    if not spec.tie_word_embeddings:
        layout["lm_head"] = RuntimeTensor((lm_head,), (spec.vocab_size, h))
    for i in range(spec.num_hidden_layers):
        hf, rt = f"{prefix}layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            layout[rt + norm] = RuntimeTensor((hf + norm + ".weight",), (h,))
        layout[rt + "qkv_proj"] = RuntimeTensor(
            (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), (q + 2 * kv, h)
        )
        layout[rt + "q_norm"] = RuntimeTensor((attn + "q_norm.weight",), (d,))
        layout[rt + "k_norm"] = RuntimeTensor((attn + "k_norm.weight",), (d,))
        layout[rt + "o_proj"] = RuntimeTensor((attn + "o_proj.weight",), (h, q))
        layout[rt + "gate_up_proj"] = RuntimeTensor(
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), (2 * inter, h)
        )
        layout[rt + "down_proj"] = RuntimeTensor((hf + "mlp.down_proj.weight",), (h, inter))
    return layout


@dataclass(frozen=True)
class Gemma3LayerWeights:
    """One decoder layer's runtime tensors and its attention kind, looked up once when the model is built."""

    input_norm: torch.Tensor  # [hidden], all norms hold w of (1 + w)
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden], q rows first, then k, then v
    q_norm: torch.Tensor  # [head_dim]
    k_norm: torch.Tensor  # [head_dim]
    o: torch.Tensor  # [hidden, q_size]
    post_attn_norm: torch.Tensor  # [hidden]
    pre_mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden], gate rows first
    down: torch.Tensor  # [hidden, intermediate]
    post_mlp_norm: torch.Tensor  # [hidden]
    window: int | None  # the layer's sliding window, None for a global layer

    @classmethod
    def from_tensors(cls, weights: dict[str, torch.Tensor], spec: ModelSpec, i: int) -> Gemma3LayerWeights:
        p = f"layers.{i}."
        return cls(
            input_norm=weights[p + "input_layernorm"],
            qkv=weights[p + "qkv_proj"],
            q_norm=weights[p + "q_norm"],
            k_norm=weights[p + "k_norm"],
            o=weights[p + "o_proj"],
            post_attn_norm=weights[p + "post_attention_layernorm"],
            pre_mlp_norm=weights[p + "pre_feedforward_layernorm"],
            gate_up=weights[p + "gate_up_proj"],
            down=weights[p + "down_proj"],
            post_mlp_norm=weights[p + "post_feedforward_layernorm"],
            window=spec.layer_window(i),
        )


class Gemma3Model:
    """Holds the weights; forward() is the math, each step through `ops`, with no device or batching logic."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], ops: Ops, max_positions: int):
        self.spec = spec
        self.w = weights
        self.layers = [Gemma3LayerWeights.from_tensors(weights, spec, i) for i in range(spec.num_hidden_layers)]
        self.ops = ops
        device = weights["embed_tokens"].device
        self.cos_sin = rope_cos_sin(spec, max_positions).to(device)  # global layers
        local = dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_scaling=None)
        self.local_cos_sin = rope_cos_sin(local, max_positions).to(device)
        # sqrt(hidden) rounded to the model's dtype first, as transformers scales the embeddings
        self.embed_scale = torch.tensor(spec.hidden_size**0.5).to(weights["embed_tokens"].dtype)
        self.lm_head = lm_head_weight(spec, weights)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        metas: Sequence[AttentionMetadata],  # [num_layers]: each layer's KV group's (windowed or global pool)
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [num_blocks, block_size, kv, d]
    ) -> torch.Tensor:  # [num_tokens, hidden_size], after the final norm
        spec, ops, eps, offset = self.spec, self.ops, self.spec.rms_norm_eps, self.spec.norm_weight_offset
        num_tokens = input_ids.shape[0]
        q_size, kv_size = spec.q_size, spec.kv_size
        x = F.embedding(input_ids, self.w["embed_tokens"]) * self.embed_scale  # [num_tokens, hidden]
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = ops.rms_norm(x, layer.input_norm, eps, residual, offset)
            qkv = ops.linear(h, layer.qkv)  # [num_tokens, q + 2 * kv]
            q = qkv[:, :q_size].view(num_tokens, spec.num_attention_heads, spec.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            v = qkv[:, q_size + kv_size :].view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            q, k = ops.qk_norm(q, k, layer.q_norm, layer.k_norm, eps, offset)
            cos_sin = self.cos_sin if layer.window is None else self.local_cos_sin
            k_cache, v_cache, meta = *kv_caches[i], metas[i]
            q, k = ops.rope_kv_write(q, k, v, meta.positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
            attn = ops.attention(q, k_cache, v_cache, meta, spec.attention_scale, layer.window,
                                 spec.attn_logit_softcapping)  # [num_tokens, heads, head_dim]
            x = ops.linear(attn.reshape(num_tokens, q_size), layer.o)
            x, _ = ops.rms_norm(x, layer.post_attn_norm, eps, None, offset)
            h, residual = ops.rms_norm(x, layer.pre_mlp_norm, eps, residual, offset)
            x = ops.mlp(h, layer.gate_up, layer.down, spec.hidden_act)
            x, _ = ops.rms_norm(x, layer.post_mlp_norm, eps, None, offset)
        x, _ = ops.rms_norm(x, self.w["norm"], eps, residual, offset)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_seqs, hidden_size] -> [num_seqs, vocab_size] float32, soft-capped when the config says so."""
        logits = self.ops.linear(hidden, self.lm_head)
        cap = self.spec.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap  # in the model's dtype, as transformers does
        return logits.float()


GEMMA3_TEXT = ModelFamily(
    model_type="gemma3_text",
    spec_from_config=gemma3_text_spec,
    weight_layout=partial(weight_layout, prefix="model.", lm_head="lm_head.weight"),
    model=Gemma3Model,
    hf_layer_pattern=re.compile(r"model\.layers\.([0-9]+)\."),
    hf_embedding="model.embed_tokens.weight",
)

# The text part of a Gemma3ForConditionalGeneration checkpoint, under the names transformers writes; the vision
# tower and the multimodal projector are left out of the build (no layout entry reads them).
GEMMA3 = ModelFamily(
    model_type="gemma3",
    spec_from_config=gemma3_spec,
    weight_layout=partial(weight_layout, prefix="language_model.model.", lm_head="language_model.lm_head.weight"),
    model=Gemma3Model,
    hf_layer_pattern=re.compile(r"language_model\.model\.layers\.([0-9]+)\."),
    hf_embedding="language_model.model.embed_tokens.weight",
)
