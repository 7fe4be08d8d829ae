"""Scheduler: continuous batching with chunked prefill, prefix-cache admission and preemption by recompute."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pllm.runtime.engine.config import SpeculativeConfig
from pllm.runtime.engine.kv_coordinator import KvCoordinator
from pllm.runtime.engine.ngram import propose_ngram
from pllm.runtime.engine.request import (
    FinishReason,
    Request,
    RequestStatus,
    ScheduledBatch,
    ScheduledSeq,
    StopChecker,
)


@dataclass
class SpecDecodeStats:
    """Speculative decoding's cumulative counters (vLLM's vllm:spec_decode_* series)."""

    num_drafts: int = 0  # verify steps of a sequence
    num_draft_tokens: int = 0  # tokens guessed
    num_accepted_tokens: int = 0  # guesses the model confirmed

    def add(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens


class Scheduler:
    """Decides each step's {request: num_new_tokens} under a token budget and a sequence cap.

    One step: `batch = schedule()`, the runner computes batch.seqs (each seq's tokens start at
    request.num_computed_tokens; the block tables are request.block_tables), then `update(batch, sampled)`.
    Running requests go first in admission order, so the oldest always progresses; the newest are preempted.
    """

    def __init__(
        self,
        kv: KvCoordinator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        recompute_past_len: int | None = None,
        chunk_prompts: bool = True,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        """recompute_past_len: a running sequence whose length first passes it is computed again from its first
        token (a model whose K/V at every position depends on the whole length: models.rotary.recompute_length).
        speculative: draft tokens by n-gram lookup for each decoding sequence, verified in its step."""
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # a block's K/V then depends on more than its tokens: a prefix hit could hand over another length's K/V
        assert recompute_past_len is None or not kv.enable_prefix_caching, "recompute_past_len needs no prefix cache"
        # starting over keeps the blocks, which a windowed group may already have returned
        assert recompute_past_len is None or all(m.group.window is None for m in kv.managers)
        self.recompute_past_len = recompute_past_len
        # a draft's K/V would be computed with the table of a length the sequence may never reach
        assert speculative is None or recompute_past_len is None, "speculative decoding needs length-free K/V"
        self.speculative = speculative
        self.stop = StopChecker(frozenset(eos_token_ids))
        # False for an encoder: each prompt is computed whole in one step, waiting for a step with room for it
        self.chunk_prompts = chunk_prompts
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests re-enter at the front
        self.running: list[Request] = []  # admission order: oldest first, preemption victims from the end
        self._requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.num_preemptions = 0
        self.spec_stats = SpecDecodeStats()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None (unknown or already finished)."""
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError when it could never run, so the loop never waits on it forever."""
        rid = request.request_id
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.holds_blocks or request.num_computed_tokens:
            raise ValueError(f"request {rid!r} must be new (status WAITING, no blocks, nothing computed)")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if request.pooling is not None:
            # An embedding request needs KV for its whole prompt and nothing more.
            if request.num_tokens > self.max_model_len:
                raise ValueError(
                    f"request {rid!r}: input of {request.num_tokens} tokens exceeds max_model_len {self.max_model_len}"
                )
            max_len = max_kv_len = request.num_tokens
            if not self.chunk_prompts and request.num_tokens > self.max_num_batched_tokens:
                raise ValueError(
                    f"request {rid!r}: input of {request.num_tokens} tokens exceeds max_num_batched_tokens "
                    f"{self.max_num_batched_tokens}; an encoder computes each input whole in one step, so raise "
                    "max_num_batched_tokens to at least max_model_len"
                )
        else:
            if request.num_tokens >= self.max_model_len:
                raise ValueError(
                    f"request {rid!r}: prompt of {request.num_tokens} tokens leaves no room for output "
                    f"within max_model_len {self.max_model_len}"
                )
            if request.max_tokens < 1:
                raise ValueError(f"request {rid!r}: max_tokens must be positive, got {request.max_tokens!r}")
            # The last sampled token is never fed back, so at most max_len - 1 tokens ever need KV.
            max_len = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
            max_kv_len = max_len - 1
        self.kv.check_fits(rid, max_len, max_kv_len, self.max_num_batched_tokens)
        self._requests[rid] = request
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[Request] = []

        # Running requests: decodes take one token, unfinished prefills their next chunk.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            self._recompute_if_length_passed(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, request.request_id
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                seqs.append(ScheduledSeq(request, num_new))
                budget -= num_new
                i += 1

        # Drafts only once every running sequence has its own tokens' blocks, and only where blocks and budget are
        # left: a guess never preempts anyone, nor takes a block or a token another running sequence needs.
        if self.speculative is not None:
            for j, seq in enumerate(seqs):
                if budget < 1:
                    break
                if seq.num_new_tokens != 1:
                    continue
                drafts = self._drafts(seq.request, budget + 1)
                if drafts and self.kv.allocate_slots(seq.request, 1 + len(drafts)):
                    seqs[j] = ScheduledSeq(seq.request, 1 + len(drafts), drafts)
                    budget -= len(drafts)

        # Waiting requests, FCFS; none when this step preempted (they would only take the freed blocks back).
        # A request whose grammar is still compiling keeps its place but does not hold up those behind it.
        pending = 0
        while len(self.waiting) > pending and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[pending]
            if not request.ready:
                pending += 1
                continue
            # Pooling reads every position's hidden state, which a prefix hit would skip: it computes all. So
            # does a request still owed prompt logprobs (as in vLLM): a hit would skip the rows that score them.
            reads_cache = request.pooling is None and not request.needs_prompt_logprobs
            hit = self.kv.get_computed_blocks(request) if reads_cache else None
            num_hit = hit.num_tokens if hit is not None else 0
            num_new = min(request.num_tokens - num_hit, budget)
            if not self.chunk_prompts and num_new < request.num_tokens:
                break  # whole or not at all: it waits for a step with room, and nobody overtakes it
            if not self.kv.allocate_slots(request, num_new, hit):
                break  # strict FCFS: nobody overtakes the head of the queue
            del self.waiting[pending]
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            self._recompute_if_length_passed(request)
            if request.num_preemptions == 0:  # usage reports the first admission's prompt hits
                request.num_cached_tokens = min(num_hit, request.num_prompt_tokens)
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            seqs.append(ScheduledSeq(request, num_new))
            budget -= num_new

        # Decodes first (one query token that samples), then prompt chunks, as ScheduledBatch promises.
        seqs.sort(key=lambda s: not (s.num_new_tokens == 1 and s.samples))
        assert sum(s.num_new_tokens for s in seqs) <= self.max_num_batched_tokens
        return ScheduledBatch(tuple(seqs), tuple(preempted))

    def _drafts(self, request: Request, budget: int) -> tuple[int, ...]:
        """The guesses a decoding request verifies in its next step: as many as the budget, max_tokens and
        max_model_len leave room for beside the token the step yields anyway (a verify step yields accepted + 1).
        With structured output, the guesses end before the first one the grammar refuses (or that would end it)."""
        spec = self.speculative
        if (
            spec is None
            or not request.output_token_ids  # prompts and recomputes run as usual
            or request.num_tokens - request.num_computed_tokens != 1
        ):
            return ()
        room = min(
            spec.num_speculative_tokens,
            budget - 1,
            request.max_tokens - len(request.output_token_ids) - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        drafts = propose_ngram(request.all_token_ids, spec, room) if room > 0 else ()
        if drafts and request.grammar is not None:
            drafts = drafts[: request.grammar.valid_prefix(drafts)]
        return drafts

    def update(self, batch: ScheduledBatch, sampled_token_ids: Mapping[str, int | Sequence[int]]) -> list[Request]:
        """Advance the batch's requests past the step the runner computed; return those that finished.

        sampled_token_ids: per sequence that samples, its token, or for one that verified drafts its accepted
        drafts and the token after them. The tokens go out one at a time until one stops the sequence; the
        rejected drafts' K/V is rolled back (their slots are written again later, blocks past the sequence's
        computed tokens go back to the pool)."""
        finished: list[Request] = []
        for seq in batch.seqs:
            request = seq.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished or aborted between schedule and update: its result is dropped
            samples = seq.samples  # reads num_computed_tokens, so before advancing it
            request.num_computed_tokens += seq.num_known_tokens
            assert request.num_computed_tokens <= request.num_tokens, request.request_id
            if request.needs_prompt_logprobs:  # the step scored the chunk's prompt rows (snapshot's rule)
                scored = min(request.num_computed_tokens, request.num_prompt_tokens - 1)
                request.num_prompt_logprob_rows = max(request.num_prompt_logprob_rows, scored)
            reason = None
            if samples:
                sampled = sampled_token_ids[request.request_id]
                tokens = (sampled,) if isinstance(sampled, int) else tuple(sampled)
                drafts = seq.draft_token_ids
                assert 1 <= len(tokens) <= len(drafts) + 1 and tokens[:-1] == drafts[: len(tokens) - 1], (
                    request.request_id, tokens, drafts)
                if drafts:
                    self.spec_stats.add(len(drafts), len(tokens) - 1)
                for token_id in tokens:
                    request.output_token_ids.append(token_id)
                    if request.grammar is not None:
                        request.grammar.accept(token_id)  # the matcher follows exactly the tokens output
                    reason = self.stop.check(request, self.max_model_len)
                    if reason is not None:
                        break  # what follows a stop is never output
                if drafts and reason is None:
                    request.num_computed_tokens += len(tokens) - 1  # the accepted drafts' K/V stands
                    self.kv.trim(request)
            elif request.pooling is not None and request.num_computed_tokens == request.num_tokens:
                reason = FinishReason.STOP  # pooled: its blocks go back at once
            self.kv.advance(request)  # prefix-cache registration; blocks out of a window go back
            if reason is not None:
                self._finish(request, reason)
                finished.append(request)
        return finished

    def finish_request(self, request_id: str, reason: FinishReason) -> None:
        """Finish a waiting or running request now (stop strings, abort); unknown ids are ignored."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, reason)

    def abort_request(self, request_id: str) -> None:
        self.finish_request(request_id, FinishReason.ABORT)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Take the request out of its queue, free its blocks at once, and forget it."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request)  # also drops a waiting request's memoised block hashes
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]

    def _recompute_if_length_passed(self, request: Request) -> None:
        """Start the sequence over, keeping its blocks, when its K/V was computed at a length the model's tables
        no longer use; then note the length its K/V is computed at."""
        if self.recompute_past_len is None:
            return
        past = request.num_tokens > self.recompute_past_len
        if request.num_computed_tokens and past != request.kv_past_recompute_len:
            request.num_computed_tokens = 0
        request.kv_past_recompute_len = past

    def _preempt(self, request: Request) -> None:
        """Recompute later: drop its KV, keep its output so recompute covers prompt + output."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
