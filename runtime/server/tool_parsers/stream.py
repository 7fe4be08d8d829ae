"""Tool calls out of model text, whole or as OpenAI's streamed deltas: one reading serves both, so they agree."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from pllm.runtime.server.tool_parsers.scan import Scan


class ToolCallFormat(Protocol):
    """How one model family writes tool calls: a reading of the whole text so far (see Scan)."""

    def scan(self, text: str, final: bool, memo: dict | None = None) -> Scan:
        """memo: a stream's own dict, the same on every call, each text extending the last: the format may keep
        what it read there (calls read whole, where an open one stopped) and read on from it, so a stream's cost
        per delta does not grow with the calls and markup before it. None: read the text from the start."""
        ...


class ModelToolCallFormat(ToolCallFormat, Protocol):
    """A format a model writes of its own accord (tool_choice "auto"), selectable by name."""

    name: str
    template_markers: tuple[str, ...]  # all present in a chat template: the template teaches this format
    markup_may_be_special_tokens: bool  # decode with special tokens kept, or the markup could vanish


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ToolCallDelta:
    """One call's piece of a stream chunk: id and name (arguments "") in its first delta only, as OpenAI sends
    it, then argument fragments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class StreamDelta:
    content: str
    tool_calls: tuple[ToolCallDelta, ...]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Feed the cumulative text of one sequence; get what is new since the last feed. Content is sent only once
    it cannot turn out to be markup, a call once the format reports it (whole and valid, but for a forced named
    call, whose arguments grow): its id and name, then its arguments, in fragments as they grow."""

    def __init__(self, fmt: ToolCallFormat, max_calls: int | None = None):
        self.fmt = fmt
        self.max_calls = max_calls  # parallel_tool_calls false: the first call only
        self.content = ""
        self.calls: list[ToolCall] = []  # sent so far (arguments as sent)
        self._memo: dict = {}  # the format's reading so far (ToolCallFormat.scan)
        self._text = ""  # the text it was read from

    def update(self, text: str, final: bool) -> StreamDelta:
        if not text.startswith(self._text):  # not the cumulative text it was fed: read it afresh
            self._memo.clear()
        self._text = text
        scan = self.fmt.scan(text, final, self._memo)
        assert scan.content.startswith(self.content), "a format's content must only grow"
        content, self.content = scan.content[len(self.content) :], scan.content
        deltas = []
        calls = scan.calls[: self.max_calls]
        # calls before the last one sent are whole and were checked when sent: only the last one can still grow
        for index in range(max(len(self.calls) - 1, 0), len(calls)):
            call = calls[index]
            if index == len(self.calls):
                self.calls.append(ToolCall(new_call_id(), call.name, ""))
                deltas.append(ToolCallDelta(index, self.calls[index].id, call.name, ""))
            sent = self.calls[index]
            assert call.name == sent.name and call.arguments.startswith(sent.arguments), "calls must only grow"
            if len(call.arguments) > len(sent.arguments):
                new = call.arguments[len(sent.arguments) :]
                self.calls[index] = ToolCall(sent.id, sent.name, call.arguments)
                deltas.append(ToolCallDelta(index, None, None, new))
        return StreamDelta(content, tuple(deltas))


@dataclass(frozen=True)
class ParsedToolCalls:
    content: str | None  # None when the message is only tool calls, as OpenAI sends it
    tool_calls: tuple[ToolCall, ...]


def parse_tool_calls(fmt: ToolCallFormat, text: str, max_calls: int | None = None) -> ParsedToolCalls:
    """The whole-text reading: the same as the end of a stream fed the same text."""
    stream = ToolCallStream(fmt, max_calls)
    stream.update(text, final=True)
    calls = tuple(stream.calls)
    return ParsedToolCalls(stream.content if stream.content or not calls else None, calls)
