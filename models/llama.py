"""The Llama family (llama, mistral, qwen2): weight layout and the forward pass wired from backend ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pllm.models.ops import AttentionMetadata, Ops
from pllm.models.spec import ModelSpec


def weight_layout(spec: ModelSpec) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Runtime tensor name -> (Hugging Face tensors concatenated along dim 0, runtime shape)."""
    h, q, kv, inter = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    layout: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
        "embed_tokens": (("model.embed_tokens.weight",), (spec.vocab_size, h)),
        "norm": (("model.norm.weight",), (h,)),
    }
    if not spec.tie_word_embeddings:
        layout["lm_head"] = (("lm_head.weight",), (spec.vocab_size, h))
    for i in range(spec.num_hidden_layers):
        hf, rt = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        layout[rt + "input_layernorm"] = ((hf + "input_layernorm.weight",), (h,))
        layout[rt + "qkv_proj"] = (
            (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            (q + 2 * kv, h),
        )
        if spec.attention_bias:
            biases = (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias")
            layout[rt + "qkv_bias"] = (biases, (q + 2 * kv,))
        layout[rt + "o_proj"] = ((attn + "o_proj.weight",), (h, q))
        layout[rt + "post_attention_layernorm"] = ((hf + "post_attention_layernorm.weight",), (h,))
        layout[rt + "gate_up_proj"] = ((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), (2 * inter, h))
        layout[rt + "down_proj"] = ((hf + "mlp.down_proj.weight",), (h, inter))
    return layout


def rope_cos_sin(spec: ModelSpec, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos(pos * inv_freq) then sin, computed exactly as transformers does."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    rs = spec.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs is not None and rs.rope_type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * torch.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


class LlamaModel:
    """Holds the weights; forward() is the math, each step through `ops`, with no device or batching logic."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], ops: Ops, max_positions: int):
        self.spec = spec
        self.w = weights
        self.ops = ops
        self.cos_sin = rope_cos_sin(spec, max_positions).to(weights["embed_tokens"].device)
        self.scale = spec.head_dim**-0.5
        self.lm_head = weights["embed_tokens"] if spec.tie_word_embeddings else weights["lm_head"]

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [num_blocks, block_size, kv, d]
    ) -> torch.Tensor:  # [num_tokens, hidden_size], after the final norm
        spec, w, ops = self.spec, self.w, self.ops
        num_tokens = input_ids.shape[0]
        q_size, kv_size = spec.q_size, spec.kv_size
        x = F.embedding(input_ids, w["embed_tokens"])  # [num_tokens, hidden]
        residual = None
        for i in range(spec.num_hidden_layers):
            p = f"layers.{i}."
            h, residual = ops.rms_norm(x, w[p + "input_layernorm"], spec.rms_norm_eps, residual)
            qkv = ops.linear(h, w[p + "qkv_proj"], w.get(p + "qkv_bias"))  # [num_tokens, q + 2 * kv]
            q = qkv[:, :q_size].view(num_tokens, spec.num_attention_heads, spec.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            v = qkv[:, q_size + kv_size :].view(num_tokens, spec.num_key_value_heads, spec.head_dim)
            k_cache, v_cache = kv_caches[i]
            q, k = ops.rope_kv_write(q, k, v, meta.positions, self.cos_sin, k_cache, v_cache, meta.slot_mapping)
            attn = ops.attention(q, k_cache, v_cache, meta, self.scale)  # [num_tokens, heads, head_dim]
            x = ops.linear(attn.reshape(num_tokens, q_size), w[p + "o_proj"])
            h, residual = ops.rms_norm(x, w[p + "post_attention_layernorm"], spec.rms_norm_eps, residual)
            x = ops.mlp(h, w[p + "gate_up_proj"], w[p + "down_proj"])
        x, _ = ops.rms_norm(x, w["norm"], spec.rms_norm_eps, residual)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_seqs, hidden_size] -> [num_seqs, vocab_size] float32."""
        return self.ops.linear(hidden, self.lm_head).float()
