"""OpenAI serving: requests -> tokenized EngineRequests; engine outputs -> responses and SSE chunks."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pllm.runtime.engine.outputs import EmbeddingRequestOutput, RequestOutput
from pllm.runtime.engine.sampling_params import InvalidParam, SamplingParams
from pllm.runtime.server.async_engine import AsyncEngine
from pllm.runtime.server.protocol import (
    LOGPROB_FLOOR,
    ChatCompletionRequest,
    CompletionLogprobs,
    EmbeddingRequest,
    SamplingRequest,
)
from pllm.runtime.server.request_stream import EngineError, EngineRequest, RequestStream
from pllm.runtime.server.sse import SeqCursor, advance, collect, guarded, sse, usage_of
from pllm.runtime.worker.sampler import TokenLogprobs

logger = logging.getLogger("pllm.server")


@dataclass(frozen=True)
class Prepared:
    """A generation request ready for the engine: one EngineRequest per prompt, plus what responses need."""

    requests: list[EngineRequest]
    prompt_texts: list[str]  # for echo ("" when not echoing)
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_base(self) -> dict[str, int]:
        n = self.requests[0].params.n
        return {r.request_id: i * n for i, r in enumerate(self.requests)}


class OpenAIServing:
    """Turns protocol requests into engine work and engine outputs into OpenAI's JSON, for one served model."""

    def __init__(self, engine: AsyncEngine, served_model_names: list[str]):
        self.engine = engine
        self.model_names = served_model_names
        llm = engine.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.hidden_size = llm.spec.hidden_size
        # The longest token in characters bounds how many characters max_model_len tokens can hold, so the
        # check before tokenizing never rejects a prompt that would fit.
        self.max_prompt_chars = self.max_model_len * max(len(t) for t in self.tokenizer.get_vocab())
        # One thread tokenizes, so neither the event loop nor the engine loop stalls on a long prompt.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="pllm-tokenizer")
        self._token_strs: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise EngineError(404, f"The model `{model[:256]}` does not exist.", param="model")

    async def _in_tokenizer_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    def _check_chars(self, text: str) -> None:
        if not text:
            raise EngineError(400, "The prompt is empty; provide a non-empty prompt.")
        if len(text) > self.max_prompt_chars:
            raise EngineError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(text)} characters, more than {self.max_model_len} tokens can hold. "
                "Please reduce the length of the input prompt.",
            )

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return s

    # -- preparing requests ----------------------------------------------------------------------
    def _params(self, req: SamplingRequest, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as exc:  # SamplingParams.validate is where every limit is checked
            raise EngineError(400, str(exc), param=exc.param if isinstance(exc, InvalidParam) else None) from None

    async def prepare_completion(self, req, arrival: float) -> Prepared:
        params = self._params(req, req.max_tokens, req.logprobs)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        requests, texts = [], []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                self._check_chars(prompt)
                ids = await self._in_tokenizer_thread(self._encode, prompt)
                text = prompt
            else:
                ids = list(prompt)
                text = await self._in_tokenizer_thread(self._decode_prompt, ids) if req.echo else ""
            if not ids:
                raise EngineError(400, "The prompt is empty; provide a non-empty prompt.")
            requests.append(EngineRequest(f"{base_id}-{i}", ids, params, arrival))
            texts.append(text if req.echo else "")
        return Prepared(requests, texts)

    def _decode_prompt(self, ids: list[int]) -> str:
        vocab = self.engine.engine.spec.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        return self.tokenizer.decode(ids)

    async def prepare_chat(self, req: ChatCompletionRequest, arrival: float) -> Prepared:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, logprobs)
        conversation = req.conversation()
        self._check_chars("".join(m["content"] for m in conversation) or " ")
        ids = await self._in_tokenizer_thread(self._render_chat, req, conversation)
        if not ids:
            raise EngineError(400, "The rendered chat prompt is empty.")
        return Prepared([EngineRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, params, arrival)], [""])

    def _render_chat(self, req: ChatCompletionRequest, conversation: list[dict]) -> list[int]:
        import jinja2

        tok = self.tokenizer
        if not tok.chat_template:
            raise EngineError(400, "This model has no chat template; use /v1/completions.")
        try:
            # transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment.
            text = tok.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}),
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise EngineError(400, f"The chat template could not be applied: {str(exc)[:500]}") from None
        self._check_chars(text)
        return self._encode(text, add_special_tokens=False)

    # -- completions -----------------------------------------------------------------------------
    async def completion_response(self, req, prep: Prepared, stream: RequestStream) -> dict:
        finals = await collect(stream)
        base = prep.choice_base()
        choices = []
        for i, r in enumerate(prep.requests):
            out = finals[r.request_id]
            for o in out.outputs:
                prefix = prep.prompt_texts[i]
                logprobs = self._completion_logprobs(o.logprobs, len(prefix)) if o.logprobs is not None else None
                choices.append(
                    {
                        "index": base[r.request_id] + o.index,
                        "text": prefix + o.text,
                        "logprobs": logprobs.model_dump() if logprobs else None,
                        "finish_reason": o.finish_reason,
                        "stop_reason": o.stop_reason,
                    }
                )
        choices.sort(key=lambda c: c["index"])
        rid = prep.requests[0].request_id.rsplit("-", 1)[0]
        return {
            "id": rid,
            "object": "text_completion",
            "created": prep.created,
            "model": self.model_name,
            "choices": choices,
            "usage": usage_of(finals),
            "system_fingerprint": None,
        }

    def _completion_logprobs(self, entries: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for e in entries:
            token = self.token_str(e.token_id)
            lp.text_offset.append(offset)
            offset += len(token)
            lp.tokens.append(token)
            lp.token_logprobs.append(max(e.logprob, LOGPROB_FLOOR))
            top = {self.token_str(t): max(v, LOGPROB_FLOOR) for t, v in e.top}
            top.setdefault(token, max(e.logprob, LOGPROB_FLOOR))  # the sampled token is always listed
            lp.top_logprobs.append(top)
        return lp

    def completion_stream(self, req, prep: Prepared, stream: RequestStream) -> AsyncIterator[str]:
        rid = prep.requests[0].request_id.rsplit("-", 1)[0]
        head = {"id": rid, "object": "text_completion", "created": prep.created, "model": self.model_name}
        opts = req.stream_options
        base = prep.choice_base()
        prompt_index = {r.request_id: i for i, r in enumerate(prep.requests)}
        cursors: dict[tuple[str, int], SeqCursor] = {}
        finals: dict[str, RequestOutput] = {}

        async def chunks() -> AsyncIterator[str]:
            async for out in stream:
                finals[out.request_id] = out
                for o in out.outputs:
                    cur = cursors.setdefault((out.request_id, o.index), SeqCursor())
                    prefix = ""
                    if not cur.started:
                        prefix = prep.prompt_texts[prompt_index[out.request_id]]
                        cur.text_offset, cur.started = len(prefix), True
                    text, new_lps, done = advance(cur, o)
                    if not (prefix or text or new_lps or done):
                        continue
                    logprobs = None
                    if o.logprobs is not None:
                        logprobs = self._completion_logprobs(new_lps, cur.text_offset).model_dump()
                        cur.text_offset += sum(len(t) for t in logprobs["tokens"])
                    choice = {
                        "index": base[out.request_id] + o.index,
                        "text": prefix + text,
                        "logprobs": logprobs,
                        "finish_reason": o.finish_reason if done else None,
                        "stop_reason": o.stop_reason if done else None,
                    }
                    chunk = {**head, "choices": [choice]}
                    if opts and opts.include_usage and opts.continuous_usage_stats:
                        chunk["usage"] = usage_of(finals)
                    yield sse(chunk)
            if opts and opts.include_usage:
                yield sse({**head, "choices": [], "usage": usage_of(finals)})

        return guarded(chunks(), stream)

    # -- chat ------------------------------------------------------------------------------------
    async def chat_response(self, req: ChatCompletionRequest, prep: Prepared, stream: RequestStream) -> dict:
        finals = await collect(stream)
        out = finals[prep.requests[0].request_id]
        choices = [
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": {"content": self._chat_logprobs(o.logprobs)} if o.logprobs is not None else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            }
            for o in out.outputs
        ]
        return {
            "id": prep.requests[0].request_id,
            "object": "chat.completion",
            "created": prep.created,
            "model": self.model_name,
            "choices": choices,
            "usage": usage_of(finals),
            "system_fingerprint": None,
        }

    def _chat_logprobs(self, entries: list[TokenLogprobs]) -> list[dict]:
        def item(token_id: int, logprob: float) -> dict:
            token = self.token_str(token_id)
            return {"token": token, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(token.encode())}

        return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]} for e in entries]

    def chat_stream(self, req: ChatCompletionRequest, prep: Prepared, stream: RequestStream) -> AsyncIterator[str]:
        head = {
            "id": prep.requests[0].request_id,
            "object": "chat.completion.chunk",
            "created": prep.created,
            "model": self.model_name,
        }
        opts = req.stream_options
        cursors: dict[int, SeqCursor] = {}
        finals: dict[str, RequestOutput] = {}

        async def chunks() -> AsyncIterator[str]:
            for index in range(req.n):  # the role chunk comes first, as OpenAI sends it
                delta = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                yield sse({**head, "choices": [choice]})
            async for out in stream:
                finals[out.request_id] = out
                for o in out.outputs:
                    cur = cursors.setdefault(o.index, SeqCursor())
                    text, new_lps, done = advance(cur, o)
                    if not (text or new_lps or done):
                        continue
                    choice = {
                        "index": o.index,
                        "delta": {"content": text},
                        "logprobs": {"content": self._chat_logprobs(new_lps)} if o.logprobs is not None else None,
                        "finish_reason": o.finish_reason if done else None,
                    }
                    if done:
                        choice["stop_reason"] = o.stop_reason
                    chunk = {**head, "choices": [choice]}
                    if opts and opts.include_usage and opts.continuous_usage_stats:
                        chunk["usage"] = usage_of(finals)
                    yield sse(chunk)
            if opts and opts.include_usage:
                yield sse({**head, "choices": [], "usage": usage_of(finals)})

        return guarded(chunks(), stream)

    # -- embeddings ------------------------------------------------------------------------------
    async def embeddings(
        self, req: EmbeddingRequest, arrival: float, until_disconnect: Callable[..., Awaitable[object]]
    ) -> object:
        """One engine request per input, scheduled like completions (token budget, queue bound); the response
        is awaited through until_disconnect(stream, work), which aborts them all if the client leaves."""
        requests = await self._embedding_requests(req, arrival)
        stream = await self.engine.generate(requests)
        return await until_disconnect(stream, self._embedding_response(req, requests, stream))

    async def _embedding_requests(self, req: EmbeddingRequest, arrival: float) -> list[EngineRequest]:
        if req.dimensions is not None and req.dimensions != self.hidden_size:
            raise EngineError(400, f"dimensions={req.dimensions} is not supported; this model gives {self.hidden_size}")
        base_id = f"embd-{uuid.uuid4().hex}"
        requests = []
        for i, item in enumerate(req.inputs()):
            if isinstance(item, str):
                self._check_chars(item)
                item = await self._in_tokenizer_thread(self._encode, item)
            if not item:
                raise EngineError(400, "The input is empty; provide a non-empty input.")
            requests.append(EngineRequest(f"{base_id}-{i}", list(item), SamplingParams(), arrival, pooling="last"))
        return requests

    async def _embedding_response(self, req: EmbeddingRequest, requests: list[EngineRequest], stream) -> dict:
        index = {r.request_id: i for i, r in enumerate(requests)}
        results: list = [None] * len(requests)
        async for out in stream:
            if not isinstance(out, EmbeddingRequestOutput):  # aborted by a shutdown that outlasted its timeout
                raise EngineError(503, "The server is shutting down.", retry_after_s=5)
            results[index[out.request_id]] = out.outputs
        data = []
        for i, r in enumerate(results):
            if req.encoding_format == "base64":
                vec = base64.b64encode(np.asarray(r.embedding, dtype="<f4").tobytes()).decode()
            else:
                vec = r.embedding
            data.append({"index": i, "object": "embedding", "embedding": vec})
        num_tokens = sum(r.num_prompt_tokens for r in results)
        return {
            "id": requests[0].request_id.rsplit("-", 1)[0],
            "object": "list",
            "created": int(time.time()),
            "model": self.model_name,
            "data": data,
            "usage": {"prompt_tokens": num_tokens, "completion_tokens": 0, "total_tokens": num_tokens},
        }
