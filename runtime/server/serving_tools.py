"""Tool calling in chat: which format reads a request's output, what the template gets, the calls sent back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from pllm.runtime.engine.outputs import CompletionOutput
from pllm.runtime.engine.param_checks import InvalidParam
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.schema_rewrite import embed_schema
from pllm.runtime.engine.structured_output import GrammarCache
from pllm.runtime.engine.structured_outputs_params import MAX_STRUCTURED_CHARS, StructuredOutputsParams
from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.protocol_responses import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
)
from pllm.runtime.server.protocol_tools import MAX_TOOLS_JSON_CHARS, NamedToolChoice
from pllm.runtime.server.request_stream import EngineError
from pllm.runtime.server.tool_parsers import (
    NO_PARSER,
    TOOL_CALL_PARSERS,
    NamedCallFormat,
    RequiredCallsFormat,
    StreamDelta,
    ToolCallFormat,
    parse_tool_calls,
    parser_from_template,
)

logger = logging.getLogger("pllm.server")
# a tool without parameters: the only arguments are {} (strict mode would still take any keys of {"type": "object"})
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class ForcedCallSchema(StructuredOutputsParams):
    """The structured output of a forced tool_choice. Under "required" its schema holds every tool's, which
    `tools` already bounds (MAX_TOOLS_JSON_CHARS), each one bounded as a client's schema is (forced_schema), so
    the whole gets the bound of `tools` rather than a client schema's: twice it, as rebasing a reference
    ("#" to "#/$defs/t127") at most doubles it and each tool's wrapper adds a little."""

    max_chars = 2 * MAX_TOOLS_JSON_CHARS


class ToolCalling:
    """The server's tool-calling settings: the format "auto" reads, chosen by --tool-call-parser or, when that is
    not given, by the build's chat template if exactly one format fits it."""

    def __init__(self, parser: str | None, chat_template: str | None):
        if parser == NO_PARSER:
            self.parser_name, why = None, "--tool-call-parser none"
        elif parser is not None:
            self.parser_name, why = parser, "--tool-call-parser"
        else:
            self.parser_name, why = parser_from_template(chat_template)
        self.auto_format = TOOL_CALL_PARSERS[self.parser_name] if self.parser_name else None
        if self.parser_name:
            logger.info("tool calling: tool_choice 'auto' reads the %s format (%s)", self.parser_name, why)
        else:
            logger.info("tool calling: no format for tool_choice 'auto' (%s); named and required work", why)

    def format_for(self, req: ChatCompletionRequest) -> ToolCallFormat | None:
        """How to read this request's output; None when it is plain content (no tools, or tool_choice "none")."""
        choice = req.effective_tool_choice
        if not req.tools or choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            return NamedCallFormat(choice.function.name)
        if choice == "required":
            return RequiredCallsFormat()
        if self.auto_format is None:
            raise EngineError(
                400,
                "tool_choice 'auto' needs to know how this model writes tool calls: start pllm-serve with "
                f"--tool-call-parser ({', '.join(TOOL_CALL_PARSERS)}), or use tool_choice 'required', 'none' or a "
                "named function.",
                param="tool_choice",
            )
        return self.auto_format

    async def adjust_params(
        self, req: ChatCompletionRequest, params: SamplingParams, grammars: GrammarCache
    ) -> SamplingParams:
        """params for this request's tool_choice. Named and required: the output forced to forced_schema, its
        grammar compiled now, so a tool schema the compiler refuses is a 400 naming tools before the request is
        queued. Auto: special tokens kept in the text when the format's markup may be one (vLLM does the same)."""
        fmt = self.format_for(req)
        if fmt is self.auto_format is not None and self.auto_format.markup_may_be_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)
        schema = self.forced_schema(req)
        if schema is None:
            return params
        if params.structured_outputs is not None:
            raise EngineError(
                400,
                "tool_choice 'required' or a named function cannot be combined with structured output (the "
                "call is already forced to the tool's schema).",
                param="tool_choice",
            )
        try:
            spec = ForcedCallSchema(json=schema)
            await asyncio.wrap_future(grammars.compile(spec))
        except InvalidParam as exc:
            message = str(exc).replace("structured_outputs.json", "the tool parameters schema")
            raise EngineError(400, f"tools: {message}", param="tools") from None
        return dataclasses.replace(params, structured_outputs=spec)

    @staticmethod
    def template_tools(req: ChatCompletionRequest) -> list[dict] | None:
        """The tools as chat templates take them (transformers' `tools=`: OpenAI's tool objects)."""
        return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None

    @staticmethod
    def max_calls(req: ChatCompletionRequest) -> int | None:
        return None if req.parallel_tool_calls else 1

    @staticmethod
    def forced_schema(req: ChatCompletionRequest) -> dict | None:
        """The JSON schema that makes a named or required tool_choice's output always parse, in the shape
        NamedCallFormat or RequiredCallsFormat reads; None for the other choices. A tool without parameters
        takes none (vLLM and OpenAI read a missing schema so): an empty object, not any object."""
        choice = req.effective_tool_choice
        if not req.tools or not (isinstance(choice, NamedToolChoice) or choice == "required"):
            return None
        params = {t.function.name: t.function.parameters or NO_PARAMETERS for t in req.tools}
        for name, schema in params.items():  # what compiling takes grows with one schema's size, not the tools'
            size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
            if size > MAX_STRUCTURED_CHARS:
                raise EngineError(400, f"tools: the parameters schema of {name!r} takes {size} characters of JSON, "
                                  f"more than {MAX_STRUCTURED_CHARS} (as any one schema)", param="tools")
        if isinstance(choice, NamedToolChoice):
            return params[choice.function.name]  # the whole schema, so its "#" and "$defs" are its own
        # Each tool's schema goes under the root's $defs, its references rebased, so that "#/$defs/X" and "#"
        # still mean its own definitions and itself inside the array (pydantic's nested models use them).
        defs: dict = {}
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": embed_schema(schema, f"t{i}", defs)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for i, (name, schema) in enumerate(params.items())
        ]
        return {
            "type": "array",
            "items": {"anyOf": call},
            "minItems": 1,
            **({"maxItems": 1} if not req.parallel_tool_calls else {}),
            "$defs": defs,
        }

    @staticmethod
    def message(fmt: ToolCallFormat, o: CompletionOutput, max_calls: int | None) -> tuple[AssistantMessage, str]:
        """The whole message of a finished sequence, and its finish_reason ("tool_calls" when it made any)."""
        parsed = parse_tool_calls(fmt, o.text, max_calls)
        calls = [
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in parsed.tool_calls
        ]
        message = AssistantMessage(content=parsed.content, tool_calls=calls or None)
        return message, finish_reason(o.finish_reason, bool(calls))

    @staticmethod
    def deltas(delta: StreamDelta) -> list[DeltaMessage]:
        """One DeltaMessage per piece, as OpenAI streams them: content, then each call's start and fragments."""
        out = [DeltaMessage(content=delta.content)] if delta.content else []
        for d in delta.tool_calls:
            function = DeltaFunctionCall(name=d.name, arguments=d.arguments)
            call = DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None, function=function)
            out.append(DeltaMessage(tool_calls=[call]))
        return out


def finish_reason(engine_reason: str | None, made_calls: bool) -> str | None:
    # A sequence that ended by itself after calling tools finished to call them; one cut by max_tokens did not.
    return "tool_calls" if made_calls and engine_reason == "stop" else engine_reason
