"""OutputProcessor: sampled tokens -> text (incremental detokenising, stop strings) -> RequestOutput per request;
the worker's TokenLogprobs -> vLLM's dict[int, Logprob] per position, each token's text added."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pllm.runtime.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from pllm.runtime.engine.outputs import CompletionOutput, Logprob, LogprobsOnePosition, RequestOutput
from pllm.runtime.engine.request import FinishReason, Request, StopChecker
from pllm.runtime.worker.logprobs import TokenLogprobs


@dataclass
class _SeqState:
    """Engine-side state of one sequence: its text so far and how it is being built."""

    request: Request
    group_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    text: str = ""
    num_processed: int = 0  # output tokens already turned into text
    stop_reason: str | int | None = None
    logprobs: list[LogprobsOnePosition] | None = None
    cumulative_logprob: float = 0.0


@dataclass
class _Group:
    """One user request: n sequences sharing a prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_SeqState]
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[LogprobsOnePosition | None] | None = None  # [None, scored positions so far...] when asked


class OutputProcessor:
    """Owns every generating request's text; turns each step's new tokens into the outputs that changed.

    finish(request_id) ends a sequence a stop string matched (the scheduler's finish_request).
    """

    def __init__(
        self,
        tokenizer,
        stop: StopChecker,
        finish: Callable[[str], None],
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._finish = finish
        self.groups: dict[str, _Group] = {}
        self.seq_states: dict[str, _SeqState] = {}
        self._token_texts: dict[int, str] = {}  # token id -> decode([id]); at most the vocabulary

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.groups

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, request_id: str, prompt: str | None, requests: list[Request], arrival_time: float) -> None:
        """Track one user request's sequences (already queued in the scheduler)."""
        ids = requests[0].prompt_token_ids
        group = _Group(request_id, prompt, ids, [], {"arrival_time": arrival_time})
        if requests[0].params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        for index, request in enumerate(requests):
            params = request.params
            state = _SeqState(
                request,
                request_id,
                index,
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                StopStringMatcher(params.stop_strings, params.include_stop_str_in_output),
                logprobs=[] if params.logprobs is not None else None,
            )
            group.seqs.append(state)
            self.seq_states[request.request_id] = state
        self.groups[request_id] = group

    def abort(self, request_id: str) -> list[str]:
        """Forget a user request; returns its sequences' ids (none when unknown)."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return []
        seq_ids = [s.request.request_id for s in group.seqs]
        for rid in seq_ids:
            self.seq_states.pop(rid, None)
        return seq_ids

    def group_id(self, request: Request) -> str:
        return self.seq_states[request.request_id].group_id

    def request(self, request_id: str) -> Request | None:
        state = self.seq_states.get(request_id)
        return state.request if state else None

    def process(
        self,
        sampled: list[Request],
        logprobs: list,
        now: float | None = None,
        prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None,
    ) -> list[RequestOutput]:
        """After scheduler.update: keep the step's prompt logprobs, detokenise each sampled sequence's new tokens;
        one output per changed request."""
        now = time.monotonic() if now is None else now
        for request_id, entries in (prompt_logprobs or {}).items():
            state = self.seq_states.get(request_id)
            if state is not None:  # not aborted meanwhile; only the first of n sequences scores the prompt
                self.groups[state.group_id].prompt_logprobs.extend(self._position(e) for e in entries)
        changed: dict[str, _Group] = {}
        for request, token_logprobs in zip(sampled, logprobs):
            state = self.seq_states.get(request.request_id)
            if state is None:
                continue
            self._process_tokens(state, token_logprobs)
            group = self.groups[state.group_id]
            group.metrics.setdefault("first_token_time", now)
            scoring = group.prompt_logprobs is not None and len(group.prompt_logprobs) < len(group.prompt_token_ids)
            if scoring and not all(s.request.is_finished for s in group.seqs):
                # another of its n sequences sampled before the first finished scoring the prompt: outputs are
                # cumulative, so this one waits and every output carries the whole prompt's logprobs (a request
                # that ended before its prompt was scored, e.g. aborted, still gets its final output)
                continue
            changed[group.request_id] = group
        return [self._output(g, now) for g in changed.values()]

    def _process_tokens(self, state: _SeqState, logprobs: tuple[TokenLogprobs, ...] | None) -> None:
        """logprobs: one per token the step output (several when drafts were accepted), or None."""
        req = state.request
        new_ids = req.output_token_ids[state.num_processed :]
        state.num_processed = len(req.output_token_ids)
        if state.logprobs is not None and logprobs is not None:
            for entry in logprobs[: len(new_ids)]:  # a stop token ended the step's run early: the rest never came
                state.logprobs.append(self._position(entry))
                state.cumulative_logprob += entry.logprob
        for pos, token_id in enumerate(new_ids, start=len(req.output_token_ids) - len(new_ids)):
            if state.stop_reason is not None:
                break
            if self.stop.hides_token_text(req, pos):
                continue
            # a stop string ends the sequence only in the text of a token past min_tokens (vLLM's rule)
            emit, hit = state.matcher.feed(state.detokenizer.add(token_id), pos >= req.params.min_tokens)
            state.text += emit
            if hit:
                state.stop_reason = state.matcher.stop_string
                if not req.is_finished:
                    self._finish(req.request_id)
                req.finish_reason = FinishReason.STOP  # also where max_tokens ended it on this token (vLLM's)
                self._cut_after(state, pos)
        if req.is_finished and state.stop_reason is None:
            emit, hit = state.matcher.feed(state.detokenizer.flush(),
                                           len(req.output_token_ids) > req.params.min_tokens)
            state.text += emit
            if hit:
                state.stop_reason = state.matcher.stop_string
                req.finish_reason = FinishReason.STOP
            else:
                state.text += state.matcher.flush()
                state.stop_reason = self.stop.stop_token_reason(req)

    def _position(self, entry: TokenLogprobs) -> LogprobsOnePosition:
        """One position as vLLM v1 hands it out: the sampled (or prompt) token first with its vocabulary rank, then
        the top-k with ranks 1..k; a sampled token among them keeps its first place and takes its top-k entry
        (vLLM builds the dict the same way). Converted once, as the token arrives: outputs are cumulative."""
        position = {entry.token_id: Logprob(entry.logprob, entry.rank, self._token_text(entry.token_id))}
        for rank, (token_id, logprob) in enumerate(entry.top, start=1):
            position[token_id] = Logprob(logprob, rank, self._token_text(token_id))
        return position

    def _token_text(self, token_id: int) -> str:
        """decoded_token: the one token decoded alone (vLLM's convert_ids_list_to_tokens), cached by id."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    @staticmethod
    def _cut_after(state: _SeqState, pos: int) -> None:
        """A stop string ended the sequence at output token pos: tokens after it (accepted drafts of the same
        step) are dropped, as decoding one token a step would never have made them."""
        req = state.request
        if len(req.output_token_ids) > pos + 1:
            del req.output_token_ids[pos + 1 :]
            state.num_processed = pos + 1
            if state.logprobs is not None:
                del state.logprobs[pos + 1 :]
                state.cumulative_logprob = sum(  # in order, as it was summed
                    p[t].logprob for p, t in zip(state.logprobs, req.output_token_ids, strict=True))

    def _output(self, group: _Group, now: float) -> RequestOutput:
        finished = all(s.request.is_finished for s in group.seqs)
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.request.output_token_ids),
                finish_reason=s.request.finish_reason.value if s.request.finish_reason else None,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for s in group.seqs
        ]
        if "first_scheduled_time" not in group.metrics:  # the first of its sequences to run, once one has
            scheduled = [s.request.first_scheduled_time for s in group.seqs if s.request.first_scheduled_time]
            if scheduled:
                group.metrics["first_scheduled_time"] = min(scheduled)
        if finished:
            group.metrics["finished_time"] = now
            del self.groups[group.request_id]
            for s in group.seqs:
                self.seq_states.pop(s.request.request_id, None)
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outputs,
            finished,
            group.seqs[0].request.num_cached_tokens,
            dict(group.metrics),
            list(group.prompt_logprobs) if group.prompt_logprobs is not None else None,
        )


