"""Rotary position tables: the cos/sin cache every rotary model hands to `Ops.rope_kv_write`, and its row per token."""

from __future__ import annotations

import math

import torch

from pllm.models.ops import AttentionMetadata
from pllm.models.spec import ModelSpec


def rope_cos_sin(spec: ModelSpec, max_positions: int) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos(pos * inv_freq) then sin, computed exactly as transformers does.

    longrope: [2 * max_positions, rotary_dim], the short-factor table then the long-factor one (rope_rows picks).
    longrope and yarn: multiplied by the attention factor as transformers multiplies its cos and sin.
    """
    rs = spec.rope_scaling
    if rs is not None and rs.rope_type == "yarn":
        return (_table(_yarn_inv_freq(spec), max_positions) * rs.attention_factor).contiguous()
    if rs is not None and rs.rope_type == "longrope":
        short = _table(_longrope_inv_freq(spec, rs.short_factor), max_positions)
        long = _table(_longrope_inv_freq(spec, rs.long_factor), max_positions)
        return (torch.cat([short, long]) * rs.attention_factor).contiguous()
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
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
    return _table(inv_freq, max_positions)


def _longrope_inv_freq(spec: ModelSpec, ext_factors: tuple[float, ...]) -> torch.Tensor:
    # transformers' _compute_longrope_parameters: 1 / (ext_factors * base ** (arange(0, dim, 2) / dim))
    dim = spec.rotary_dim
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32) * spec.rope_theta**inv_freq_shape)


def _yarn_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """transformers' _compute_yarn_parameters, operation for operation: each frequency blends its original value
    (extrapolation) and its value divided by factor (interpolation) along a linear ramp over the dims."""
    rs, dim, base = spec.rope_scaling, spec.rotary_dim, spec.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float32) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (rs.factor * pos_freqs)
    low = _yarn_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings)
    high = _yarn_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp  # [rotary_dim // 2]
    return inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original: int) -> float:
    # the (fractional) dim whose frequency turns num_rotations times in the original length
    return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _table(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, rotary_dim // 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


# longrope, as transformers runs it. Phi3RotaryEmbedding picks one table per forward, the long one when
# max(position_ids) + 1 > original_max_position_embeddings, and Phi3ForCausalLM.prepare_inputs_for_generation drops
# the KV cache when generation first takes the sequence past that length, so the whole sequence is computed again
# with the long table. Hence under generate() every position of a sequence is rotated by the table its current
# length selects: short while it has at most `original` tokens, long from then on (a prompt longer than that is
# long throughout). pllm does the same: each token reads the table of its sequence's known length
# (AttentionMetadata.seq_total_lens), and the scheduler computes a sequence again from its first token when its
# length first passes `original` (recompute_length below); prefix caching is off for such models, as a block's
# K/V depends on more than its tokens.


def max_context_len(spec: ModelSpec) -> int:
    """The longest sequence the model may serve: max_position_embeddings, or for yarn the context it stretches to,
    original_max_position_embeddings * factor, when longer (vLLM's derived max_model_len; Qwen's recipe keeps
    max_position_embeddings at the original length)."""
    rs = spec.rope_scaling
    if rs is not None and rs.rope_type == "yarn":
        return max(spec.max_position_embeddings, int(rs.original_max_position_embeddings * rs.factor))
    return spec.max_position_embeddings


def recompute_length(spec: ModelSpec) -> int | None:
    """The sequence length past which a sequence's K/V must be computed again from its first token (longrope's
    original_max_position_embeddings), or None when K/V never depend on the length."""
    rs = spec.rope_scaling
    return rs.original_max_position_embeddings if rs is not None and rs.rope_type == "longrope" else None


def rope_rows(spec: ModelSpec, meta: AttentionMetadata, max_positions: int) -> torch.Tensor:
    """[num_tokens] int64: each token's row of the rope_cos_sin table: its position, in the long-factor half for
    longrope when its sequence is longer than the original length."""
    threshold = recompute_length(spec)
    if threshold is None:
        return meta.positions
    length = meta.positions + 1 if meta.seq_total_lens is None else meta.seq_total_lens  # [num_tokens]
    return meta.positions + (length > threshold).to(torch.int64) * max_positions
