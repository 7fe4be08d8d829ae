"""The llama wiring (llama, mistral, qwen2 share it): config rules, weight layout and the forward pass."""

from __future__ import annotations

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
    rope_parameter,
    rope_scaling,
    token_id,
)
from pllm.models.family import ModelFamily, RuntimeTensor, lm_head_weight
from pllm.models.lora import LayerLora, LoraInputs, TargetLora
from pllm.models.ops import AttentionMetadata, DecodeStack, Ops
from pllm.models.parallel_layout import Split
from pllm.models.rotary import rope_cos_sin, rope_rows
from pllm.models.spec import DTYPES, ModelSpec
from pllm.models.tensor_parallel import SINGLE_RANK, Communicator, vocab_embedding
from pllm.models.windows import WindowRule, sliding_layers


@dataclass(frozen=True)
class ConfigRules:
    """What a llama-shaped family decides that its config.json may leave unsaid."""

    model_type: str
    attention_bias_always: bool  # q, k, v carry a bias whatever the config says (qwen2)
    qk_norm: bool = False  # an RMSNorm per q and k head before RoPE (qwen3)
    default_head_dim: int | None = None  # head_dim when the config omits it (qwen3: 128); None: hidden / heads
    # The config's `attention_bias` also puts a bias on o_proj in these families; the runtime layout has none
    attention_bias_refused: bool = False
    window: WindowRule = WindowRule.NONE  # whether and where `sliding_window` limits attention (models/windows.py)
    default_rope_theta: float = 10000.0  # rope_theta when the config gives none (the config class's default_theta)


def llama_spec(config: dict, source: str, rules: ConfigRules) -> ModelSpec:
    """Validate a llama-shaped Hugging Face config dict and derive the ModelSpec; errors name the key and the file."""
    hidden = positive(config, "hidden_size", source)
    num_heads = positive(config, "num_attention_heads", source)
    num_kv = positive(config, "num_key_value_heads", source, num_heads)
    if num_heads % num_kv:
        raise ConfigError(
            f"{source}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv})"
        )
    head_dim = config.get("head_dim", rules.default_head_dim)
    if head_dim is None and "head_dim" in config and rules.default_head_dim is not None:
        # Qwen3Config's head_dim is a plain int (default 128): transformers refuses a null one; the other families'
        # configs read a null as "derive it"
        raise ConfigError(f"{source}: key 'head_dim' is null; {rules.model_type} needs an integer (leave the key out "
                          f"for its default {rules.default_head_dim})")
    if head_dim is None:
        if hidden % num_heads:
            raise ConfigError(
                f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({num_heads}) "
                "and no head_dim is given"
            )
        head_dim = hidden // num_heads
    else:
        head_dim = positive(config, "head_dim", source, rules.default_head_dim)
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim ({head_dim}) must be even for rotary embeddings")

    max_pos = positive(config, "max_position_embeddings", source, 2048)
    if max_pos > MAX_POSITION_EMBEDDINGS:
        raise ConfigError(
            f"{source}: key 'max_position_embeddings' is {max_pos}; pllm supports at most {MAX_POSITION_EMBEDDINGS}"
        )
    num_layers = positive(config, "num_hidden_layers", source)
    window, windowed_layers = sliding_layers(config, source, rules.window, num_layers, max_pos)

    dtype = config.get("torch_dtype", config.get("dtype", "float32")) or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{source}: key 'torch_dtype' is {dtype!r}; supported: {', '.join(DTYPES)}")

    vocab_size = positive(config, "vocab_size", source)
    eos_ids = eos_token_ids(config, vocab_size, source)
    bos = config.get("bos_token_id")
    bos_id = None if bos is None else token_id(bos, "bos_token_id", vocab_size, source)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if get_value(config, "mlp_bias", bool, source, False):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")

    get_value(config, "rope_parameters", dict, source, {})  # an object when given (its scaling: rope_scaling())
    theta = rope_parameter(config, "rope_theta", finite_positive, source, rules.default_rope_theta)
    eps = finite_positive(config, "rms_norm_eps", source, 1e-6)
    bias = get_value(config, "attention_bias", bool, source, False)
    if bias and rules.attention_bias_refused:
        raise ConfigError(f"{source}: attention_bias=true is not supported for {rules.model_type} (it also puts a "
                          "bias on o_proj)")
    return ModelSpec(
        model_type=rules.model_type,
        hidden_size=hidden,
        intermediate_size=positive(config, "intermediate_size", source),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        vocab_size=vocab_size,
        rms_norm_eps=eps,
        rope_theta=theta,
        rope_scaling=rope_scaling(config, source),
        max_position_embeddings=max_pos,
        tie_word_embeddings=get_value(config, "tie_word_embeddings", bool, source, False),
        attention_bias=rules.attention_bias_always or bias,
        torch_dtype=dtype,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        qk_norm=rules.qk_norm,
        sliding_window=window,
        sliding_layers=windowed_layers,
    )


