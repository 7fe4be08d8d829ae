"""StepBatch -> the step's input tensors and attention metadata, one metadata per KV layer group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm.models.lora import LoraInputs
from pllm.models.ops import AttentionMetadata
from pllm.runtime.worker.step import StepBatch


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
    dev = device
    shared = dict(
        positions=torch.tensor(positions, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
        seq_total_lens=torch.tensor(total_lens, dtype=torch.int64, device=dev),
    )
    metas = tuple(
        AttentionMetadata(
            slot_mapping=torch.tensor(slots[g], dtype=torch.int64, device=dev),
            block_tables=_block_tables(tables[g], max_blocks).to(dev),
            **shared,
        )
        for g in range(num_groups)
    )
    return StepInputs(
        torch.tensor(input_ids, dtype=torch.int64, device=dev),
        metas,
        torch.tensor(sample_rows, dtype=torch.int64, device=dev),
        tuple(pool_rows),
        torch.tensor(prompt_rows, dtype=torch.int64, device=dev) if prompt_rows else None,
        LoraInputs.from_slots(lora_rows, dev),
    )


def _block_tables(tables: list[tuple[int, ...]], max_blocks: int) -> torch.Tensor:
    """[num_seqs, max_blocks] int32, each row its sequence's table padded with 0."""
    out = torch.zeros((len(tables), max_blocks), dtype=torch.int32)
    for i, ids in enumerate(tables):
        ids = ids[:max_blocks]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out
