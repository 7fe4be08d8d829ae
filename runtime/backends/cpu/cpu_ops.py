"""The cpu backend: the Ops contract in plain PyTorch, batched over the flattened tokens of a step."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pllm.models.ops import ACTIVATIONS, AttentionMetadata
from pllm.runtime.backends.cpu.cpu_attention import CpuAttention
from pllm.runtime.backends.cpu.cpu_decode_stack import bind_stack
from pllm.runtime.backends.cpu.cpu_decode_step import CpuDecodeStep
from pllm.runtime.backends.cpu.cpu_kernels import CpuDecodeAttention, CpuRmsNorm, CpuRopeKvWrite
from pllm.runtime.backends.cpu.cpu_linear import CpuLinear
from pllm.runtime.backends.cpu.cpu_moe import grouped_moe
from pllm.runtime.backends.cpu.cpu_prefill_attention import CpuPrefillAttention
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear

logger = logging.getLogger("pllm")


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, head_dim]; cos, signed_sin [T, 1, rotary_dim]. HF Llama's x * cos + rotate_half(x) * sin, with
    # rotate_half's negation folded into the sin table (negation is exact, so the result is bit-identical); with
    # partial rotary (HF Phi3) only the first rotary_dim dims turn and the rest pass unchanged
    rotary_dim = cos.shape[-1]
    if rotary_dim != x.shape[-1]:
        return torch.cat((_rotate(x[..., :rotary_dim], cos, signed_sin), x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin


def _head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    # x [T, heads, head_dim]; weight [head_dim]. Offset 0: Hugging Face's Llama/Qwen3 RMSNorm (round the normalised
    # row, then multiply in the dtype); otherwise gemma's (offset + w) in fp32, rounded once.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


PADDED_LORA_WASTE = 2  # the padded batched path when padding at most doubles the rows computed


class TorchOps:
    """Reference-quality and fast: each op of the Ops contract by the build's compiled kernel where it has one, else
    PyTorch; attention's routes in cpu_attention.py, the linears' in cpu_linear.py."""

    def __init__(
        self,
        decode_attention: CpuDecodeAttention | None = None,
        rms_norm_kernel: CpuRmsNorm | None = None,
        rope_kernel: CpuRopeKvWrite | None = None,
        quant_kernel: CpuQuantLinear | None = None,
        decode_step: CpuDecodeStep | None = None,
        huge_pages: bool = False,
        prefill_attention: CpuPrefillAttention | None = None,
    ) -> None:
        self.quant_kernel = quant_kernel  # builds with packed weights
        self.decode_step = decode_step  # the build's whole decode step, bound to a model's weights by decode_stack
        self.linears = CpuLinear(quant_kernel, decode_step, huge_pages)  # every linear's route (cpu_linear.py)
        self.rms_norm_kernel = rms_norm_kernel  # bfloat16 builds only
        self.rope_kernel = rope_kernel
        self.attentions = CpuAttention(decode_attention, prefill_attention)  # Ops.attention's routes (cpu_attention.py)
        self._rope_key: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None  # the step's rows are cached for
        self._rope_cached: tuple[torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]
        # (cos_sin_cache, dtype, (cos table, signed sin table)): _rope_table's, one per cache and dtype
        self._rope_table_cache: list[tuple[torch.Tensor, torch.dtype, tuple[torch.Tensor, torch.Tensor]]] = []
        self._encoder_meta: AttentionMetadata | None = None  # the step whose padded layout is cached
        self._encoder_cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]

    def rms_norm(self, x, weight, eps, residual, offset=0.0):
        if self.rms_norm_kernel is not None and x.is_contiguous() and offset == 0.0:
            # eps is baked into the rendered kernel; a different one means the build belongs to another model
            assert eps == self.rms_norm_kernel.eps, f"rms_norm eps {eps} differs from the kernel's"
            return self.rms_norm_kernel(x, weight, residual)
        if residual is not None:
            x = residual + x
        return _head_rms_norm(x, weight, eps, offset), x  # one "head" spanning the hidden row

    def qk_norm(self, q, k, q_weight, k_weight, eps, offset):
        # PyTorch on every cpu build (no compiled kernel does it). The results go back into the given views of the
        # fused projection, so q, k and v keep the one row stride the compiled RoPE kernel reads.
        q.copy_(_head_rms_norm(q, q_weight, eps, offset))
        k.copy_(_head_rms_norm(k, k_weight, eps, offset))
        return q, k

    def rope_kv_write(self, q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
        cos, signed_sin = self._rope_rows(positions, cos_sin_cache, q.dtype)
        if self.rope_kernel is not None and self.rope_kernel.accepts(q, k, v):
            return self.rope_kernel(q, k, v, cos, signed_sin, k_cache, v_cache, slot_mapping)
        q = _rotate(q, cos, signed_sin)
        k = _rotate(k, cos, signed_sin)
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        # index_copy_/index_select: several times faster than advanced indexing on the CPU
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
        return q, k

    def decode_stack(self, spec, layers, final_norm, scale, lm_head=None):
        if self.decode_step is None:
            return None
        panels = None if self.quant_kernel is None else self.quant_kernel.panels
        stack = bind_stack(self.decode_step, layers, final_norm, scale, self._rope_rows, panels, self.linears.panels)
        if isinstance(stack, str):  # weights the kernel cannot read: every step runs op by op, said once
            logger.info("pllm cpu backend: decode steps op by op, not the compiled step (%s)", stack)
            return None
        # Every linear reader of these now reads oneDNN's copy (the step, the GEMV, oneDNN's GEMM): their rows leave
        # the process, in one pass over its mappings. The LM head's too, packed now (its GEMV reads its panels); where
        # it is the embedding too, the lookups fault back only the pages of the tokens they read.
        held = list(stack.float_panels)
        if isinstance(lm_head, torch.Tensor) and self.linears.panels(lm_head) is not None:
            held.append(lm_head)
        self.linears.drop_rows(held)
        if stack.packed:  # said once: the step reads the build's packed weights as they are
            kept = ", ".join(f"{count} {label}" for label, count in sorted(stack.kinds.items()))
            logger.info("pllm cpu backend: decode steps of up to %d sequences compiled, reading packed weights "
                        "(linears: %s)", stack.max_batch, kept)
        return stack

    def _rope_rows(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype):
        """cos and signed sin rows [T, 1, rotary_dim] for this step's rows, built once per step, not per layer: two
        row gathers from tables made once per cache and dtype (_rope_table: the same elementwise ops over every row,
        so the same values, where building them from the cache every step took eight tensor ops)."""
        key = self._rope_key
        if key is None or key[0] is not positions or key[1] is not cos_sin_cache or key[2] != dtype:
            cos_table, sin_table = self._rope_table(cos_sin_cache, dtype)
            cos = cos_table.index_select(0, positions)[:, None, :]  # [T, 1, rotary_dim]
            signed_sin = sin_table.index_select(0, positions)[:, None, :]
            self._rope_key, self._rope_cached = (positions, cos_sin_cache, dtype), (cos, signed_sin)
        return self._rope_cached

    def _rope_table(self, cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_rows, rotary_dim] cos (each half's values twice) and signed sin (-sin, sin) in dtype, each the cache's
        size in that dtype (a bf16 pair is the fp32 cache's size: 64 MiB beside a 128K-position, 128-dim cache). Kept
        per cache, found by identity (a model may hold two of one shape: gemma3's local and global)."""
        for cache, table_dtype, tables in self._rope_table_cache:
            if cache is cos_sin_cache and table_dtype == dtype:
                return tables
        half = cos_sin_cache.shape[-1] // 2
        cos = cos_sin_cache[:, :half].repeat(1, 2).to(dtype)
        sin = cos_sin_cache[:, half:]
        tables = (cos.contiguous(), torch.cat((-sin, sin), dim=-1).to(dtype).contiguous())
        self._rope_table_cache.append((cos_sin_cache, dtype, tables))
        return tables

    @property
    def decode_attention(self) -> CpuDecodeAttention | None:
        return self.attentions.decode_attention

    @property
    def prefill_attention(self) -> CpuPrefillAttention | None:
        return self.attentions.prefill_attention

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, window=None, softcap=None):
        return self.attentions(q, k_cache, v_cache, meta, scale, window, softcap)

    def linear(self, x, weight, bias=None):
        return self.linears(x, weight, bias)

    def gemm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """CpuLinear.gemm_dtype: the dtype the float GEMM multiplies in for weights of `dtype`."""
        return self.linears.gemm_dtype(dtype)

    def mlp(self, x, gate_up_weight, down_weight, activation="silu"):
        gate_up = self.linear(x, gate_up_weight)  # [T, 2 * intermediate]
        # bf16 SiLU: the compiled step's one pass (the same bits as the two ops below), where the build has it
        act = self.decode_step.silu_mul(gate_up) if activation == "silu" and self.decode_step is not None else None
        if act is None:
            gate, up = gate_up.chunk(2, dim=-1)
            act = ACTIVATIONS[activation](gate) * up
        return self.linear(act, down_weight)

    def moe(self, x, topk_weights, topk_ids, gate_up_weights, down_weights):
        # each expert by the float GEMM: F.linear (transformers' own call), but for bf16 without oneDNN's bf16 GEMM,
        # whose torch fallback ran up to 7x slower, widened to fp32 from WIDEN_MIN_ROWS rows, rounded once
        return grouped_moe(x, topk_weights, topk_ids, gate_up_weights, down_weights, self.linears.float_gemm)

    def lora(self, y, x, a, b, lora):
        # Grouped by adapter (Punica's SGMV on the CPU); the base model's rows are never touched. Groups of similar
        # sizes (decode steps): padded to one length, one batched shrink and one batched expand for all adapters.
        # Otherwise (a long prompt beside short groups, where padding would cost more than it saves): one shrink and
        # one expand matmul per adapter, over all of its rows at once.
        starts = lora.group_start_host
        num_groups, num_rows = len(lora.group_adapter_host), starts[-1]
        if num_groups > 1 and num_groups * lora.max_group_tokens <= PADDED_LORA_WASTE * num_rows:
            adapters = lora.group_adapter.long()
            xs = x.index_select(0, lora.padded_rows).view(num_groups, -1, x.shape[1])  # [G, M, in]
            shrunk = torch.bmm(xs, a.index_select(0, adapters).transpose(1, 2))  # [G, M, R]
            out = torch.bmm(shrunk, b.index_select(0, adapters).transpose(1, 2))  # [G, M, out]
            return y.index_add_(0, lora.token_rows, out.view(-1, y.shape[1]).index_select(0, lora.padded_valid))
        for g, adapter in enumerate(lora.group_adapter_host):
            rows = lora.token_rows[starts[g] : starts[g + 1]]
            shrunk = torch.matmul(x.index_select(0, rows), a[adapter].t())  # [rows, R]
            y.index_add_(0, rows, torch.matmul(shrunk, b[adapter].t()))  # [rows, out]
        return y

    # encoders (bert) ------------------------------------------------------------------------------
    def layer_norm(self, x, weight, bias, eps, residual):
        if residual is not None:
            x = x + residual
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def encoder_attention(self, q, k, v, meta: AttentionMetadata, scale):
        # Loop-free: the step's sequences padded into one [S, heads, max_len, d] batch for one SDPA call, padded
        # keys masked off; the mask and row maps are built once per step, not per layer.
        num_tokens, num_heads, head_dim = q.shape
        rows, valid, key_mask = self._encoder_layout(meta)
        num_seqs, max_len = valid.shape

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [S, h, max_len, d]
            out = x.new_zeros((num_seqs * max_len, x.shape[1], head_dim))
            out.index_copy_(0, rows, x)
            return out.view(num_seqs, max_len, x.shape[1], head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=key_mask, scale=scale,
                                           enable_gqa=True)  # [S, heads, max_len, d]
        return o.transpose(1, 2).reshape(num_seqs * max_len, num_heads, head_dim).index_select(0, rows)

    def _encoder_layout(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per step: padded row of each token [T], the valid positions [S, max_len] and the key mask
        [S, 1, 1, max_len]."""
        if self._encoder_meta is not meta:
            assert meta.query_lens_host == meta.seq_lens_host, "an encoder computes each sequence whole"
            lens = torch.tensor(meta.query_lens_host)
            max_len = meta.max_query_len
            valid = torch.arange(max_len)[None, :] < lens[:, None]  # [S, max_len]
            rows = valid.flatten().nonzero().flatten()  # [T], in token order: sequences are contiguous
            self._encoder_meta, self._encoder_cached = meta, (rows, valid, valid[:, None, None, :])
        return self._encoder_cached

