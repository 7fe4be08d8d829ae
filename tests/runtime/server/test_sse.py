"""SSE framing: an event is one line for any client's line splitter, whatever characters the model wrote."""

from __future__ import annotations

import json

import httpx

from pllm.runtime.server.protocol_responses import CompletionChoice, CompletionStreamResponse
from pllm.runtime.server.sse import sse

# CR and LF are escaped by JSON itself; these three JSON may carry raw, and str.splitlines breaks at them
LINE_BREAKING = "a\x85b\u2028c\u2029d \u00e9\u4e2d\U0001f600"


def test_an_event_with_unicode_line_breaks_stays_one_line():
    chunk = CompletionStreamResponse(id="cmpl-1", model="m", choices=[CompletionChoice(index=0, text=LINE_BREAKING)])
    event = sse(chunk)
    assert event.endswith("\n\n") and event.count("\n") == 2
    (line,) = event.strip("\n").splitlines()  # Python's splitter, the widest: one line
    assert json.loads(line.removeprefix("data: "))["choices"][0]["text"] == LINE_BREAKING
    # httpx's iter_lines, the splitter that cut such an event in two
    lines = list(httpx.Response(200, content=event.encode()).iter_lines())
    assert [json.loads(x.removeprefix("data: "))["choices"][0]["text"] for x in lines if x] == [LINE_BREAKING]


def test_plain_and_preserialised_events_are_unchanged():
    assert sse("[DONE]") == "data: [DONE]\n\n"
    chunk = CompletionStreamResponse(id="cmpl-1", model="m", choices=[CompletionChoice(index=0, text="caf\u00e9 ok")])
    assert sse(chunk) == f"data: {chunk.model_dump_json()}\n\n"  # other non-ASCII text passes through as UTF-8
