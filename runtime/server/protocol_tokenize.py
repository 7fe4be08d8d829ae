"""vLLM's /tokenize and /detokenize request bodies (a conversation to tokenize is chat's messages and options)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pllm.runtime.server.protocol_chat import MAX_MESSAGES, ChatMessage, TemplateKwargs
from pllm.runtime.server.protocol_sampling import Name, OpenAIModel, TokenIds
from pllm.runtime.server.protocol_tools import MAX_TOOLS, Tool


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a text (`prompt`) or a conversation (`messages`, rendered with the chat template)."""

    model: Name | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: bool = True  # messages only
    continue_final_message: bool = False  # messages only
    chat_template_kwargs: TemplateKwargs | None = None  # messages only
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None  # messages only, as chat renders them
    # BOS and the like; None: vLLM's defaults, true for a prompt and false for messages (the template adds them)
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: Name | None = None
    tokens: TokenIds