def weight_layout(spec: ModelSpec) -> dict[str, RuntimeTensor]:
    """Runtime tensor name -> the Hugging Face tensors it is made of, and its shape."""
    h, q, kv, inter = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    layout = {
        "embed_tokens": RuntimeTensor(("model.embed_tokens.weight",), (spec.vocab_size, h), split=Split.VOCAB),
        "norm": RuntimeTensor(("model.norm.weight",), (h,)),
    }
    if not spec.tie_word_embeddings:
        layout["lm_head"] = RuntimeTensor(("lm_head.weight",), (spec.vocab_size, h), split=Split.VOCAB)
    for i in range(spec.num_hidden_layers):
        hf, rt = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        layout[rt + "input_layernorm"] = RuntimeTensor((hf + "input_layernorm.weight",), (h,))
        layout[rt + "qkv_proj"] = RuntimeTensor(
            (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), (q + 2 * kv, h), split=Split.QKV
        )
        if spec.attention_bias:
            biases = (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias")
            layout[rt + "qkv_bias"] = RuntimeTensor(biases, (q + 2 * kv,), split=Split.QKV)
        if spec.qk_norm:
            layout[rt + "q_norm"] = RuntimeTensor((attn + "q_norm.weight",), (spec.head_dim,))
            layout[rt + "k_norm"] = RuntimeTensor((attn + "k_norm.weight",), (spec.head_dim,))
        layout[rt + "o_proj"] = RuntimeTensor((attn + "o_proj.weight",), (h, q), split=Split.COLUMNS)
        layout[rt + "post_attention_layernorm"] = RuntimeTensor((hf + "post_attention_layernorm.weight",), (h,))
        layout[rt + "gate_up_proj"] = RuntimeTensor(
            (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), (2 * inter, h), split=Split.GATE_UP
        )
        layout[rt + "down_proj"] = RuntimeTensor((hf + "mlp.down_proj.weight",), (h, inter), split=Split.COLUMNS)
    return layout


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's runtime tensors, looked up once when the model is built."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden], q rows first, then k, then v
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size], present exactly when spec.attention_bias
    o: torch.Tensor  # [hidden, q_size]
    q_norm: torch.Tensor | None  # [head_dim], present exactly when spec.qk_norm
    k_norm: torch.Tensor | None  # [head_dim]
    post_norm: torch.Tensor  # [hidden]
    # the dense MLP; None on a mixture-of-experts layer (models/moe.py), whose layout has no such tensors
    gate_up: torch.Tensor | None  # [2 * intermediate, hidden], gate rows first
    down: torch.Tensor | None  # [hidden, intermediate]

    @classmethod
    def from_tensors(cls, weights: dict[str, torch.Tensor], spec: ModelSpec, i: int) -> LayerWeights:
        p = f"layers.{i}."
        return cls(
            input_norm=weights[p + "input_layernorm"],
            qkv=weights[p + "qkv_proj"],
            qkv_bias=weights[p + "qkv_bias"] if spec.attention_bias else None,
            o=weights[p + "o_proj"],
            q_norm=weights[p + "q_norm"] if spec.qk_norm else None,
            k_norm=weights[p + "k_norm"] if spec.qk_norm else None,
            post_norm=weights[p + "post_attention_layernorm"],
            gate_up=weights.get(p + "gate_up_proj"),
            down=weights.get(p + "down_proj"),
        )


