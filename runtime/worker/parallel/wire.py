"""A step as rank 0 sends it to the other ranks: a fixed header of int64 sizes, then one int64 payload tensor.

The header (HEADER_LEN int64, raw bytes over each worker's pipe) says what follows; the payload (one broadcast over
the process group) holds the step's input tensors back to back. Nothing is pickled per step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch

from pllm.models.ops import AttentionMetadata
from pllm.runtime.worker.step_inputs import StepInputs

HEADER_LEN = 16
HEADER_BYTES = HEADER_LEN * 8


class Command(enum.IntEnum):
    STEP = 1  # a payload follows: run the forward pass and the LM head's collectives
    STOP = 2  # leave the process group and exit


@dataclass(frozen=True)
class Header:
    """The sizes of one step's payload; every field an int, so the header is a fixed int64 vector."""

    command: Command
    num_tokens: int = 0
    num_seqs: int = 0
    num_groups: int = 0
    max_blocks: int = 0  # columns of each group's block table
    max_query_len: int = 0
    max_seq_len: int = 0
    num_sample: int = 0  # rows the LM head runs on for sampling
    num_prompt_rows: int = 0  # rows scored for prompt logprobs
    payload_len: int = 0

    def to_bytes(self) -> bytes:
        values = [self.command, self.num_tokens, self.num_seqs, self.num_groups, self.max_blocks, self.max_query_len,
                  self.max_seq_len, self.num_sample, self.num_prompt_rows, self.payload_len]
        return np.array(values + [0] * (HEADER_LEN - len(values)), dtype=np.int64).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Header:
        if len(data) != HEADER_BYTES:
            raise ValueError(f"step header of {len(data)} bytes, expected {HEADER_BYTES}")
        v = np.frombuffer(data, dtype=np.int64).tolist()
        return cls(Command(v[0]), *v[1:10])


STOP = Header(Command.STOP)


def encode(inputs: StepInputs) -> tuple[Header, torch.Tensor]:
    """The step's tensors (on rank 0's device) as one int64 payload, and the header that sizes it."""
    meta = inputs.meta
    assert meta.seq_total_lens is not None  # prepare_step always fills it
    parts = [inputs.input_ids, meta.positions, meta.seq_total_lens, meta.query_start_loc, meta.seq_lens]
    for m in inputs.metas:
        parts += [m.slot_mapping, m.block_tables.flatten()]
    parts.append(inputs.sample_indices)
    rows = inputs.prompt_logprob_rows
    if rows is not None:
        parts.append(rows)
    payload = torch.cat([p.to(torch.int64) for p in parts])
    header = Header(
        Command.STEP,
        num_tokens=inputs.input_ids.shape[0],
        num_seqs=meta.num_seqs,
        num_groups=len(inputs.metas),
        max_blocks=meta.block_tables.shape[1],
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        num_sample=inputs.sample_indices.shape[0],
        num_prompt_rows=0 if rows is None else rows.shape[0],
        payload_len=payload.shape[0],
    )
    return header, payload


def decode(header: Header, payload: torch.Tensor) -> StepInputs:
    """The inverse of encode, on a worker's device (host copies of the lengths read from the payload)."""
    t, s = header.num_tokens, header.num_seqs
    sizes = [t, t, t, s + 1, s]
    for _ in range(header.num_groups):
        sizes += [t, s * header.max_blocks]
    sizes += [header.num_sample, header.num_prompt_rows]
    pieces = list(payload.split(sizes))
    input_ids, positions, total_lens, query_start, seq_lens = pieces[:5]
    host_start = query_start.tolist()
    host_lens = tuple(seq_lens.tolist())
    shared = dict(
        positions=positions,
        query_start_loc=query_start.to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        max_query_len=header.max_query_len,
        max_seq_len=header.max_seq_len,
        query_lens_host=tuple(b - a for a, b in zip(host_start, host_start[1:])),
        seq_lens_host=host_lens,
        seq_total_lens=total_lens,
    )
    metas = tuple(
        AttentionMetadata(
            slot_mapping=pieces[5 + 2 * g],
            block_tables=pieces[6 + 2 * g].view(s, header.max_blocks).to(torch.int32),
            **shared,
        )
        for g in range(header.num_groups)
    )
    sample, rows = pieces[-2], pieces[-1]
    return StepInputs(input_ids, metas, sample, (), rows if header.num_prompt_rows else None)
