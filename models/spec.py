"""ModelSpec: a model's shape under Hugging Face's names, with derived fields; the base compiler and runtime share."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "linear", "llama3", "longrope" or "yarn"
    factor: float
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # llama3, longrope and yarn
    # longrope only: per-frequency divisors [rotary_dim // 2] for sequences up to / past the original length
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0  # longrope and yarn: cos and sin are multiplied by it (yarn's already resolved)
    # yarn only: frequencies making more than beta_fast turns in the original length keep their value, fewer than
    # beta_slow are divided by factor, a linear ramp between; truncate rounds the ramp's ends outwards to whole dims.
    # Defaults: an older manifest has no such keys.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        d = dict(d)
        for key in ("short_factor", "long_factor"):
            d[key] = tuple(d.get(key, ()))  # JSON gives lists
        return cls(**d)


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts feed-forward block: a router picks num_experts_per_tok of num_experts per token."""

    num_experts: int
    num_experts_per_tok: int  # top-k
    moe_intermediate_size: int  # each expert's gate/up width
    norm_topk_prob: bool  # renormalise the top-k router probabilities to sum to one (mixtral: always)
    # router weights rounded to the model dtype before weighting (qwen3_moe) or kept in float32 (mixtral)
    round_router_weights: bool
    sparse_layers: tuple[int, ...]  # decoder layers whose MLP is this block; the others keep the dense MLP


class ModelKind(str, enum.Enum):
    """What a model computes: the runtime sizes a KV cache and samples only for decoders."""

    DECODER = "decoder"  # causal LM: paged KV cache, generates and embeds
    ENCODER = "encoder"  # bidirectional (bert): no KV cache, embeds only


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # a key of models.registry.FAMILIES (llama, qwen3, gemma3, bert, ...)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q, k, v projections (qwen2: always)
    torch_dtype: str  # the checkpoint's dtype, one of DTYPES
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # q/k norm (qwen3; gemma3 switches the offset on) ---------------------------------------------
    qk_norm: bool = False  # RMSNorm over each q and k head (weights [head_dim]) between the projection and RoPE
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + w): 0 for llama-style norms, 1 for gemma's
    # partial rotary (phi3) -----------------------------------------------------------------------------
    partial_rotary_factor: float = 1.0  # RoPE turns the first int(head_dim * factor) dims of each head
    # mixture of experts (mixtral, qwen3_moe); None: every layer has the dense MLP
    moe: MoeSpec | None = None
    # encoders (bert) ----------------------------------------------------------------------------
    kind: ModelKind = ModelKind.DECODER
    type_vocab_size: int = 0  # rows of the token-type (segment) embedding; 0 for decoders
    layer_norm_eps: float = 0.0  # LayerNorm epsilon of encoders (decoders read rms_norm_eps)

    # gemma-style quirks (the llama wiring keeps every default) --------------------------------------
    hidden_act: str = "silu"  # the gated MLP's activation, one of models.ops.ACTIVATIONS
    query_pre_attn_scalar: float | None = None  # attention scale is its ** -0.5; None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcapping: float | None = None  # the same on the output logits
    sliding_window: int | None = None  # keys a windowed layer's query sees, itself included
    sliding_layers: tuple[int, ...] = ()  # indices of the windowed layers (all others attend to everything)
    rope_local_theta: float | None = None  # RoPE base of the windowed layers; None: rope_theta

    # derived ------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (rotate-half within them); the rest pass unchanged."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The window of layer `layer`, None when it attends to its whole context."""
        return self.sliding_window if layer in self.sliding_layers else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling.from_dict(rs) if rs else None
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        if "sliding_layers" in d:
            d["sliding_layers"] = tuple(d["sliding_layers"])
        if d.get("moe"):
            d["moe"] = MoeSpec(**{**d["moe"], "sparse_layers": tuple(d["moe"]["sparse_layers"])})
        d["kind"] = ModelKind(d.get("kind", ModelKind.DECODER))
        return cls(**d)
