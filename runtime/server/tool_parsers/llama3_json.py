"""llama3_json: Llama 3.1/3.2 answer with {"name": ..., "parameters": {...}} (after <|python_tag|>, ';' between)."""

from __future__ import annotations

from pllm.runtime.server.tool_parsers.scan import Scan, calls_and_content, json_calls, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonFormat:
    name = "llama3_json"
    # Llama 3's templates render tool results under the ipython role.
    template_markers = ("<|start_header_id|>ipython<|end_header_id|>",)
    # <|python_tag|> is a special token; kept in the text, it marks a call (the reading takes it or its absence).
    markup_may_be_special_tokens = True

    def scan(self, text: str, final: bool, memo: dict | None = None) -> Scan:
        i = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, i):
            i = skip_ws(text, i + len(PYTHON_TAG))
        elif PYTHON_TAG.startswith(text[i:]) and not final:
            return Scan("")  # nothing yet, or the start of the tag
        if i < len(text) and text[i] != "{":
            return Scan(text)  # a message that does not open with a call is plain content
        calls, rest = json_calls(text, i, ";", memo)
        return calls_and_content(text, "", calls, rest, final)
