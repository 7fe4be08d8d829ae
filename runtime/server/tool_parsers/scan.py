"""What a tool-call format reads from model text (Scan, PartialCall), and the scanners the formats share."""

from __future__ import annotations

import json
from dataclasses import dataclass

WHITESPACE = " \t\r\n"
ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Qwen say "arguments", Llama 3 says "parameters"


class Malformed(ValueError):
    """The text cannot become a tool call of this format, however it continues."""


@dataclass(frozen=True)
class PartialCall:
    """One tool call as far as the text goes. Every field only grows as the text does: a later reading of a
    longer text has the same name (once known) and arguments that extend these, which is what lets a stream
    send them as deltas."""

    name: str | None  # None until the whole name has been read
    arguments: str  # the raw JSON text of the arguments object so far ("" until it starts)
    complete: bool  # the call's text has ended


@dataclass(frozen=True)
class Scan:
    """A reading of the whole model text so far: plain content safe to show, and the tool calls."""

    content: str  # a prefix of what the final reading's content will be
    calls: tuple[PartialCall, ...] = ()


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def held_back(text: str, marker: str) -> str:
    """text without a tail that could still grow into marker, nor trailing whitespace (which is dropped before a
    tool call, so it cannot be sent before the next character shows whether one follows)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            text = text[:-k]
            break
    return text.rstrip(WHITESPACE)


def json_string_end(text: str, i: int) -> int | None:
    """text[i] is '"': the index after the closing quote, None if the text ends first."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def json_value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at text[i], None if the text ends first (Malformed when the
    brackets cannot balance). Validity inside is left to json.loads on the whole value."""
    if text[i] == '"':
        return json_string_end(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}] \t\r\n":
            j += 1
        return j if j < len(text) else None  # a number may still have digits to come
    stack = []
    j = i
    while j < len(text):
        c = text[j]
        if c == '"':
            end = json_string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        if c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]":
            if not stack or stack.pop() != c:
                raise Malformed(f"unbalanced {c!r}")
            if not stack:
                return j + 1
        j += 1
    return None


def loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        raise Malformed("invalid JSON") from None


def json_call_object(text: str, i: int) -> tuple[PartialCall, int | None]:
    """text[i] is '{' opening {"name": ..., "arguments" | "parameters": {...}}: the call so far, and the index
    after the object (None while it is open, or when it broke off: then the call is what was read, complete, as
    a stream may already have sent it). Other keys are skipped; the arguments' raw text is kept as it is, so
    what a stream sends piecewise equals what a whole reading returns."""
    found: dict = {"name": None, "arguments": "", "done": False}
    try:
        end = _read_call_object(text, i, found)
    except Malformed:  # arguments never begun are an empty object; begun ones stay as sent
        return PartialCall(found["name"], found["arguments"] or "{}", True), None
    if end is None:
        return PartialCall(found["name"], found["arguments"], False), None
    return PartialCall(found["name"], found["arguments"] if found["done"] else "{}", True), end


def _read_call_object(text: str, i: int, found: dict) -> int | None:
    j = i + 1
    while True:
        j = skip_ws(text, j)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
        if j >= len(text):
            return None
        if text[j] == "}":
            return j + 1
        if text[j] != '"':
            raise Malformed(f"expected a key at {j}")
        key_end = json_string_end(text, j)
        colon = skip_ws(text, key_end) if key_end is not None else len(text)
        value = skip_ws(text, colon + 1)
        if value >= len(text):
            return None
        if text[colon] != ":":
            raise Malformed(f"expected ':' at {colon}")
        key = loads(text[j:key_end])
        end = json_value_end(text, value)
        if key == "name" and end is not None:
            name = loads(text[value:end])
            if not isinstance(name, str) or not name:
                raise Malformed("the name is not a non-empty string")
            found["name"] = name
        elif key in ARGUMENT_KEYS:
            if text[value] != "{":
                raise Malformed("the arguments are not an object")
            found["arguments"] = text[value : end if end is not None else len(text)]
            if end is not None:
                loads(found["arguments"])
                found["done"] = True
        if end is None:
            return None
        j = end


def json_calls(text: str, i: int, separator: str) -> tuple[PartialCall, ...]:
    """Call objects from text[i] on, separated by `separator`: as many as read, stopping quietly at text that is
    not one (what follows the calls is not content in any format here)."""
    calls: list[PartialCall] = []
    while i < len(text) and text[i] == "{":
        call, end = json_call_object(text, i)
        calls.append(call)
        if end is None:
            break
        i = skip_ws(text, end)
        if i >= len(text) or text[i] != separator:
            break
        i = skip_ws(text, i + 1)
    return tuple(calls)


def content_unless_called(text: str, calls: tuple[PartialCall, ...], final: bool, content: str) -> Scan:
    """At the end of the text, a reading that named no call was plain content all along: nothing of it was sent
    as a call, and what was sent as content is a prefix of the whole text."""
    if final and not any(c.name for c in calls):
        return Scan(text)
    return Scan(content, calls)
