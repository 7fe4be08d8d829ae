"""hermes: Qwen and Hermes models write one <tool_call>{"name": ..., "arguments": {...}}</tool_call> per call."""

from __future__ import annotations

from pllm.runtime.server.tool_parsers.scan import (
    WHITESPACE,
    PartialCall,
    Scan,
    calls_and_content,
    held_back,
    read_json_call,
    skip_ws,
)

OPEN = "<tool_call>"


class HermesFormat:
    name = "hermes"
    # A chat template that writes this tag tells the model to call tools this way.
    template_markers = (OPEN,)
    # Some vocabularies (Hermes 2 Pro) make <tool_call> a special token, which decoding would otherwise drop.
    markup_may_be_special_tokens = True

    def scan(self, text: str, final: bool, memo: dict | None = None) -> Scan:
        first = text.find(OPEN)
        if first < 0:
            return Scan(text if final else held_back(text, OPEN))
        calls: list[PartialCall] = []
        start, rest = first, None
        if memo is not None and (saved := memo.get("hermes")) is not None:
            calls, after = saved  # calls an earlier, shorter text already held (the list grows in place)
            start = text.find(OPEN, after)
        while start >= 0:
            read = read_json_call(text, skip_ws(text, start + len(OPEN)))
            if read is None:
                rest = start  # this tag's call is still open, or is none: calls after it are not read
                break
            calls.append(read[0])
            if memo is not None:
                memo["hermes"] = (calls, read[1])
            # Text between calls (a newline, the closing tag) and after them is markup, not content.
            start = text.find(OPEN, read[1])
        return calls_and_content(text, text[:first].rstrip(WHITESPACE), tuple(calls), rest, final)
