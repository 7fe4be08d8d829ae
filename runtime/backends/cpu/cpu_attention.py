"""The cpu backend's attention over the paged KV cache (TorchOps.attention): one-token queries through the build's
compiled decode kernel (else one gather + batched matmuls), prompt chunks through the compiled prefill kernel where
this CPU runs it (else torch's SDPA, one call a sequence)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pllm.models.ops import AttentionMetadata
from pllm.runtime.backends.cpu.cpu_kernels import CpuDecodeAttention, check_step_rows
from pllm.runtime.backends.cpu.cpu_prefill_attention import CpuPrefillAttention


class CpuAttention:
    """Which code attends which rows of a step, with what it keeps per step (rows, layouts) between layers."""

    def __init__(self, decode_attention: CpuDecodeAttention | None = None,
                 prefill_attention: CpuPrefillAttention | None = None) -> None:
        self.decode_attention = decode_attention
        self.prefill_attention = prefill_attention  # prompt chunks (bf16, AVX-512 BF16, no soft-cap)
        self._kernel_meta: AttentionMetadata | None = None  # the step whose one-token-query rows are cached
        self._kernel_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]
        self._decode_meta: AttentionMetadata | None = None  # the step whose decode layout is cached
        # window (None: whole context) -> that step's decode rows and mask
        self._decode_cached: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, window=None, softcap=None):
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
