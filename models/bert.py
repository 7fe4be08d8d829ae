"""BERT encoders (and the sentence-transformers checkpoints built on them): config rules, weights, forward."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pllm.models.config import MAX_POSITION_EMBEDDINGS, ConfigError, finite_positive, get_value, positive
from pllm.models.family import ModelFamily, RuntimeTensor
from pllm.models.ops import AttentionMetadata, Ops
from pllm.models.spec import DTYPES, ModelKind, ModelSpec

# Config values that change BERT's math in ways this wiring does not implement: refused, never ignored.
SUPPORTED_ACTS = ("gelu",)  # transformers' "gelu" is the exact (erf) GELU
SUPPORTED_POSITION_EMBEDDINGS = ("absolute",)


def bert_spec(config: dict, source: str) -> ModelSpec:
    """Validate a BertConfig dict and derive the ModelSpec; errors name the key and the file."""
    hidden = positive(config, "hidden_size", source)
    num_heads = positive(config, "num_attention_heads", source)
    if hidden % num_heads:
        raise ConfigError(
            f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({num_heads})"
        )
    act = config.get("hidden_act", "gelu")
    if act not in SUPPORTED_ACTS:
        raise ConfigError(
            f"{source}: hidden_act {act!r} is not supported for bert (supported: {', '.join(SUPPORTED_ACTS)})"
        )
    position = config.get("position_embedding_type", "absolute")
    if position not in SUPPORTED_POSITION_EMBEDDINGS:
        raise ConfigError(
            f"{source}: position_embedding_type {position!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_POSITION_EMBEDDINGS)})"
        )
    for key in ("is_decoder", "add_cross_attention"):
        if get_value(config, key, bool, source, False):
            raise ConfigError(f"{source}: {key}=true is not supported; pllm serves BERT as a bidirectional encoder")
    max_pos = positive(config, "max_position_embeddings", source, 512)
    if max_pos > MAX_POSITION_EMBEDDINGS:
        raise ConfigError(
            f"{source}: key 'max_position_embeddings' is {max_pos}; pllm supports at most {MAX_POSITION_EMBEDDINGS}"
        )
    dtype = config.get("torch_dtype", config.get("dtype", "float32")) or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: key 'torch_dtype' is {dtype!r}; supported: {', '.join(DTYPES)}")
    return ModelSpec(
        model_type="bert",
        hidden_size=hidden,
        intermediate_size=positive(config, "intermediate_size", source),
        num_hidden_layers=positive(config, "num_hidden_layers", source),
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden // num_heads,
        vocab_size=positive(config, "vocab_size", source),
        rms_norm_eps=0.0,  # no RMSNorm: see layer_norm_eps
        rope_theta=0.0,  # no rotary embedding: absolute position embeddings
        rope_scaling=None,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,  # no LM head: an encoder only embeds
        attention_bias=True,
        torch_dtype=dtype,
        bos_token_id=None,
        eos_token_ids=(),
        kind=ModelKind.ENCODER,
        type_vocab_size=positive(config, "type_vocab_size", source, 2),
        layer_norm_eps=finite_positive(config, "layer_norm_eps", source, 1e-12),
    )


def weight_layout(spec: ModelSpec) -> dict[str, RuntimeTensor]:
    """Runtime tensor name -> the Hugging Face BertModel tensors it is made of (q, k, v fused), and its shape.
    The pooler head (pooler.dense) is not read: sentence-transformers pools the last hidden states itself."""
    h, inter = spec.hidden_size, spec.intermediate_size
    layout = {
        "embed_tokens": RuntimeTensor(("embeddings.word_embeddings.weight",), (spec.vocab_size, h)),
        "embed_positions": RuntimeTensor(("embeddings.position_embeddings.weight",), (spec.max_position_embeddings, h)),
        "embed_token_types": RuntimeTensor(("embeddings.token_type_embeddings.weight",), (spec.type_vocab_size, h)),
        "embed_norm": RuntimeTensor(("embeddings.LayerNorm.weight",), (h,)),
        "embed_norm_bias": RuntimeTensor(("embeddings.LayerNorm.bias",), (h,)),
    }
    for i in range(spec.num_hidden_layers):
        hf, rt = f"encoder.layer.{i}.", f"layers.{i}."
        attn = hf + "attention."
        qkv = [attn + f"self.{name}." for name in ("query", "key", "value")]
        layout[rt + "qkv_proj"] = RuntimeTensor(tuple(p + "weight" for p in qkv), (3 * h, h))
        layout[rt + "qkv_bias"] = RuntimeTensor(tuple(p + "bias" for p in qkv), (3 * h,))
        layout[rt + "o_proj"] = RuntimeTensor((attn + "output.dense.weight",), (h, h))
        layout[rt + "o_bias"] = RuntimeTensor((attn + "output.dense.bias",), (h,))
        layout[rt + "attn_norm"] = RuntimeTensor((attn + "output.LayerNorm.weight",), (h,))
        layout[rt + "attn_norm_bias"] = RuntimeTensor((attn + "output.LayerNorm.bias",), (h,))
        layout[rt + "up_proj"] = RuntimeTensor((hf + "intermediate.dense.weight",), (inter, h))
        layout[rt + "up_bias"] = RuntimeTensor((hf + "intermediate.dense.bias",), (inter,))
        layout[rt + "down_proj"] = RuntimeTensor((hf + "output.dense.weight",), (h, inter))
        layout[rt + "down_bias"] = RuntimeTensor((hf + "output.dense.bias",), (h,))
        layout[rt + "mlp_norm"] = RuntimeTensor((hf + "output.LayerNorm.weight",), (h,))
        layout[rt + "mlp_norm_bias"] = RuntimeTensor((hf + "output.LayerNorm.bias",), (h,))
    return layout


@dataclass(frozen=True)
class BertLayerWeights:
    """One encoder layer's runtime tensors, looked up once when the model is built."""

    qkv: torch.Tensor  # [3 * hidden, hidden], q rows first, then k, then v
    qkv_bias: torch.Tensor  # [3 * hidden]
    o: torch.Tensor  # [hidden, hidden]
    o_bias: torch.Tensor  # [hidden]
    attn_norm: torch.Tensor  # [hidden]
    attn_norm_bias: torch.Tensor  # [hidden]
    up: torch.Tensor  # [intermediate, hidden]
    up_bias: torch.Tensor  # [intermediate]
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]
    mlp_norm_bias: torch.Tensor  # [hidden]

    @classmethod
    def from_tensors(cls, weights: dict[str, torch.Tensor], i: int) -> BertLayerWeights:
        p = f"layers.{i}."
        names = ("qkv", "qkv_bias", "o", "o_bias", "attn_norm", "attn_norm_bias", "up", "up_bias", "down",
                 "down_bias", "mlp_norm", "mlp_norm_bias")
        runtime = ("qkv_proj", "qkv_bias", "o_proj", "o_bias", "attn_norm", "attn_norm_bias", "up_proj", "up_bias",
                   "down_proj", "down_bias", "mlp_norm", "mlp_norm_bias")
        return cls(**{field: weights[p + name] for field, name in zip(names, runtime)})


