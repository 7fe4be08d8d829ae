"""/v1/completions: prompts -> engine requests; outputs -> a completion response or its SSE chunks."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

from pllm.runtime.engine.outputs import LogprobsOnePosition, RequestOutput
from pllm.runtime.server.protocol_completions import CompletionRequest
from pllm.runtime.server.protocol_responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamResponse,
)
from pllm.runtime.server.protocol_sampling import LOGPROB_FLOOR
from pllm.runtime.server.request_stream import EngineError, EngineRequest, RequestStream
from pllm.runtime.server.serving import OpenAIServing, Prepared, response_id
from pllm.runtime.server.sse import (
    SeqCursor,
    advance,
    choice_chunk,
    collect,
    guarded,
    scored_position,
    usage_chunk,
    usage_of,
    within_top,
)


class CompletionServing:
    """The completions endpoint family over the shared model context."""

    def __init__(self, base: OpenAIServing) -> None:
        self.base = base

    async def prepare(self, req: CompletionRequest, arrival: float, header_id: str | None = None) -> Prepared:
        self.base.check_generates()
        if req.max_tokens == 0 and not req.echo:
            raise EngineError(400, "max_tokens must be at least 1 unless echo is true", param="max_tokens")
        # echo with max_tokens 0 generates one token, as vLLM does, and sends back only the prompt
        params = self.base.params(req, 1 if _prompt_only(req) else req.max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens carry logprobs too
            # scored once for both fields: each reads its own number of best (sse.within_top)
            params = dataclasses.replace(params, prompt_logprobs=max(req.logprobs, params.prompt_logprobs or 0))
        await self.base.check_grammar(req, params)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        requests, texts = [], []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                self.base.check_chars(prompt)
                ids = await self.base.in_tokenizer_thread(self.base.encode, prompt, req.add_special_tokens)
                text = prompt
            else:
                ids = list(prompt)
                self.base.check_token_ids(ids, "prompt")
                text = ""
            ids = self.base.truncate(ids, req)
            if req.echo and (not isinstance(prompt, str) or req.truncate_prompt_tokens is not None):
                text = await self.base.in_tokenizer_thread(self.base.tokenizer.decode, ids)  # the prompt as it ran
            if not ids:
                raise EngineError(400, "The prompt is empty; provide a non-empty prompt.", param="prompt")
            self.base.check_fits(ids, "prompt", req.max_tokens, "max_tokens")
            requests.append(EngineRequest(f"{base_id}-{i}", ids, params, arrival))
            texts.append(text if req.echo else "")
        return Prepared(requests, texts, response_id("cmpl", header_id, req, base_id))

    async def response(self, req: CompletionRequest, prep: Prepared, stream: RequestStream) -> CompletionResponse:
        finals = await collect(stream)
        base = prep.choice_base()
        choices = []
        only = _prompt_only(req)
        k = req.returned_prompt_logprobs
        for i, r in enumerate(prep.requests):
            out = finals[r.request_id]
            prompt_logprobs = self.base.prompt_logprobs_body(out, k) if k is not None else None
            for o in out.outputs:
                prefix = prep.prompt_texts[i]
                logprobs = None
                if req.logprobs is not None:
                    scored = self._prompt_positions(out, req.logprobs) if req.echo else []
                    scored += [] if only else [(next(iter(e)), e) for e in o.logprobs]
                    logprobs = self._completion_logprobs(scored, 0, req.logprobs)
                choices.append(
                    CompletionChoice(
                        index=base[r.request_id] + o.index,
                        text=prefix if only else prefix + o.text,
                        logprobs=logprobs,
                        finish_reason="length" if only else o.finish_reason,
                        stop_reason=None if only else o.stop_reason,
                        prompt_logprobs=prompt_logprobs,
                    )
                )
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            id=prep.response_id,
            created=prep.created,
            model=prep.model_name(self.base.model_name),
            choices=choices,
            usage=usage_of(finals, generated=not only),
        )

    @staticmethod
    def _prompt_positions(out: RequestOutput, num_top: int) -> list[tuple[int, LogprobsOnePosition | None]]:
        """The echoed prompt's (token id, logprobs) pairs, num_top best each: the first token has none, as nothing
        precedes it."""
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
        return [(t, None if e is None else within_top(e, num_top))
                for t, e in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)]

    def _completion_logprobs(
        self, positions: list[tuple[int, LogprobsOnePosition | None]], offset: int, num_top: int
    ) -> CompletionLogprobs:
        """OpenAI's completion logprobs of these (token id, logprobs) positions, num_top best each; text_offset
        counts from offset."""
        lp = CompletionLogprobs()
        for token_id, e in positions:
            scored = None if e is None else scored_position(e, num_top)
            # an echoed first token has no Logprob to carry its text
            token = self.base.token_str(token_id) if scored is None else self.base.token_text(token_id, scored[1])
            lp.text_offset.append(offset)
            offset += len(token)
            lp.tokens.append(token)
            if scored is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            _, own, best = scored
            lp.token_logprobs.append(max(own.logprob, LOGPROB_FLOOR))
            top = {self.base.token_text(t, v): max(v.logprob, LOGPROB_FLOOR) for t, v in best}
            top.setdefault(token, max(own.logprob, LOGPROB_FLOOR))  # the sampled (or prompt) token is always listed
            lp.top_logprobs.append(top)
        return lp

    def stream(self, req: CompletionRequest, prep: Prepared, stream: RequestStream) -> AsyncIterator[str]:
        rid, model = prep.response_id, prep.model_name(self.base.model_name)
        opts = req.stream_options
        base = prep.choice_base()
        prompt_index = {r.request_id: i for i, r in enumerate(prep.requests)}
        cursors: dict[tuple[str, int], SeqCursor] = {}
        finals: dict[str, RequestOutput] = {}
        only = _prompt_only(req)

        def chunk(*choices: CompletionChoice) -> CompletionStreamResponse:
            return CompletionStreamResponse(id=rid, created=prep.created, model=model, choices=list(choices))

        async def chunks() -> AsyncIterator[str]:
            async for out in stream:
                finals[out.request_id] = out
                for o in out.outputs:
                    cur = cursors.setdefault((out.request_id, o.index), SeqCursor())
                    prefix, scored = "", []
                    if not cur.started:
                        prefix = prep.prompt_texts[prompt_index[out.request_id]]
                        cur.started = True
                        if req.echo and req.logprobs is not None:
                            scored = self._prompt_positions(out, req.logprobs)
                    text, new_lps, done = advance(cur, o)
                    if only:
                        text, new_lps = "", []
                    if not (prefix or scored or text or new_lps or done):
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = self._completion_logprobs(scored + [(next(iter(e)), e) for e in new_lps],
                                                             cur.text_offset, req.logprobs)
                        cur.text_offset += sum(len(t) for t in logprobs.tokens)
                    choice = CompletionChoice(
                        index=base[out.request_id] + o.index,
                        text=prefix + text,
                        logprobs=logprobs,
                        finish_reason=("length" if only else o.finish_reason) if done else None,
                        stop_reason=o.stop_reason if done and not only else None,
                    )
                    yield choice_chunk(chunk(choice), opts, finals, generated=not only)
            if opts and opts.include_usage:
                yield usage_chunk(chunk(), finals, generated=not only)

        return guarded(chunks(), stream)


def _prompt_only(req: CompletionRequest) -> bool:
    """echo with max_tokens 0: the response holds the prompt (and its logprobs) and nothing generated."""
    return req.echo and req.max_tokens == 0
