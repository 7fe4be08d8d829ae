"""Request: one sequence's state in the engine; ScheduledBatch: one step's work, and its snapshot for the worker."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.step import (
    DraftInputs,
    GroupBlockTable,
    Pooling,
    PromptLogprobInputs,
    SampleInputs,
    SeqStep,
    StepBatch,
)

__all__ = [
    "BlockTable", "FinishReason", "Pooling", "Request", "RequestStatus", "ScheduledBatch", "ScheduledSeq",
    "StopChecker",
]

if TYPE_CHECKING:
    from pllm.runtime.engine.structured_output import GrammarState, SequenceGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted (its blocks freed, recomputed from scratch later)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(eq=False)
class BlockTable:
    """A request's blocks in one KV layer group, which only that group's allocator changes."""

    block_ids: list[int] = field(default_factory=list)  # live blocks: block_ids[j] holds block num_dropped + j
    num_dropped: int = 0  # leading blocks returned to the pool: out of a windowed group's window

    @property
    def num_blocks(self) -> int:
        """Blocks of the sequence this table covers, dropped ones included."""
        return self.num_dropped + len(self.block_ids)

    def frozen(self) -> GroupBlockTable:
        return GroupBlockTable(self.num_dropped, tuple(self.block_ids))


@dataclass(eq=False)
class Request:
    """One sequence. A request with n > 1 is fanned out by the engine into n Requests sharing a prompt."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    max_tokens: int = 16  # resolved limit on output tokens (params.max_tokens clamped by max_model_len)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache (prefix hits included)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    # one per KV layer group (models.kv_groups order), each changed only by its group's allocator
    block_tables: list[BlockTable] = field(default_factory=lambda: [BlockTable()])
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    pooling: Pooling | None = None  # set: an embedding request (prefill only, pooled, never samples)
    # Whether its K/V in the cache was computed with the sequence longer than the scheduler's recompute_past_len
    # (models whose every position depends on the whole length: longrope)
    kv_past_recompute_len: bool = False
    # prompt positions whose logprobs (of the token after each) have been scored: a high-water mark a
    # preemption keeps, so recomputing the prompt scores nothing twice
    num_prompt_logprob_rows: int = 0
    grammar: SequenceGrammar | None = None  # structured output: the grammar its output follows
    lora_slot: int = 0  # 0: the base model; k >= 1: the engine's k-th loaded LoRA adapter
    lora_name: str | None = None  # that adapter's name (set exactly when lora_slot is)
    lora_load: int = 0  # which load of that name (LoraRegistry.load_number): a name loaded again is new K/V
    first_scheduled_time: float | None = None  # time.monotonic() at its first admission to the batch (vLLM's)

    @property
    def cache_salt(self) -> bytes:
        """What the prefix cache's first block hash starts from: K/V computed under an adapter is the adapter's."""
        return b"" if self.lora_name is None else b"lora\0" + self.lora_name.encode() + b"\0%d" % self.lora_load

    @property
    def ready(self) -> bool:
        """The scheduler may admit it: nothing to wait for, or its grammar has compiled."""
        return self.grammar is None or self.grammar.ready

    @property
    def block_ids(self) -> list[int]:
        """The first KV group's live blocks: the whole block table of a model without windows."""
        return self.block_tables[0].block_ids

    @property
    def holds_blocks(self) -> bool:
        return any(t.block_ids for t in self.block_tables)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while some prompt token asked for (params.prompt_logprobs) has no logprob yet: the first has
        none (nothing precedes it), each other one is scored by the row of the token before it."""
        return self.params.prompt_logprobs is not None and self.num_prompt_logprob_rows < self.num_prompt_tokens - 1

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """all_token_ids[start:end] without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return tuple(self.prompt_token_ids[start:end])
        if start >= p:
            return tuple(self.output_token_ids[start - p : end - p])
        return (*self.prompt_token_ids[start:], *self.output_token_ids[: end - p])


@dataclass(frozen=True)
class ScheduledSeq:
    """The scheduler's view of one sequence in a step: the live request (for update) and its token count."""

    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens, drafts included
    draft_token_ids: tuple[int, ...] = ()  # guesses computed after the sequence's last token, verified this step

    @property
    def num_known_tokens(self) -> int:
        """Tokens of the sequence itself computed this step (num_new_tokens less the drafts)."""
        return self.num_new_tokens - len(self.draft_token_ids)

    @property
    def completes(self) -> bool:
        """True when this step reaches the end of the sequence."""
        return self.request.num_computed_tokens + self.num_known_tokens == self.request.num_tokens

    @property
    def samples(self) -> bool:
        """True when this step yields a new token: it completes a sequence that generates."""
        return self.completes and self.request.pooling is None


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: tuple[ScheduledSeq, ...]  # decodes first, then prompt chunks
    preempted: tuple[Request, ...] = ()  # preempted during this schedule call (already back in the waiting queue)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def snapshot(self, stop: StopChecker) -> StepBatch:
        """The step as the worker receives it: plain values copied now, so nothing the engine changes later
        (update, a stop string, an abort) can reach into a step the worker is computing."""
        return StepBatch(tuple(_seq_step(s, stop) for s in self.seqs))


