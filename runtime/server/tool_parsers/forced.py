"""The formats the server forces with structured output: tool_choice naming a function, and "required"."""

from __future__ import annotations

from dataclasses import dataclass

from pllm.runtime.server.tool_parsers.scan import PartialCall, Scan, calls_and_content, json_calls, skip_ws


@dataclass(frozen=True)
class NamedCallFormat:
    """tool_choice {"type": "function", "function": {"name": ...}}: the model writes only the arguments object
    (forced to the function's parameters schema) and the server builds the call around it. Its arguments stream
    as they grow: the grammar admits only text that can still close into a valid object, so nothing sent needs
    taking back. max_tokens can cut it, and then, as vLLM does, the call keeps the arguments written so far; the
    call starts only with them, so they are never empty."""

    function_name: str

    def scan(self, text: str, final: bool, memo: dict | None = None) -> Scan:
        arguments = text.lstrip()
        if not arguments:
            return Scan(text if final else "")
        return Scan("", (PartialCall(self.function_name, arguments),))


class RequiredCallsFormat:
    """tool_choice "required": the model writes [{"name": ..., "parameters": {...}}, ...], forced to a schema
    that admits one or more calls of the request's tools. Each call is read once whole, as in the formats a
    model writes unforced; one cut by max_tokens is content."""

    name = "required"

    def scan(self, text: str, final: bool, memo: dict | None = None) -> Scan:
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return Scan(text if final else "")
        calls, rest = json_calls(text, skip_ws(text, i + 1), ",", memo)
        return calls_and_content(text, "", calls, rest, final)
