"""hermes: Qwen and Hermes models write one <tool_call>{"name": ..., "arguments": {...}}</tool_call> per call."""

from __future__ import annotations

from pllm.runtime.server.tool_parsers.scan import (
    WHITESPACE,
    PartialCall,
    Scan,
    content_unless_called,
    held_back,
    json_call_object,
    skip_ws,
)

OPEN = "<tool_call>"


class HermesFormat:
    name = "hermes"
    # A chat template that writes this tag tells the model to call tools this way.
    template_markers = (OPEN,)
    # Some vocabularies (Hermes 2 Pro) make <tool_call> a special token, which decoding would otherwise drop.
    markup_may_be_special_tokens = True

    def scan(self, text: str, final: bool) -> Scan:
        first = text.find(OPEN)
        if first < 0:
            return Scan(text if final else held_back(text, OPEN))
        calls: list[PartialCall] = []
        start = first
        while start >= 0:
            i = skip_ws(text, start + len(OPEN))
            if i >= len(text) or text[i] != "{":
                break
            call, end = json_call_object(text, i)
            calls.append(call)
            if end is None:
                break
            # Text between calls (a newline, the closing tag) and after them is markup, not content.
            start = text.find(OPEN, end)
        return content_unless_called(text, tuple(calls), final, text[:first].rstrip(WHITESPACE))