class BertModel:
    """Holds the weights; forward() is BERT's post-LayerNorm encoder, each step through `ops`, with no KV cache."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], ops: Ops, max_positions: int):
        assert spec.kind is ModelKind.ENCODER and max_positions <= spec.max_position_embeddings, max_positions
        self.spec = spec
        self.w = weights
        self.layers = [BertLayerWeights.from_tensors(weights, i) for i in range(spec.num_hidden_layers)]
        self.ops = ops
        self.scale = spec.head_dim**-0.5

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        metas: Sequence[AttentionMetadata],  # [num_layers], all alike: each sequence whole, positions from 0
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # empty: an encoder keeps no cache
    ) -> torch.Tensor:  # [num_tokens, hidden_size], the last layer's output (what sentence-transformers pools)
        spec, w, ops = self.spec, self.w, self.ops
        meta = metas[0]
        num_tokens, h = input_ids.shape[0], spec.hidden_size
        eps = spec.layer_norm_eps
        # every token is of type 0: a single text, as sentence-transformers encodes it
        x = F.embedding(input_ids, w["embed_tokens"]) + w["embed_token_types"][0]  # [num_tokens, hidden]
        x = x + F.embedding(meta.positions, w["embed_positions"])
        x = ops.layer_norm(x, w["embed_norm"], w["embed_norm_bias"], eps, None)
        heads = (num_tokens, spec.num_attention_heads, spec.head_dim)
        for layer in self.layers:
            qkv = ops.linear(x, layer.qkv, layer.qkv_bias)  # [num_tokens, 3 * hidden]
            q, k, v = (qkv[:, i * h : (i + 1) * h].view(heads) for i in range(3))
            attn = ops.encoder_attention(q, k, v, meta, self.scale)  # [num_tokens, heads, head_dim]
            attn = ops.linear(attn.reshape(num_tokens, h), layer.o, layer.o_bias)
            x = ops.layer_norm(attn, layer.attn_norm, layer.attn_norm_bias, eps, x)  # post-norm: LN(attn + x)
            up = F.gelu(ops.linear(x, layer.up, layer.up_bias))  # [num_tokens, intermediate], exact (erf) GELU
            down = ops.linear(up, layer.down, layer.down_bias)
            x = ops.layer_norm(down, layer.mlp_norm, layer.mlp_norm_bias, eps, x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """An encoder has no LM head: the engine never schedules a sampling row for it."""
        assert hidden.shape[0] == 0, "an encoder build cannot sample"
        return hidden.new_empty((0, self.spec.vocab_size), dtype=torch.float32)


BERT = ModelFamily(
    model_type="bert",
    spec_from_config=bert_spec,
    weight_layout=weight_layout,
    model=BertModel,
    hf_layer_pattern=re.compile(r"encoder\.layer\.([0-9]+)\."),
    hf_embedding="embeddings.word_embeddings.weight",
)
