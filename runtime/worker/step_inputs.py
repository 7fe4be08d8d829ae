"""StepBatch -> the step's input tensors and attention metadata, one metadata per KV layer group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm.models.lora import LoraInputs
from pllm.models.ops import AttentionMetadata
from pllm.runtime.worker.step import StepBatch

ALIGN_BYTES = 64  # where each of _views' views starts in its shared tensor


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    # one per KV layer group: the same positions and lengths, each with its group's slot mapping and block tables
    metas: tuple[AttentionMetadata, ...]
    # [num_scored_rows] int64: the row of each sampling sequence's last token; a sequence verifying drafts scores
    # its last num_drafts + 1 rows
    sample_indices: torch.Tensor
    pool_rows: tuple[tuple[int, int, int], ...]  # (batch index, first row, end row) of each pooling sequence
    # [num_scored_rows] int64, the rows SeqStep.prompt_logprobs score, in order; None when no sequence asks
    prompt_logprob_rows: torch.Tensor | None
    lora: LoraInputs | None = None  # the rows under a LoRA adapter, grouped by adapter; None: all base

    @property
    def meta(self) -> AttentionMetadata:
        """The first group's metadata: what every group shares (positions, lengths), and its own tables."""
        return self.metas[0]


def prepare_step(batch: StepBatch, block_size: int, pad_blocks: tuple[int, ...], device: torch.device,
                 num_lora_adapters: int = 0) -> StepInputs:
    """pad_blocks: each group's padding block, where table entries of blocks a window returned point (no query of
    the step attends to them; the kernels may still load them whole and mask, so they must be real blocks).
    num_lora_adapters: how many adapters the runner holds (a sequence's lora_slot is 1..that; 0 is the base)."""
    num_groups = len(pad_blocks)
    input_ids: list[int] = []
    positions: list[int] = []
    total_lens: list[int] = []
    slots: list[list[int]] = [[] for _ in range(num_groups)]
    tables: list[list[tuple[int, ...]]] = [[] for _ in range(num_groups)]
    query_start = [0]
    seq_lens: list[int] = []
    query_lens: list[int] = []
    sample_rows: list[int] = []
    pool_rows: list[tuple[int, int, int]] = []
    prompt_rows: list[int] = []
    lora_rows: list[tuple[int, int, int]] = []  # (first row, end row, slot) of each sequence
    bs = block_size
    max_blocks = 0
    for i, s in enumerate(batch.seqs):
        start, end = s.start_position, s.end_position
        input_ids.extend(s.token_ids)
        positions.extend(range(start, end))
        total_lens.extend([s.seq_total_len] * s.num_new_tokens)
        assert len(s.block_tables) == num_groups, s.request_id
        for g, table in enumerate(s.block_tables):
            block_ids = table.block_ids
            if table.first_block:
                block_ids = (pad_blocks[g],) * table.first_block + block_ids
            tables[g].append(block_ids)
            slots[g].extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
        query_start.append(query_start[-1] + s.num_new_tokens)
        seq_lens.append(end)
        query_lens.append(s.num_new_tokens)
        if s.lora_slot:
            if not 1 <= s.lora_slot <= num_lora_adapters:
                raise ValueError(f"request {s.request_id}: LoRA slot {s.lora_slot} is not loaded "
                                 f"({num_lora_adapters} adapters)")
            lora_rows.append((query_start[-2], query_start[-1], s.lora_slot))
        max_blocks = max(max_blocks, -(-end // bs))
        if s.prompt_logprobs is not None:
            first = query_start[-2] + s.prompt_logprobs.first_position - start
            prompt_rows.extend(range(first, first + len(s.prompt_logprobs.target_token_ids)))
        if s.sample is not None:
            sample_rows.extend(range(query_start[-1] - s.num_scored_rows, query_start[-1]))
        elif s.pooling is not None:
            pool_rows.append((i, query_start[-2], query_start[-1]))
    # two host-to-device copies a step: every int64 vector in one tensor, every int32 one (the padded block tables
    # flattened) in another, handed out as views (contiguous, each starting on a 64-byte boundary as a tensor of its
    # own would: Triton specialises a kernel on its pointers' 16-byte alignment; nothing writes into them)
    num_seqs = len(seq_lens)
    input_ids_t, positions_t, total_lens_t, *slots_t, sample_rows_t, prompt_rows_t = _views(
        [input_ids, positions, total_lens, *slots, sample_rows, prompt_rows], torch.int64, device)
    query_start_t, seq_lens_t, *tables_t = _views(
        [query_start, seq_lens, *(_padded(g, max_blocks) for g in tables)], torch.int32, device)
    shared = dict(
        positions=positions_t,
        query_start_loc=query_start_t,
        seq_lens=seq_lens_t,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
        seq_total_lens=total_lens_t,
    )
    metas = tuple(
        AttentionMetadata(slot_mapping=slots_t[g], block_tables=tables_t[g].view(num_seqs, max_blocks), **shared)
        for g in range(num_groups)
    )
    return StepInputs(
        input_ids_t,
        metas,
        sample_rows_t,
        tuple(pool_rows),
        prompt_rows_t if prompt_rows else None,
        LoraInputs.from_slots(lora_rows, device),
    )


def _padded(tables: list[tuple[int, ...]], max_blocks: int) -> list[int]:
    """[num_seqs * max_blocks]: each sequence's table cut or padded with 0 to max_blocks, row after row."""
    flat: list[int] = []
    for ids in tables:
        flat.extend(ids[:max_blocks])
        flat.extend([0] * (max_blocks - min(len(ids), max_blocks)))
    return flat


def _views(vectors: list[list[int]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One tensor of `dtype` on `device` holding every vector, each padded with zeros to ALIGN_BYTES; the views of
    the vectors' own lengths, in order."""
    per = ALIGN_BYTES // dtype.itemsize
    flat: list[int] = []
    starts: list[int] = []
    for v in vectors:
        starts.append(len(flat))
        flat.extend(v)
        flat.extend([0] * (-len(v) % per))
    whole = torch.tensor(flat, dtype=dtype, device=device)
    return [whole[start : start + len(v)] for start, v in zip(starts, vectors)]
