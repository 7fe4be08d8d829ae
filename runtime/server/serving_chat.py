"""/v1/chat/completions: messages -> the model's chat template -> an engine request; outputs -> response or SSE."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from pllm.runtime.engine.outputs import Logprob, LogprobsOnePosition, RequestOutput
from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobToken,
    ChatStreamChoice,
    DeltaMessage,
)
from pllm.runtime.server.protocol_sampling import LOGPROB_FLOOR
from pllm.runtime.server.request_stream import EngineError, EngineRequest, RequestStream
from pllm.runtime.server.serving import OpenAIServing, Prepared, response_id
from pllm.runtime.server.serving_tools import ToolCalling, finish_reason
from pllm.runtime.server.sse import (
    SeqCursor,
    advance,
    choice_chunk,
    collect,
    guarded,
    opening_chunk,
    scored_position,
    usage_chunk,
    usage_of,
)
from pllm.runtime.server.tool_parsers import ToolCallStream


class ChatServing:
    """The chat completions endpoint family over the shared model context."""

    def __init__(self, base: OpenAIServing, tools: ToolCalling) -> None:
        self.base = base
        self.tools = tools

    async def prepare(self, req: ChatCompletionRequest, arrival: float, header_id: str | None = None) -> Prepared:
        self.base.check_generates()
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.base.params(req, max_tokens, logprobs)
        # a tool_choice this server cannot read is a 400 here, before any work; named and required are forced
        params = await self.tools.adjust_params(req, params, self.base.engine.engine.grammars)
        await self.base.check_grammar(req, params)
        conversation = req.conversation()
        self.base.check_chars("".join(m["content"] for m in conversation) or " ", param="messages")
        ids = await self.base.in_tokenizer_thread(self._render_chat, req, conversation, req.add_special_tokens)
        ids = self.base.truncate(ids, req)
        if not ids:
            raise EngineError(400, "The rendered chat prompt is empty.", param="messages")
        self.base.check_fits(ids, "messages", max_tokens,
                             "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        requests = [EngineRequest(f"chatcmpl-{uuid.uuid4().hex}", ids, params, arrival)]
        return Prepared(requests, [""], response_id("chatcmpl", header_id, req, requests[0].request_id))

    def _render_chat(
        self, req: ChatCompletionRequest, conversation: list[dict], add_special_tokens: bool = False
    ) -> list[int]:
        import jinja2

        tok = self.base.tokenizer
        if not tok.chat_template:
            raise EngineError(400, "This model has no chat template; use /v1/completions.")
        try:
            # transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment.
            text = tok.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                tools=self.tools.template_tools(req),
                documents=req.documents,
                **(req.chat_template_kwargs or {}),
                max_chars=self.base.max_prompt_chars,  # the render stops there (a template may loop over its input)
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise EngineError(400, f"The chat template could not be applied: {str(exc)[:500]}") from None
        self.base.check_chars(text, param="messages")
        return self.base.encode(text, add_special_tokens=add_special_tokens)

    async def response(
        self, req: ChatCompletionRequest, prep: Prepared, stream: RequestStream
    ) -> ChatCompletionResponse:
        finals = await collect(stream)
        out = finals[prep.requests[0].request_id]
        fmt = self.tools.format_for(req)
        k = req.returned_prompt_logprobs
        choices = []
        for o in out.outputs:
            message, finish = AssistantMessage(content=o.text), o.finish_reason
            if fmt is not None:
                message, finish = self.tools.message(fmt, o, self.tools.max_calls(req))
            choices.append(
                ChatChoice(
                    index=o.index,
                    message=message,
                    logprobs=self._chat_logprobs(o.logprobs, req.top_logprobs or 0),
                    finish_reason=finish,
                    stop_reason=o.stop_reason,
                )
            )
        return ChatCompletionResponse(
            id=prep.response_id,
            created=prep.created,
            model=prep.model_name(self.base.model_name),
            choices=choices,
            usage=usage_of(finals),
            prompt_logprobs=None if k is None else self.base.prompt_logprobs_body(out, k),
        )

    def _chat_logprobs(self, entries: list[LogprobsOnePosition] | None, num_top: int) -> ChatChoiceLogprobs | None:
        if entries is None:
            return None

        def item(token_id: int, lp: Logprob) -> dict:
            token = self.base.token_text(token_id, lp)
            return {"token": token, "logprob": max(lp.logprob, LOGPROB_FLOOR), "bytes": list(token.encode())}

        tokens = []
        for position in entries:
            token_id, own, top = scored_position(position, num_top)
            tokens.append(ChatLogprobToken(**item(token_id, own), top_logprobs=[ChatLogprob(**item(t, v))
                                                                                    for t, v in top]))
        return ChatChoiceLogprobs(content=tokens)

    def stream(self, req: ChatCompletionRequest, prep: Prepared, stream: RequestStream) -> AsyncIterator[str]:
        rid, model = prep.response_id, prep.model_name(self.base.model_name)
        opts = req.stream_options
        cursors: dict[int, SeqCursor] = {}
        finals: dict[str, RequestOutput] = {}
        fmt = self.tools.format_for(req)
        tool_streams: dict[int, ToolCallStream] = {}

        def chunk(*choices: ChatStreamChoice) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=prep.created, model=model, choices=list(choices))

        async def chunks() -> AsyncIterator[str]:
            prompt_tokens = sum(len(r.prompt_token_ids) for r in prep.requests)
            for index in range(req.n):  # the role chunk comes first, as OpenAI sends it
                role = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                yield opening_chunk(chunk(role), opts, prompt_tokens)
            async for out in stream:
                finals[out.request_id] = out
                for o in out.outputs:
                    cur = cursors.setdefault(o.index, SeqCursor())
                    text, new_lps, done = advance(cur, o)
                    if not (text or new_lps or done):
                        continue
                    deltas, finish = [DeltaMessage(content=text)], o.finish_reason
                    if fmt is not None:  # content only once it cannot be markup; calls as OpenAI streams them
                        calls = tool_streams.setdefault(o.index, ToolCallStream(fmt, self.tools.max_calls(req)))
                        deltas = self.tools.deltas(calls.update(o.text, final=done))
                        deltas += [DeltaMessage()] if done or (new_lps and not deltas) else []
                        finish = finish_reason(o.finish_reason, bool(calls.calls))
                    for k, delta in enumerate(deltas):
                        last = k == len(deltas) - 1
                        lps = (new_lps if o.logprobs is not None else None) if last else None
                        choice = ChatStreamChoice(
                            index=o.index,
                            delta=delta,
                            logprobs=self._chat_logprobs(lps, req.top_logprobs or 0),
                            finish_reason=finish if done and last else None,
                            stop_reason=o.stop_reason if done and last else None,
                        )
                        yield choice_chunk(chunk(choice), opts, finals)
            if opts and opts.include_usage:
                yield usage_chunk(chunk(), finals)

        return guarded(chunks(), stream)
