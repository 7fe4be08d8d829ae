"""The backend seam: the ops a model definition calls, and the attention metadata they share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pllm.models.llama import LayerWeights
    from pllm.models.lora import LoraInputs
    from pllm.models.quant import QuantizedWeight
    from pllm.models.spec import ModelSpec

# The gated MLP's activation, by Hugging Face's `hidden_act` / `hidden_activation` name: act(gate) * up.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each flattened token of a step lives: its sequence, its position and its KV-cache slot.

    A step holds `num_seqs` sequences; sequence i contributes query_lens[i] tokens (a prompt chunk or one decode
    token) that follow its `seq_lens[i] - query_lens[i]` tokens already in the cache (an earlier chunk or a prefix
    cache hit). The cache already holds the step's own K/V when `attention` runs (rope_kv_write comes first).
    """

    positions: torch.Tensor  # [num_tokens] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64, block_id * block_size + offset_in_block
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths, starts at 0
    seq_lens: torch.Tensor  # [num_seqs] int32, cached + new tokens after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_host: tuple[int, ...]  # host copies, so the CPU path needs no device sync
    seq_lens_host: tuple[int, ...]
    # [num_tokens] int64: the known length of each token's sequence when the step was scheduled (prompt + outputs
    # so far), what rotary tables that switch on the sequence length read (longrope). None: each token's
    # position + 1, as for every decode token.
    seq_total_lens: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class DecodeStack(Protocol):
    """A backend's whole decode step of the llama wiring in one call (the cpu backend's compiled stack), over the
    weights it was bound to: the same math as the per-op forward, embeddings in, the final norm's output out."""

    def accepts(self, metas: Sequence[AttentionMetadata]) -> bool:
        """Whether it runs this step (one token per sequence, a batch it is fast at); otherwise the per-op path."""
        ...

    def __call__(
        self,
        x: torch.Tensor,  # [num_seqs, hidden], the step's embeddings (may be overwritten)
        rows: torch.Tensor,  # [num_seqs] int64, each token's row of cos_sin_cache
        cos_sin_cache: torch.Tensor,  # [num_rows, head_dim] float32
        metas: Sequence[AttentionMetadata],  # [num_layers]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v)
    ) -> torch.Tensor:  # [num_seqs, hidden], after the final norm
        ...


class Ops(Protocol):
    """What a model definition may call. Each backend (cpu, interpret, cuda) provides one implementation.

    Caches are per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
    cos_sin_cache [num_rows, rotary_dim] float32: cos in [:, :rotary_dim//2], sin in [:, rotary_dim//2:],
    rotate-half (GPT-NeoX) pairing within the first rotary_dim dims of each head (all of them unless the model has
    partial rotary), as Hugging Face Llama and Phi3 apply it.
    """

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
        offset: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H]. With residual: r = x + residual, returns (norm(r) * weight, r). Without: (norm(x) * weight, x).

        offset 0: Llama's rounding, weight * norm(x) rounded to the dtype first; offset 1: Gemma's, the row times
        (1 + weight) in fp32, rounded once."""
        ...

    def qk_norm(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], may be a strided view of the fused qkv projection
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        q_weight: torch.Tensor,  # [head_dim]
        k_weight: torch.Tensor,  # [head_dim]
        eps: float,
        offset: float,  # spec.norm_weight_offset: scale by (offset + w)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of every q and k head over its head_dim values. Offset 0 (qwen3): norm(x).to(dtype) * w, as
        Hugging Face's RMSNorm rounds; offset 1 (gemma): (norm(x) * (1 + w)) in fp32, rounded once. Returns (q, k);
        a backend may write them into the given views."""
        ...

    def rope_kv_write(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [num_rows, rotary_dim] float32
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the first rotary_dim dims of q and k (the rest pass unchanged); write rotated k and v into the
        caches at slot_mapping. `positions` are rows of cos_sin_cache. Returns (q_rot, k_rot)."""
        ...

    def attention(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], already rotated
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Causal attention of each query token to its sequence's cached tokens up to and including itself.

        window: only the last `window` keys (the query's own included), as transformers' sliding-window mask
        (key > query - window). softcap: scores * scale -> softcap * tanh(. / softcap) before the mask."""
        ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] @ weight [out, in].T (+ bias) -> [T, out]; a backend may keep weights in a faster layout. A
        QuantizedWeight (models/quant.py) means exactly its `dequantize`, in fp32 accumulation."""
        ...

    def mlp(
        self, x: torch.Tensor, gate_up_weight: torch.Tensor | QuantizedWeight,
        down_weight: torch.Tensor | QuantizedWeight, activation: str = "silu"
    ) -> torch.Tensor:
        """x [T, H]; gate_up_weight [2 * I, H] (gate rows first); down_weight [H, I], float or packed as for
        `linear`. Returns down(act(g) * u), act one of ACTIVATIONS."""
        ...

    def moe(
        self,
        x: torch.Tensor,  # [T, H]
        topk_weights: torch.Tensor,  # [T, K] float32, the router's weight of each chosen expert
        topk_ids: torch.Tensor,  # [T, K] int64, distinct expert ids per token
        gate_up_weights: torch.Tensor,  # [E, 2 * I, H], each expert's gate rows first
        down_weights: torch.Tensor,  # [E, H, I]
    ) -> torch.Tensor:  # [T, H]
        """Sum over k of w[t, k] * down_e(silu(gate_e(x)) * up_e(x)) for e = ids[t, k], as transformers computes it:
        each expert's output rounded to x's dtype, weighted in float32, rounded, and added in ascending expert order."""
        ...

    def lora(
        self,
        y: torch.Tensor,  # [T, out], the base layer's output, added to in place
        x: torch.Tensor,  # [T, in], the base layer's input
        a: torch.Tensor,  # [num_adapters, R, in]
        b: torch.Tensor,  # [num_adapters, out, R], the scaling folded in
        lora: LoraInputs,
    ) -> torch.Tensor:
        """Multi-LoRA: for each group g of lora, y[rows] += (x[rows] @ a[adapter].T) @ b[adapter].T (shrink, then
        expand), rows = the group's token rows; the rows of no group (the base model's) are left as they are.
        Returns y."""
        ...

    def decode_stack(
        self, spec: ModelSpec, layers: Sequence[LayerWeights], final_norm: torch.Tensor, scale: float,
        lm_head: torch.Tensor | None = None,
    ) -> DecodeStack | None:
        """The llama wiring's decode step over these weights in one call, if this backend has one for the model;
        None: every step runs op by op. lm_head: the model's LM head, which the backend may then hold only in the
        layout its linears read (where it is tied to the embedding, the lookups still read the rows they need)."""
        ...

    # encoders (bert) ------------------------------------------------------------------------------
    def layer_norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """x [T, H]: LayerNorm(x + residual) * weight + bias (residual optional), BERT's post-norm."""
        ...

    def encoder_attention(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Bidirectional attention, no cache: each token attends to every token of its own sequence, which this
        step holds whole (meta.query_start_loc delimits the sequences)."""
        ...