class LlamaModel:
    """Holds the weights; forward() is the math, each step through `ops`, with no device or batching logic."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], ops: Ops, max_positions: int):
        self.spec = spec
        self.w = weights
        self.layers = [LayerWeights.from_tensors(weights, spec, i) for i in range(spec.num_hidden_layers)]
        self.ops = ops
        self.max_positions = max_positions
        self.cos_sin = rope_cos_sin(spec, max_positions).to(weights["embed_tokens"].device)
        self.scale = spec.head_dim**-0.5
        self.lm_head = lm_head_weight(spec, weights)
        # LoRA adapters stacked per layer (models/lora.py), set by the runner; None: no adapter loaded
        self.lora_layers: list[LayerLora] | None = None
        # the other ranks of a tensor-parallel run, set by the runner; this model is then one rank's slice (its
        # spec the rank's heads and MLP width, its embedding and LM head a vocabulary slice)
        self.comm: Communicator = SINGLE_RANK
        # the backend's one-call decode step over these weights, if it has one for this model (None: op by op)
        self.decode_stack: DecodeStack | None = (
            ops.decode_stack(spec, self.layers, weights["norm"], self.scale, self.lm_head)
            if self.compiled_decode else None
        )

    @property
    def compiled_decode(self) -> bool:
        """Whether a backend's decode stack may stand in for this forward: the dense llama wiring (subclasses that
        change a layer, as models/moe.py does, say no)."""
        return type(self).feed_forward is LlamaModel.feed_forward

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        metas: Sequence[AttentionMetadata],  # [num_layers]: each layer's KV group's
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [num_blocks, block_size, kv, d]
        lora: LoraInputs | None = None,  # the step's tokens under an adapter, grouped; None: all the base model's
    ) -> torch.Tensor:  # [num_tokens, hidden_size], after the final norm
        spec, w, ops = self.spec, self.w, self.ops
        adapters = self.lora_layers if lora is not None else None
        num_tokens = input_ids.shape[0]
        q_size, kv_size = spec.q_size, spec.kv_size
        comm = self.comm
        x = vocab_embedding(input_ids, w["embed_tokens"], comm)  # [num_tokens, hidden]
        rows = rope_rows(spec, metas[0], self.max_positions)  # [num_tokens] rows of self.cos_sin
        # the compiled stack computes a whole model: never one rank's slice, whose layers end in an all-reduce
        if lora is None and self.decode_stack is not None and comm is SINGLE_RANK and self.decode_stack.accepts(metas):
            return self.decode_stack(x, rows, self.cos_sin, metas, kv_caches)  # every layer in one call
        residual = None
        for i, layer in enumerate(self.layers):
            adapter = adapters[i] if adapters is not None else None
            h, residual = ops.rms_norm(x, layer.input_norm, spec.rms_norm_eps, residual)
            qkv = ops.linear(h, layer.qkv, layer.qkv_bias)  # [num_tokens, q + 2 * kv]
            if adapter is not None and adapter.qkv is not None:
                qkv = ops.lora(qkv, h, adapter.qkv.a, adapter.qkv.b, lora)
            q = qkv[:, :q_size].view(num_tokens, spec.num_attention_heads, spec.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            v = qkv[:, q_size + kv_size :].view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            if layer.q_norm is not None:
                q, k = ops.qk_norm(q, k, layer.q_norm, layer.k_norm, spec.rms_norm_eps, spec.norm_weight_offset)
            k_cache, v_cache, meta = *kv_caches[i], metas[i]
            q, k = ops.rope_kv_write(q, k, v, rows, self.cos_sin, k_cache, v_cache, meta.slot_mapping)
            attn = ops.attention(q, k_cache, v_cache, meta, self.scale, spec.layer_window(i))  # [T, heads, head_dim]
            attn = attn.reshape(num_tokens, q_size)
            x = ops.linear(attn, layer.o)
            if adapter is not None and adapter.o is not None:
                x = ops.lora(x, attn, adapter.o.a, adapter.o.b, lora)
            x = comm.all_reduce(x)  # row-parallel o: each rank's heads' share of the sum (no bias in this wiring)
            h, residual = ops.rms_norm(x, layer.post_norm, spec.rms_norm_eps, residual)
            if adapter is not None and (adapter.gate_up is not None or adapter.down is not None):
                x = self.lora_feed_forward(layer, h, adapter, lora)
            else:
                x = self.feed_forward(layer, h)
            x = comm.all_reduce(x)  # row-parallel down (or each rank's slice of every expert)
        x, _ = ops.rms_norm(x, w["norm"], spec.rms_norm_eps, residual)
        return x

    def feed_forward(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """h [num_tokens, hidden] -> [num_tokens, hidden]: the dense MLP (models/moe.py routes to experts instead)."""
        return self.ops.mlp(h, layer.gate_up, layer.down)

    def lora_feed_forward(self, layer: LayerWeights, h: torch.Tensor, adapter: LayerLora,
                          lora: LoraInputs) -> torch.Tensor:
        """The dense MLP with adapters on gate/up or down: the two matmuls apart, so each gets its LoRA term."""
        ops = self.ops

        def adapted(y: torch.Tensor, x: torch.Tensor, target: TargetLora | None) -> torch.Tensor:
            return y if target is None else ops.lora(y, x, target.a, target.b, lora)

        gate_up = adapted(ops.linear(h, layer.gate_up), h, adapter.gate_up)  # [num_tokens, 2 * intermediate]
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up  # the llama wiring's activation (the spec refuses any other)
        return adapted(ops.linear(act, layer.down), act, adapter.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_seqs, hidden_size] -> [num_seqs, vocab_size] float32."""
        return self.comm.all_gather(self.ops.linear(hidden, self.lm_head).float())


def llama_family(rules: ConfigRules) -> ModelFamily:
    """A family served by this wiring, differing only in its config rules."""
    return ModelFamily(
        model_type=rules.model_type,
        spec_from_config=partial(llama_spec, rules=rules),
        weight_layout=weight_layout,
        model=LlamaModel,
        hf_layer_pattern=re.compile(r"model\.layers\.([0-9]+)\."),
        hf_embedding="model.embed_tokens.weight",
        tensor_parallel=True,
    )


# transformers biases all four projections when attention_bias is set; the layout has no o_proj bias, so refuse
LLAMA = llama_family(
    ConfigRules("llama", attention_bias_always=False, attention_bias_refused=True)
)
