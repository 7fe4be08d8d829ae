"""Tool-calling request shapes: tools, tool_choice, and the tool calls and tool results of earlier turns."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOOLS = 128  # OpenAI's own limit on tools in one request
MAX_TOOLS_JSON_CHARS = 256 * 1024  # all tool definitions together, as rendered into the prompt and into grammars
MAX_TOOL_CALLS_PER_MESSAGE = MAX_TOOLS
MAX_ARGUMENTS_CHARS = 64 * 1024  # one earlier call's arguments
MAX_CALL_ID_LEN = 256
# OpenAI's rule for function names (dots allowed too, as vLLM's tool parsers accept them).
FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"

FunctionName = Annotated[str, Field(pattern=FUNCTION_NAME)]


class OpenAIModel(BaseModel):
    # As protocol_sampling.OpenAIModel (protocol_chat imports this module): unknown fields pass, NaN and inf do not.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class FunctionDefinition(OpenAIModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(OpenAIModel):
    name: FunctionName


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(OpenAIModel):
    name: FunctionName
    arguments: Annotated[str, Field(max_length=MAX_ARGUMENTS_CHARS)]


class MessageToolCall(OpenAIModel):
    """A call an assistant message of an earlier turn made, sent back with the conversation."""

    id: Annotated[str, Field(max_length=MAX_CALL_ID_LEN)]
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict:
        # Chat templates write the arguments with `| tojson`, so they get the object, not its JSON text.
        try:
            arguments = json.loads(self.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(f"messages: the arguments of tool call {self.id[:64]!r} are not a JSON object")
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


def check_tool_messages(messages: list) -> None:
    """Earlier turns of tool calling (protocol_chat.ChatMessage): calls only on assistant messages, their arguments a
    JSON object, and every tool result naming the call it answers."""
    for i, m in enumerate(messages):
        if m.tool_calls and m.role != "assistant":
            raise ValueError(f"messages: message {i} has tool_calls but is not an assistant message")
        if m.role == "tool" and not m.tool_call_id:
            raise ValueError(f"messages: message {i} has role 'tool' but no tool_call_id")
        for call in m.tool_calls or []:
            call.for_template()  # arguments that are not a JSON object are a 400 now


def check_tools(tools: list[Tool] | None) -> None:
    if not tools:
        return
    size = len(json.dumps([t.model_dump(exclude_none=True) for t in tools]))
    if size > MAX_TOOLS_JSON_CHARS:
        raise ValueError(f"tools: the definitions take {size} characters of JSON, more than {MAX_TOOLS_JSON_CHARS}")
    for t in tools:
        kind = (t.function.parameters or {}).get("type", "object")
        if kind != "object":
            raise ValueError(
                f"tools: the parameters of {t.function.name!r} must be the schema of an object, not {kind!r}"
            )
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("tools: two tools have the same name")


def check_tool_choice(choice: ToolChoice | None, tools: list[Tool] | None) -> None:
    if choice is None or choice == "none":
        return
    if not tools:
        raise ValueError("tool_choice: only allowed when tools are given")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"tool_choice: function {choice.function.name!r} is not one of the tools")