def _seq_step(seq: ScheduledSeq, stop: StopChecker) -> SeqStep:
    req = seq.request
    start = req.num_computed_tokens
    end = start + seq.num_known_tokens
    sample = sample_inputs(req, stop) if seq.samples else None
    draft = None
    if seq.draft_token_ids:
        drafts = seq.draft_token_ids
        # row j as the sequence would stand after guesses 0..j-1: with a grammar, its matcher walked over them
        states = req.grammar.states_along(drafts) if req.grammar is not None else (None,) * (len(drafts) + 1)
        rows = tuple(sample_inputs(req, stop, drafts[:j], states[j]) for j in range(len(drafts) + 1))
        sample = rows[0]
        draft = DraftInputs(drafts, rows)
    return SeqStep(
        request_id=req.request_id,
        token_ids=req.token_slice(start, end) + seq.draft_token_ids,
        start_position=start,
        block_tables=tuple([t.frozen() for t in req.block_tables]),
        completes=seq.completes,
        seq_total_len=req.num_tokens,
        sample=sample,
        pooling=req.pooling,
        prompt_logprobs=prompt_logprob_inputs(req, start, end),
        lora_slot=req.lora_slot,
        draft=draft,
    )


def prompt_logprob_inputs(request: Request, start: int, end: int) -> PromptLogprobInputs | None:
    """The rows of the chunk [start, end) that score prompt tokens not yet scored; None when there are none."""
    if not request.needs_prompt_logprobs:
        return None
    first = max(start, request.num_prompt_logprob_rows)
    last = min(end, request.num_prompt_tokens - 1)  # the last prompt row predicts the first output token
    if first >= last:
        return None
    targets = tuple(request.prompt_token_ids[first + 1 : last + 1])
    return PromptLogprobInputs(request.params.prompt_logprobs, first, targets)


def sample_inputs(request: Request, stop: StopChecker, drafted: tuple[int, ...] = (),
                  grammar: GrammarState | None = None) -> SampleInputs:
    """What the sampler needs of a request about to yield a token; token histories only where a penalty reads them.
    drafted: guesses taken as if already output (a verify step's later rows); grammar: the request's matcher state
    after them (SequenceGrammar.states_along), required with drafts when the request has a grammar."""
    p = request.params
    repetition = p.repetition_penalty != 1.0
    penalised = repetition or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    if request.grammar is not None and grammar is None:
        assert not drafted, "a guessed row's grammar state must come from the matcher walked over the guesses"
        grammar = request.grammar.state()
    return SampleInputs(
        draw_index=len(request.output_token_ids) + len(drafted),
        params=p,
        prompt_token_ids=tuple(request.prompt_token_ids) if repetition else (),
        output_token_ids=(*request.output_token_ids, *drafted) if penalised else (),
        masked_token_ids=stop.masked_token_ids(request, len(drafted), grammar),
        token_bitmask=grammar.bitmask if grammar is not None else None,
    )


@dataclass(frozen=True)
class StopChecker:
    """The one rule for whether a sequence stops on a token, and why.

    The scheduler asks after each sampled token, the sampler asks which ids to mask before min_tokens, and the
    output processor asks whether a final token's text is shown and which stop_reason it reports. It lives with
    the engine -> worker contract so the sampler can read it. Stop strings are found in text by the output
    processor's matcher, which finishes the request through the scheduler.
    """

    eos_token_ids: frozenset[int]

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """Ids that end this request: its stop_token_ids, and EOS unless ignore_eos."""
        ids = frozenset(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def masked_token_ids(self, request: Request, num_drafted: int = 0,
                         grammar: GrammarState | None = None) -> frozenset[int]:
        """Ids the sampler must not pick yet: every stopping id while fewer than min_tokens are out (vLLM's rule),
        counting num_drafted guesses as out. Once a grammar's match is complete, the grammar decides: a finished
        JSON value allows only EOS. grammar: the request's matcher state after the guesses (its state now when
        None)."""
        if len(request.output_token_ids) + num_drafted >= request.params.min_tokens:
            return frozenset()
        if request.grammar is None or not (grammar.can_end if grammar is not None else request.grammar.can_end):
            return self.stop_token_ids(request.params)
        return frozenset()

    def check(self, request: Request, max_model_len: int) -> FinishReason | None:
        """After request's last output token was appended. A stop token wins over a length limit hit by the same
        token; min_tokens gates stop tokens only, since a length limit is a hard bound (request.max_tokens may
        be clamped below min_tokens)."""
        num_output = len(request.output_token_ids)
        if request.grammar is not None and request.grammar.finished:
            return FinishReason.STOP  # the grammar took its stop token: nothing may follow, whatever min_tokens says
        if num_output >= request.params.min_tokens and request.output_token_ids[-1] in self.stop_token_ids(
            request.params
        ):
            return FinishReason.STOP
        if num_output >= request.max_tokens or request.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

    def hides_token_text(self, request: Request, position: int) -> bool:
        """Like vLLM, the token that stopped the request adds no text unless include_stop_str_in_output."""
        return (
            not request.params.include_stop_str_in_output
            and request.finish_reason is FinishReason.STOP
            and position == len(request.output_token_ids) - 1
            and (
                request.output_token_ids[position] in self.stop_token_ids(request.params)
                or (request.grammar is not None and request.grammar.finished)  # its EOS, even under ignore_eos
            )
        )

    def stop_token_reason(self, request: Request) -> int | None:
        """stop_reason for a request a stop token finished: the id when the user named it, None for EOS."""
        last = request.output_token_ids[-1] if request.output_token_ids else None
        if request.finish_reason is FinishReason.STOP and last in request.params.stop_token_ids:
            return last
        return None
