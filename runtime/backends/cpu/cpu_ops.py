"""The cpu backend: the Ops contract in plain PyTorch, batched over the flattened tokens of a step."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pllm.models.ops import ACTIVATIONS, AttentionMetadata
from pllm.runtime.backends.cpu.cpu_decode_stack import bind_stack
from pllm.runtime.backends.cpu.cpu_decode_step import CpuDecodeStep
from pllm.runtime.backends.cpu.cpu_kernels import (
    CpuDecodeAttention,
    CpuRmsNorm,
    CpuRopeKvWrite,
    check_step_rows,
)
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
    """Reference-quality and fast: one-token queries through the build's compiled kernel (else one gather + batched
    matmuls), SDPA per prompt segment."""

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
        self.decode_attention = decode_attention
        self.prefill_attention = prefill_attention  # prompt chunks (bf16, AVX-512 BF16, no soft-cap)
        self.quant_kernel = quant_kernel  # builds with packed weights
        self.decode_step = decode_step  # the build's whole decode step, bound to a model's weights by decode_stack
        self.linears = CpuLinear(quant_kernel, decode_step, huge_pages)  # every linear's route (cpu_linear.py)
        self.rms_norm_kernel = rms_norm_kernel  # bfloat16 builds only
        self.rope_kernel = rope_kernel
        self._kernel_meta: AttentionMetadata | None = None  # the step whose one-token-query rows are cached
        self._kernel_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]
        self._decode_meta: AttentionMetadata | None = None  # the step whose decode layout is cached
        # window (None: whole context) -> that step's decode rows and mask
        self._decode_cached: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
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

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, window=None, softcap=None):
        if self.decode_attention is None and meta.is_decode_only:
            return self._decode(q, k_cache, v_cache, meta, scale, window, softcap)
        out = torch.empty_like(q)
        if self.decode_attention is not None:
            # every one-token query (decodes, and one-token prompt chunks) in one kernel call; the rest below
            tables, lens, rows = self._one_token_rows(meta)
            if rows.numel():
                self.decode_attention(q, k_cache, v_cache, tables, lens, rows, meta.max_seq_len, scale, out,
                                      window, softcap)
            if meta.is_decode_only:
                return out
        if self.prefill_attention is not None and softcap is None:
            elsewhere = self.decode_attention is not None  # the one-token queries went to the decode kernel above
            seqs, max_keys = self.prefill_attention.sequences(meta, one_token_elsewhere=elsewhere)
            if seqs.numel():
                self.prefill_attention(q, k_cache, v_cache, meta, seqs, max_keys, scale, out, window)
            return out
        block_size = k_cache.shape[1]
        start = 0
        for i, (query_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            if query_len == 1 and self.decode_attention is not None:
                start += 1
                continue
            num_blocks = -(-seq_len // block_size)
            # a windowed layer reads only the blocks from the one holding its first query's oldest visible key
            first_block = 0 if window is None else max(0, seq_len - query_len - window + 1) // block_size
            skipped = first_block * block_size  # keys before the gathered ones: positions shift by this much
            blocks = meta.block_tables[i, first_block:num_blocks].long()
            k = k_cache.index_select(0, blocks).flatten(0, 1)[: seq_len - skipped]  # [keys, kv_heads, head_dim]
            v = v_cache.index_select(0, blocks).flatten(0, 1)[: seq_len - skipped]
            qs = q[start : start + query_len]  # [query_len, heads, head_dim]
            out[start : start + query_len] = _attend(qs, k, v, seq_len - query_len - skipped, scale, window, softcap)
            start += query_len
        return out

    def _one_token_rows(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per step: block tables [S1, max_blocks], seq lens [S1] and q rows [S1] of the S1 one-token queries."""
        if self._kernel_meta is not meta:
            if meta.is_decode_only:
                rows = torch.arange(meta.num_seqs)
                tables, lens = meta.block_tables, meta.seq_lens
            else:
                seqs = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
                index = torch.tensor(seqs, dtype=torch.int64)
                rows = meta.query_start_loc[:-1].long().index_select(0, index)
                tables = meta.block_tables.index_select(0, index)
                lens = meta.seq_lens.index_select(0, index)
            check_step_rows(sum(meta.query_lens_host), lens, rows, meta.max_seq_len)
            self._kernel_meta, self._kernel_rows = meta, (tables.contiguous(), lens.contiguous(), rows)
        return self._kernel_rows

    def _decode_layout(
        self, meta: AttentionMetadata, block_size: int, num_kv_heads: int, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per step and window, not per layer: cache row of every (sequence, kv head, position), and the mask.

        Gathering K/V rows straight into [B, kv, L, d] order with one index_select skips both the slow advanced
        indexing and a transpose copy; positions past a sequence's end, and before a windowed layer's window (their
        blocks may be back in the pool), read the sequence's newest row and are masked out.
        """
        if self._decode_meta is not meta:
            self._decode_meta, self._decode_cached = meta, {}
        if window not in self._decode_cached:
            max_len = meta.max_seq_len
            pos = torch.arange(max_len, device=meta.block_tables.device)
            lens = torch.tensor(meta.seq_lens_host, device=pos.device)
            hidden = pos[None, :] >= lens[:, None]  # [B, L]
            if window is not None:
                hidden |= pos[None, :] <= lens[:, None] - 1 - window  # transformers' key > query - window
            blocks = meta.block_tables[:, pos // block_size].long()  # [B, L]
            slots = blocks * block_size + pos % block_size  # [B, L]
            # hidden positions read the sequence's own newest row instead: finite, and in a block it holds
            newest = slots.gather(1, (lens - 1)[:, None].long())  # [B, 1]
            slots = torch.where(hidden, newest, slots)
            heads = torch.arange(num_kv_heads, device=slots.device)
            rows = slots[:, None, :] * num_kv_heads + heads[None, :, None]  # [B, kv, L]
            self._decode_cached[window] = (rows.flatten(), hidden[:, None, None, :])
        return self._decode_cached[window]

    def _decode(self, q, k_cache, v_cache, meta, scale, window, softcap):
        # q [B, heads, d]; every sequence's context gathered and padded to max_seq_len
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        rows, pad = self._decode_layout(meta, block_size, num_kv_heads, window)
        k = k_cache.view(-1, head_dim).index_select(0, rows).view(num_seqs, num_kv_heads, -1, head_dim)  # [B,kv,L,d]
        v = v_cache.view(-1, head_dim).index_select(0, rows).view(num_seqs, num_kv_heads, -1, head_dim)
        qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, kv, group, d]
        # batched matmuls in the model dtype (fp32 accumulation inside), softmax in fp32
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, kv, group, L]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores.masked_fill_(pad, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)  # [B, kv, group, d]
        return out.reshape(num_seqs, num_heads, head_dim)

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


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int, scale: float, window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [Tq, heads, d] after num_prefix cached tokens; k, v [num_prefix + Tq, kv_heads, d]; causal."""
    query_len, seq_len = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if num_prefix == 0 and window is None and softcap is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)  # [Tq, heads, d]
    rows = torch.arange(query_len, device=q.device)[:, None] + num_prefix
    keys = torch.arange(seq_len, device=q.device)[None, :]
    mask = keys <= rows  # [Tq, seq_len]
    if window is not None:
        mask &= keys > rows - window  # transformers' sliding window: key > query - window
    if softcap is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)  # [Tq, heads, d]
    # SDPA has no soft-cap: scores by hand, in transformers' eager order (scale, cap, mask, fp32 softmax)
    group = q.shape[1] // k.shape[1]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)  # [1, heads, seq_len, d]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [1, heads, Tq, seq_len]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vh)[0].transpose(0, 1)  # [Tq, heads, d]
