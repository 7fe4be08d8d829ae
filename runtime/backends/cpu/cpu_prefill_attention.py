"""kernels/cpu_prefill_attention.so: the causal attention of a step's prompt chunks, K/V read in place from the paged
cache, both products on AVX-512 BF16 (the template says how). Where the CPU lacks those instructions the library
does not run and the cpu backend keeps torch's SDPA for prompts (cpu_kernels.py leaves it out)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from pllm.models.ops import AttentionMetadata


class CpuPrefillAttention:
    """One call a layer for every sequence of a step that the decode attention does not take."""

    def __init__(self, library: Path, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        # the shape the kernel was specialised to: it trusts every pointer and index it is given
        self.block_size, self.num_heads = block_size, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib = ctypes.CDLL(str(library))
        self._fn = lib.pllm_prefill_attention
        self._fn.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i32, ctypes.c_float, i32, ptr, ctypes.c_int]
        self._fn.restype = ctypes.c_int
        lib.pllm_prefill_attention_runs.restype = ctypes.c_int
        self.runs = bool(lib.pllm_prefill_attention_runs())  # this CPU has AVX-512 BF16 (and the build the code)
        # per step (its metadata, one per KV layer group: a windowed model alternates two) and one_token_elsewhere:
        # the sequences the kernel attends and the most keys one has
        self._cached: dict[tuple[int, bool], tuple[AttentionMetadata, torch.Tensor, int]] = {}

    def sequences(self, meta: AttentionMetadata, one_token_elsewhere: bool) -> tuple[torch.Tensor, int]:
        """Per step, not per layer: the sequences this kernel attends (those of more than one query token, and the
        one-token ones too unless one_token_elsewhere) as an int64 tensor, and the most keys one of them has; their
        indices checked once here, since the kernel trusts them."""
        found = self._cached.get((id(meta), one_token_elsewhere))
        if found is not None and found[0] is meta:
            return found[1], found[2]
        picked = [i for i, n in enumerate(meta.query_lens_host) if n > 1 or not one_token_elsewhere]
        for i in picked:
            query_len, seq_len = meta.query_lens_host[i], meta.seq_lens_host[i]
            assert 1 <= query_len <= seq_len <= meta.max_seq_len, (i, query_len, seq_len)
        assert meta.block_tables.shape[1] * self.block_size >= meta.max_seq_len, "block tables narrower than keys"
        assert meta.query_start_loc.dtype == torch.int32 and meta.query_start_loc.is_contiguous()
        assert meta.seq_lens.dtype == torch.int32 and meta.seq_lens.is_contiguous()
        assert meta.block_tables.dtype == torch.int32 and meta.block_tables.is_contiguous()
        assert meta.block_tables.shape[0] >= meta.num_seqs and meta.seq_lens.shape[0] == meta.num_seqs
        # the kernel reads the tensors: they must say what the host copies checked above say
        assert meta.seq_lens.tolist() == list(meta.seq_lens_host), "seq_lens and their host copy differ"
        starts = meta.query_start_loc.tolist()
        assert [b - a for a, b in zip(starts, starts[1:])] == list(meta.query_lens_host), "query starts differ"
        most = max((meta.seq_lens_host[i] for i in picked), default=0)
        if len(self._cached) >= 4:  # the metadata of earlier steps
            self._cached.clear()
        seqs = torch.tensor(picked, dtype=torch.int64)
        self._cached[(id(meta), one_token_elsewhere)] = (meta, seqs, most)
        return seqs, most

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 seqs: torch.Tensor, max_keys: int, scale: float, out: torch.Tensor, window: int | None = None) -> None:
        """out's rows of the sequences seqs (sequences()) = their causal attention over the cache (a windowed
        layer's: each query's last `window` keys); other rows untouched. q, out [T, H, D] bf16; caches
        [num_blocks, block_size, KV, D] bf16."""
        assert window is None or window >= 1, window
        for t in (q, k_cache, v_cache, out):
            assert t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu", (t.dtype, t.shape)
        assert q.shape[1:] == (self.num_heads, self.head_dim) and out.shape == q.shape, q.shape
        assert k_cache.shape[1:] == (self.block_size, self.num_kv_heads, self.head_dim), k_cache.shape
        assert k_cache.shape == v_cache.shape
        assert meta.query_start_loc.shape[0] == meta.num_seqs + 1 and int(meta.query_start_loc[-1]) <= q.shape[0]
        assert seqs.dtype == torch.int64 and seqs.is_contiguous() and seqs.dim() == 1, "sequences(meta)'s seqs"
        status = self._fn(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), meta.block_tables.data_ptr(),
            meta.block_tables.shape[1], meta.query_start_loc.data_ptr(), meta.seq_lens.data_ptr(), seqs.data_ptr(),
            seqs.shape[0], max_keys, scale, window or 0, out.data_ptr(), torch.get_num_threads(),
        )
        if status == -1:
            raise MemoryError("cpu prefill attention could not allocate its scratch buffers")
        assert status == 0, f"cpu prefill attention returned {status} (it does not run on this CPU)"
