"""The engine -> worker step contract: one step's work as frozen plain values, and what the step returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pllm.models.pooling import Pooling
from pllm.runtime.engine.sampling_params import SamplingParams

__all__ = ["DraftInputs", "GroupBlockTable", "Pooling", "SampleInputs", "SeqStep", "StepBatch", "StepOutput"]


@dataclass(frozen=True)
class GroupBlockTable:
    """One sequence's blocks in one KV layer group. The first_block blocks before block_ids are out of the
    group's window, back in its pool: no query of the step attends to them, so the runner points them at the
    group's padding block."""

    first_block: int  # the block of the sequence block_ids[0] holds; 0 for a global group
    block_ids: tuple[int, ...]  # [num_live_blocks], in position order


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's logprobs as the worker scored them; the engine's output processor turns it into the
    dict[int, Logprob] a RequestOutput carries (vLLM's shape), adding each token's text."""

    token_id: int  # the chosen (or, for a prompt position, the given) token
    logprob: float  # its log-probability under log_softmax of the raw logits
    rank: int  # 1 + the vocabulary entries scoring above it, ties counted too (vLLM's count of logprobs >= it)
    top: tuple[tuple[int, float], ...]  # the params.logprobs best (token_id, logprob), best first


@dataclass(frozen=True)
class SampleInputs:
    """What the sampler needs of one sequence whose step yields a token."""

    draw_index: int  # which of the sequence's output tokens this row yields: a seeded request's draw is keyed by it
    params: SamplingParams
    prompt_token_ids: tuple[int, ...]  # only when params.repetition_penalty applies (it counts the prompt), else ()
    output_token_ids: tuple[int, ...]  # only when a penalty applies, else ()
    masked_token_ids: frozenset[int]  # ids it may not pick yet (the stop ids while under min_tokens)
    # structured output: [ceil(vocab_size / 32)] int32 on the CPU, bit t set when the grammar allows token t next
    # (at a verify step's row j: after the guesses before it); None when unconstrained (or every token is allowed)
    token_bitmask: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptLogprobInputs:
    """Which of a prompt chunk's rows yield prompt logprobs: row i of the chunk (position start_position + i)
    predicts the token after it, so the rows from first_position on score target_token_ids, one each."""

    num_top: int  # params.prompt_logprobs: how many best tokens to list per position
    first_position: int  # the first row's position; >= the chunk's start (rows a preemption already scored skip)
    target_token_ids: tuple[int, ...]  # the prompt tokens at first_position + 1, first_position + 2, ...


@dataclass(frozen=True)
class DraftInputs:
    """A decode step that verifies drafted tokens (speculative decoding): the last len(token_ids) tokens of the
    step are guesses, and each of the step's last len(token_ids) + 1 rows is scored. Row j predicts the token after
    the j-th guess (row 0: after the last known token), as the sequence would stand had guesses 0..j-1 been right."""

    token_ids: tuple[int, ...]  # [num_drafts] the guessed tokens, the tail of SeqStep.token_ids
    rows: tuple[SampleInputs, ...]  # [num_drafts + 1] the sampler's inputs at each scored row, in order

    def __post_init__(self) -> None:
        assert self.token_ids and len(self.rows) == len(self.token_ids) + 1, "one scored row per draft, and one more"


@dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step: which tokens to compute, where they go in the KV cache, and what follows."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens computed this step
    start_position: int  # position of token_ids[0]: the sequence's tokens already in the KV cache
    # one per KV layer group (models.kv_groups order), covering every position up to start_position + len(token_ids)
    block_tables: tuple[GroupBlockTable, ...]
    completes: bool  # this step reaches the end of the sequence
    seq_total_len: int  # the request's known tokens when scheduled (prompt + outputs so far): its length
    sample: SampleInputs | None = None  # set when the step yields a token (it completes a generating sequence)
    pooling: Pooling | None = None  # set for an embedding sequence: its rows are pooled
    prompt_logprobs: PromptLogprobInputs | None = None  # set when rows of this chunk score prompt tokens
    lora_slot: int = 0  # 0: the base model; k >= 1: the k-th loaded LoRA adapter (the runner's stack index k - 1)
    draft: DraftInputs | None = None  # set when the step verifies drafted tokens; then sample is draft.rows[0]

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_scored_rows(self) -> int:
        """Rows of StepOutput.logits this sequence owns: its drafts + 1 when verifying, 1 when sampling, else 0."""
        if self.draft is not None:
            return len(self.draft.rows)
        return 1 if self.sample is not None else 0

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class StepBatch:
    """One step for the runner: decodes first, then prompt chunks (the scheduler's order)."""

    seqs: tuple[SeqStep, ...]

    @property
    def sampling(self) -> tuple[SampleInputs, ...]:
        """The rows of StepOutput.logits, in batch order: one per sequence that yields a token, and for one that
        verifies drafts, one per scored row (DraftInputs.rows)."""
        rows: list[SampleInputs] = []
        for s in self.seqs:
            if s.draft is not None:
                rows.extend(s.draft.rows)
            elif s.sample is not None:
                rows.append(s.sample)
        return tuple(rows)

    @property
    def has_drafts(self) -> bool:
        return any(s.draft is not None for s in self.seqs)


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # [num_scored_rows, vocab_size] float32, in batch order (StepBatch.sampling)
    # request_id -> [hidden_size] float32 for each pooling sequence this step: its pooled part (a sum of this
    # chunk's rows for mean pooling over several chunks; the mean of a whole prompt; the last token's row; the
    # chunk's first row for CLS pooling, of which the pooler keeps the first chunk's)
    pooled: dict[str, torch.Tensor]
    # request_id -> the prompt logprobs this step scored for it, in position order (SeqStep.prompt_logprobs)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
