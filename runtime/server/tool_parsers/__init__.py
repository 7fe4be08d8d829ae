"""Tool-call formats by name (pllm-serve --tool-call-parser), and the one a chat template implies."""

from __future__ import annotations

from pllm.runtime.server.tool_parsers.forced import NamedCallFormat, RequiredCallsFormat
from pllm.runtime.server.tool_parsers.hermes import HermesFormat
from pllm.runtime.server.tool_parsers.llama3_json import Llama3JsonFormat
from pllm.runtime.server.tool_parsers.pythonic import PythonicFormat
from pllm.runtime.server.tool_parsers.stream import (
    ModelToolCallFormat,
    ParsedToolCalls,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStream,
    parse_tool_calls,
)

NO_PARSER = "none"  # --tool-call-parser none: tool_choice "auto" is refused even if the template shows a format

# A new format: one module with a ModelToolCallFormat class (stream.py), and a line here.
TOOL_CALL_PARSERS: dict[str, ModelToolCallFormat] = {
    f.name: f
    for f in (
        HermesFormat(),
        Llama3JsonFormat(),
        PythonicFormat(),
    )
}


def parser_from_template(chat_template: str | None) -> tuple[str | None, str]:
    """The one format whose markers all appear in the chat template, and why; None when no format's do or more
    than one format's do (then tool_choice "auto" needs --tool-call-parser)."""
    if not chat_template:
        return None, "the build has no chat template"
    matches = [name for name, f in TOOL_CALL_PARSERS.items() if all(m in chat_template for m in f.template_markers)]
    if len(matches) == 1:
        markers = ", ".join(repr(m) for m in TOOL_CALL_PARSERS[matches[0]].template_markers)
        return matches[0], f"the chat template writes {markers}"
    if not matches:
        return None, "the chat template shows no known tool-call format"
    return None, f"the chat template fits more than one tool-call format ({', '.join(matches)})"


__all__ = [
    "TOOL_CALL_PARSERS",
    "ModelToolCallFormat",
    "NamedCallFormat",
    "ParsedToolCalls",
    "RequiredCallsFormat",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStream",
    "parse_tool_calls",
    "parser_from_template",
]
