"""The /v1/chat/completions request body: messages and their content parts, chat-template options, tools."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from pllm.runtime.engine.content_parts import TEXT_PART_KEYS, join_parts, part_text
from pllm.runtime.engine.sampling_params import MAX_LOGPROBS
from pllm.runtime.server.protocol_sampling import (
    MAX_TOKENS_LIMIT,
    Name,
    OpenAIModel,
    SamplingRequest,
    not_bool,
)
from pllm.runtime.server.protocol_tools import (
    MAX_CALL_ID_LEN,
    MAX_TOOL_CALLS_PER_MESSAGE,
    MAX_TOOLS,
    MessageToolCall,
    Tool,
    ToolChoice,
    check_tool_choice,
    check_tool_messages,
    check_tools,
)
from pllm.runtime.server.protocol_vllm import CHAT_UNHONOURED_VLLM_FIELDS, GUIDED_FIELDS, UNHONOURED_VLLM_FIELDS

MAX_MESSAGES = 1024


class ContentPart(OpenAIModel):
    """An OpenAI content part; only the text types LLM.chat takes too (content_parts.TEXT_PART_KEYS) are accepted."""

    type: Name
    text: str | None = None  # text, input_text, output_text
    refusal: str | None = None
    thinking: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_string(cls, data: Any) -> Any:
        # a bare string in the list is a text part (vLLM's server, and LLM.chat, take it)
        return {"type": "text", "text": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_part(self):
        self.as_text()  # refuses a media type by name, or a text type without its text
        return self

    def as_text(self) -> str:
        return part_text({"type": self.type, "text": self.text, "refusal": self.refusal, "thinking": self.thinking})


assert set(TEXT_PART_KEYS.values()) <= set(ContentPart.model_fields), "a text part key ContentPart does not declare"


class ChatMessage(OpenAIModel):
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str | list[ContentPart] | None = None
    name: Name | None = None
    # Tool calling: the calls an assistant made, and which call a role "tool" message answers.
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=MAX_TOOL_CALLS_PER_MESSAGE)] | None = None
    tool_call_id: Annotated[str, Field(max_length=MAX_CALL_ID_LEN)] | None = None

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        # joined as vLLM renders a message's text parts, and as LLM.chat joins them (content_parts.join_parts)
        return join_parts(part.as_text() for part in self.content)


# Keys of apply_chat_template's own parameters: a client must not reach them through chat_template_kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset(
    "conversation tools documents chat_template add_generation_prompt continue_final_message tokenize padding "
    "truncation max_length return_tensors return_dict return_assistant_tokens_mask tokenizer_kwargs max_chars".split()
)
# chat_template_kwargs as JSON, at most: they can stand in for the special-token variables a template prints once a
# message (eos_token, ...), so their size is multiplied by up to MAX_MESSAGES before the prompt's length is checked
MAX_TEMPLATE_KWARGS_BYTES = 64 * 1024


def _check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    reserved = RESERVED_TEMPLATE_KWARGS & set(kwargs or {})
    if reserved:
        raise ValueError(f"chat_template_kwargs: reserved key(s) {', '.join(sorted(reserved))}")
    size = len(json.dumps(kwargs, ensure_ascii=False).encode()) if kwargs else 0
    if size > MAX_TEMPLATE_KWARGS_BYTES:
        raise ValueError(f"chat_template_kwargs: {size} bytes as JSON, more than the limit of "
                         f"{MAX_TEMPLATE_KWARGS_BYTES} (MAX_TEMPLATE_KWARGS_BYTES)")
    return kwargs


TemplateKwargs = Annotated[dict[str, Any], Field(max_length=32), AfterValidator(_check_template_kwargs)]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None  # absent: "auto" with tools, "none" without (OpenAI's defaults)
    parallel_tool_calls: bool = True
    # vLLM's: special tokens added on top of the template's (it adds them itself, so off by default)
    add_special_tokens: bool = False
    # vLLM's: retrieval documents handed to the chat template (a template that reads none ignores them, as in vLLM)
    documents: Annotated[list[dict[str, str]], Field(max_length=MAX_MESSAGES)] | None = None
    unhonoured_fields: ClassVar[dict[str, object]] = {**UNHONOURED_VLLM_FIELDS, **CHAT_UNHONOURED_VLLM_FIELDS}
    read_extra_fields: ClassVar[frozenset[str]] = frozenset({*unhonoured_fields, *GUIDED_FIELDS})

    @field_validator("top_logprobs", "max_completion_tokens", mode="before")
    @classmethod
    def _chat_numbers_only(cls, value):
        return not_bool(value)

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    @field_validator("continue_final_message")
    @classmethod
    def _check_continue(cls, continue_final: bool, info: ValidationInfo) -> bool:
        if continue_final and info.data.get("add_generation_prompt", False):
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt to false)"
            )
        return continue_final

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools: list[Tool] | None) -> list[Tool] | None:
        check_tools(tools)
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        # tools that failed their own validation are missing from info.data (an omitted one is there as None):
        # their error is the request's, not a second one about tool_choice
        if "tools" in info.data:
            check_tool_choice(choice, info.data["tools"])
        return choice

    @field_validator("messages")
    @classmethod
    def _check_tool_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        check_tool_messages(messages)
        return messages

    def conversation(self) -> list[dict]:
        return [
            {
                "role": m.role,
                "content": m.text() or "",
                **({"name": m.name} if m.name else {}),
                **({"tool_calls": [c.for_template() for c in m.tool_calls]} if m.tool_calls else {}),
                **({"tool_call_id": m.tool_call_id} if m.tool_call_id is not None else {}),
            }
            for m in self.messages
        ]

    @property
    def effective_tool_choice(self) -> ToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"
