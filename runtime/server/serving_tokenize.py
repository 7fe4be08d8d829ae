"""/tokenize and /detokenize (vLLM's): a text or chat messages -> token ids and count; token ids -> text."""

from __future__ import annotations

from pydantic import ValidationError

from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.protocol_responses import DetokenizeResponse, TokenizeResponse
from pllm.runtime.server.protocol_tokenize import DetokenizeRequest, TokenizeRequest
from pllm.runtime.server.request_stream import EngineError
from pllm.runtime.server.serving import OpenAIServing
from pllm.runtime.server.serving_chat import ChatServing


class TokenizeServing:
    """The tokenizer endpoints over the shared model context; messages render as chat completions render them."""

    def __init__(self, base: OpenAIServing, chat: ChatServing) -> None:
        self.base = base
        self.chat = chat

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if (req.prompt is None) == (req.messages is None):
            param = "messages" if req.prompt is not None else "prompt"
            raise EngineError(400, "Give exactly one of prompt (a text) and messages (a conversation).", param=param)
        if req.prompt is not None:
            if req.prompt:  # an empty text tokenizes to its special tokens, if any
                self.base.check_chars(req.prompt)
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await self.base.in_tokenizer_thread(self.base.encode, req.prompt, add_special)
        else:
            ids = await self._tokenize_chat(req)
        token_strs = self.base.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.base.max_model_len, tokens=ids,
                                token_strs=token_strs)

    async def _tokenize_chat(self, req: TokenizeRequest) -> list[int]:
        try:
            chat_req = ChatCompletionRequest(
                messages=req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs,
                tools=req.tools,
                tool_choice="none",  # only rendered here: no tool-call format is needed
            )
        except ValidationError as exc:  # the chat request's own checks (reserved template keys, clashing flags)
            raise EngineError(400, "; ".join(e["msg"] for e in exc.errors())[:1000]) from None
        conversation = chat_req.conversation()
        self.base.check_chars("".join(m["content"] for m in conversation) or " ", param="messages")
        return await self.base.in_tokenizer_thread(
            self.chat._render_chat, chat_req, conversation, bool(req.add_special_tokens)
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        vocab = self.base.engine.engine.spec.vocab_size
        bad = next((t for t in req.tokens if t >= vocab), None)
        if bad is not None:
            raise EngineError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=await self.base.in_tokenizer_thread(self.base.tokenizer.decode, req.tokens))
