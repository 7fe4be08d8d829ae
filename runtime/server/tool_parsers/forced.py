"""The formats the server forces with structured output: tool_choice naming a function, and "required"."""

from __future__ import annotations

from dataclasses import dataclass

from pllm.runtime.server.tool_parsers.scan import PartialCall, Scan, json_calls, skip_ws


@dataclass(frozen=True)
class NamedCallFormat:
    """tool_choice {"type": "function", "function": {"name": ...}}: the model writes only the arguments object
    (forced to the function's parameters schema) and the server builds the call around it."""

    function_name: str

    def scan(self, text: str, final: bool) -> Scan:
        return Scan("", (PartialCall(self.function_name, text.lstrip(), final),))


class RequiredCallsFormat:
    """tool_choice "required": the model writes [{"name": ..., "parameters": {...}}, ...], forced to a schema
    that admits one or more calls of the request's tools."""

    name = "required"

    def scan(self, text: str, final: bool) -> Scan:
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return Scan("")
        return Scan("", json_calls(text, skip_ws(text, i + 1), ","))
