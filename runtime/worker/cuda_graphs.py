"""Decode steps as CUDA graphs: one captured forward per batch size, replayed on static input buffers.

A decode step launches a dozen kernels per layer; at small batches the GPU finishes each one sooner than Python
launches the next, so the step is bound by launch overhead, not by the GPU. A captured graph replays the whole
forward (embedding, every layer, final norm) as one launch. The logits GEMM and sampling stay outside: they run
once per step on the rows that sample.

A graph holds fixed tensor addresses and fixed launch grids, so each captured batch size reads its inputs from
slices of the same static buffers, and its attention metadata says max_seq_len = max_model_len (the decode
kernel's split count is a function of batch size and max_seq_len only, and each program clips its split to its
own sequence's length). A step of n sequences replays the graph of the smallest captured size >= n; padding rows
decode token 0 at position 0 against the padding block, a KV block the cache manager never hands out, so they
write and read nothing of any real sequence, and their outputs are dropped. Each KV layer group has its own pool,
so its own slot mapping, block tables and padding block.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from functools import partial

import torch

from pllm.models.ops import AttentionMetadata

DEFAULT_MAX_CAPTURE_SIZE = 256  # larger decode batches are compute-bound: launch overhead no longer matters
# (input_ids, one metadata per KV layer group) -> hidden [T, H]
Forward = Callable[[torch.Tensor, tuple[AttentionMetadata, ...]], torch.Tensor]
Replay = Callable[[], torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor], object], Replay]  # (step, memory pool) -> replay


def default_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included) or 256: padding wastes < 8 rows."""
    cap = min(max_num_seqs, DEFAULT_MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, *range(8, cap + 1, 8)) if s <= cap]
    if sizes[-1] != cap:
        sizes.append(cap)
    return tuple(sizes)


def cuda_capture(step: Callable[[], torch.Tensor], pool: object) -> Replay:
    """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture one step into a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def eager_capture(step: Callable[[], torch.Tensor], pool: object) -> Replay:
    """No graph: each replay runs the step again on the static buffers and copies its result into one output
    tensor, as a graph's replays all return the same one. The padding and buffer logic of the graphs, without a
    GPU (tests use it with the interpret backend)."""
    out = step()

    def replay() -> torch.Tensor:
        out.copy_(step())
        return out

    return replay


class DecodeGraphs:
    """Static input buffers sized for the largest captured batch, and one replay per captured batch size."""

    def __init__(
        self,
        forward: Forward,
        sizes: Sequence[int],
        device: torch.device,
        max_model_len: int,
        block_size: int,
        pad_blocks: tuple[int, ...],  # per KV layer group, its padding block
        capture: Capture = cuda_capture,
    ):
        self.sizes = tuple(sorted(set(sizes)))
        assert self.sizes and self.sizes[0] >= 1, f"capture sizes must be positive: {sizes}"
        assert pad_blocks, "one padding block per KV group"
        self.max_model_len = max_model_len
        self.pad_blocks = pad_blocks
        self.pad_slots = tuple(b * block_size for b in pad_blocks)
        n = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_total_lens = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mappings = tuple(torch.full((n,), s, dtype=torch.int64, device=device) for s in self.pad_slots)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = tuple(torch.full((n, max_blocks), b, dtype=torch.int32, device=device) for b in pad_blocks)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.replays: dict[int, Replay] = {}
        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory from the pool
            self.replays[size] = capture(partial(forward, self.input_ids[:size], self.metas(size)), pool)

    def metas(self, size: int) -> tuple[AttentionMetadata, ...]:
        """The static metadata, per group, a graph of `size` rows is captured with (host fields fixed at capture)."""
        return tuple(
            AttentionMetadata(
                positions=self.positions[:size],
                slot_mapping=slots[:size],
                query_start_loc=self.query_start_loc[: size + 1],
                seq_lens=self.seq_lens[:size],
                block_tables=tables[:size],
                max_query_len=1,
                max_seq_len=self.max_model_len,
                query_lens_host=(1,) * size,
                seq_lens_host=(self.max_model_len,) * size,
                seq_total_lens=self.seq_total_lens[:size],
            )
            for slots, tables in zip(self.slot_mappings, self.block_tables, strict=True)
        )

    def size_for(self, num_seqs: int) -> int | None:
        """The smallest captured batch size that holds num_seqs sequences, or None if none does."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(self, input_ids: torch.Tensor, metas: tuple[AttentionMetadata, ...]) -> torch.Tensor | None:
        """Hidden states [num_seqs, hidden] of a decode-only step by graph replay; None if no graph fits it.

        The result is a view of the graph's output buffer: valid until the next replay of any size (the graphs
        share one memory pool), so use it before the next step."""
        meta = metas[0]
        n = meta.num_seqs
        size = self.size_for(n)
        if size is None or not meta.is_decode_only:
            return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        if meta.seq_total_lens is not None:
            self.seq_total_lens[:n].copy_(meta.seq_total_lens)
        else:
            self.seq_total_lens[:n].copy_(meta.positions + 1)  # what None means
        self.seq_lens[:n].copy_(meta.seq_lens)
        for m, slots, tables in zip(metas, self.slot_mappings, self.block_tables, strict=True):
            slots[:n].copy_(m.slot_mapping)
            tables[:n, : m.block_tables.shape[1]].copy_(m.block_tables)
        if size > n:  # rows a larger earlier step filled must not write into that step's KV slots again
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.seq_total_lens[n:size].fill_(1)
            self.seq_lens[n:size].fill_(1)
            for pad_block, pad_slot, slots, tables in zip(self.pad_blocks, self.pad_slots, self.slot_mappings,
                                                          self.block_tables, strict=True):
                slots[n:size].fill_(pad_slot)
                tables[n:size, 0].fill_(pad_block)
        return self.replays[size]()[:n]
