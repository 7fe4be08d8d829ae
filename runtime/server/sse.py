"""SSE framing and the pieces every OpenAI response shares: usage, error bodies, per-sequence stream cursors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pllm.runtime.engine.outputs import CompletionOutput, Logprob, LogprobsOnePosition, RequestOutput
from pllm.runtime.server.protocol_responses import (
    ChatCompletionChunk,
    CompletionStreamResponse,
    ErrorInfo,
    ErrorResponse,
    PromptTokensDetails,
    UsageInfo,
)
from pllm.runtime.server.protocol_sampling import StreamOptions
from pllm.runtime.server.request_stream import ClientDisconnected, EngineError, RequestStream

logger = logging.getLogger("pllm.server")


@dataclass
class SeqCursor:
    """How much of one sequence's cumulative output a stream has already sent."""

    num_chars: int = 0
    num_logprobs: int = 0
    text_offset: int = 0
    finished: bool = False
    started: bool = False  # the first chunk (which carries an echoed prompt) went out


# JSON may carry U+0085, U+2028 and U+2029 raw, and a model can emit them; SSE ends lines only at CR and LF, but
# Python's str.splitlines (so httpx's iter_lines) and some JavaScript parsers also break at them, cutting an event
# in two. Escaped (the same JSON value), every event stays one line for whatever line splitter the client uses.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: BaseModel | str) -> str:
    text = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {text if text.isascii() else text.translate(_LINE_BREAKS)}\n\n"


def usage_of(finals: dict[str, RequestOutput], generated: bool = True) -> UsageInfo:
    """The requests' usage; generated=False when the response sends none of the tokens generated (echo with
    max_tokens 0 runs one token it never returns, so it counts none, as OpenAI does)."""
    prompt = sum(len(o.prompt_token_ids) for o in finals.values())
    completion = sum(len(c.token_ids) for o in finals.values() for c in o.outputs) if generated else 0
    cached = sum(o.num_cached_tokens for o in finals.values())
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


Chunk = ChatCompletionChunk | CompletionStreamResponse


def choice_chunk(
    chunk: Chunk, opts: StreamOptions | None, finals: dict[str, RequestOutput], generated: bool = True
) -> str:
    """A chunk carrying choices; with stream_options.continuous_usage_stats it carries the usage so far."""
    if opts and opts.include_usage and opts.continuous_usage_stats:
        chunk.usage = usage_of(finals, generated)
    return sse(chunk)


def opening_chunk(chunk: Chunk, opts: StreamOptions | None, prompt_tokens: int) -> str:
    """A chunk sent before any output (chat's role chunk); with stream_options.continuous_usage_stats it carries the
    prompt's tokens and none completed, as vLLM's does."""
    if opts and opts.include_usage and opts.continuous_usage_stats:
        chunk.usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens)
    return sse(chunk)


def usage_chunk(chunk: Chunk, finals: dict[str, RequestOutput], generated: bool = True) -> str:
    """The last chunk when stream_options.include_usage: no choices, the whole request's usage."""
    chunk.choices, chunk.usage = [], usage_of(finals, generated)
    return sse(chunk)


def advance(cur: SeqCursor, o: CompletionOutput) -> tuple[str, list[LogprobsOnePosition], bool]:
    """The new text, new logprobs and whether the sequence just finished, moving the cursor past them."""
    text = o.text[cur.num_chars :]
    new_lps = o.logprobs[cur.num_logprobs :] if o.logprobs is not None else []
    done = o.finish_reason is not None and not cur.finished
    cur.num_chars, cur.num_logprobs, cur.finished = len(o.text), cur.num_logprobs + len(new_lps), cur.finished or done
    return text, new_lps, done


def scored_position(position: LogprobsOnePosition, num_top: int) -> tuple[int, Logprob, list[tuple[int, Logprob]]]:
    """One position of CompletionOutput.logprobs (or RequestOutput.prompt_logprobs) as OpenAI lists it: its own
    token (the dict's first key), that token's Logprob, and the num_top best (token id, Logprob), best first.
    The dict holds num_top + 1 entries when its token is not among the best (they follow it in rank order), else
    num_top: then it sits first, out of order, and the ranks 1..num_top put it back."""
    items = list(position.items())
    token_id, own = items[0]
    top = items[1:] if len(items) > num_top else sorted(items, key=lambda item: item[1].rank)
    return token_id, own, top


def within_top(position: LogprobsOnePosition, num_top: int) -> LogprobsOnePosition:
    """A position cut to num_top best: its own token first, whatever its rank, then the entries ranked 1..num_top,
    as the engine makes it when asked for num_top (one asked for more holds these, in the same order). The engine
    scores the prompt once, for the larger of echo's logprobs and prompt_logprobs; each field reads its own."""
    (token_id, own), *rest = position.items()
    return {token_id: own, **{t: lp for t, lp in rest if lp.rank is not None and lp.rank <= num_top}}


async def collect(stream: RequestStream) -> dict[str, RequestOutput]:
    finals: dict[str, RequestOutput] = {}
    async for out in stream:
        if out.finished:
            finals[out.request_id] = out
    return finals


async def guarded(chunks: AsyncIterator[str], stream: RequestStream) -> AsyncIterator[str]:
    """SSE framing: errors become a `data: {"error": ...}` event, and every stream ends with `data: [DONE]`."""
    try:
        try:
            async for chunk in chunks:
                yield chunk
        except ClientDisconnected:
            return
        except EngineError as exc:
            yield sse(ErrorResponse(error=error_info(exc.status, exc.message)))
        except Exception:
            logger.exception("streaming response failed")
            yield sse(ErrorResponse(error=error_info(500, "Internal server error.")))
        yield sse("[DONE]")
    finally:
        stream.close()


ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLarge",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_info(status: int, message: str, param: str | None = None) -> ErrorInfo:
    return ErrorInfo(message=message, type=ERROR_TYPES.get(status, "Error"), param=param, code=status)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """The JSON of an error response: {"error": {message, type, param, code}}."""
    return ErrorResponse(error=error_info(status, message, param)).model_dump(mode="json")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    retry_after_s: int | None = None,
    headers: dict[str, str] | None = None,
):
    headers = {**(headers or {}), **({"Retry-After": str(retry_after_s)} if retry_after_s is not None else {})}
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers or None)
