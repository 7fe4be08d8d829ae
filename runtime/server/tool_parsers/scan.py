"""What a tool-call format reads from model text (Scan, PartialCall), and the scanners the formats share."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WHITESPACE = " \t\r\n"
_WHITESPACE_RUN = re.compile(r"[ \t\r\n]*")
ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Qwen say "arguments", Llama 3 says "parameters"


class Malformed(ValueError):
    """The text is not a valid tool call of this format."""


@dataclass(frozen=True)
class PartialCall:
    """One tool call as far as the text goes. A later reading of a longer text has the same name and arguments
    that extend these, which is what lets a stream send them as deltas. The formats a model writes of its own
    accord only report a call once it is whole and valid (see read_json_call); a forced call (NamedCallFormat)
    grows, as its grammar cannot let it turn invalid."""

    name: str
    arguments: str  # OpenAI's JSON text of the arguments object (so far)


@dataclass(frozen=True)
class Scan:
    """A reading of the whole model text so far: plain content safe to show, and the tool calls."""

    content: str  # a prefix of what the final reading's content will be
    calls: tuple[PartialCall, ...] = ()


def skip_ws(text: str, i: int) -> int:
    return _WHITESPACE_RUN.match(text, i).end()  # in C: a model can write a long run of whitespace


def held_back(text: str, marker: str) -> str:
    """text without a tail that could still grow into marker, nor trailing whitespace (which is dropped before a
    tool call, so it cannot be sent before the next character shows whether one follows)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            text = text[:-k]
            break
    return text.rstrip(WHITESPACE)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # {"name": "a", "name": "b"} or an argument given twice: which one the model meant is a guess, so not a call.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Malformed("a key appears twice")
    return obj


def _no_constant(word: str):
    raise Malformed(f"{word} is not JSON")  # Python's json reads NaN and Infinity; OpenAI clients' parsers do not


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def arguments_json(value: object) -> str:
    """A call's arguments as OpenAI's JSON text of an object (compact separators aside, as vLLM writes them).
    Some models write the object as a JSON string ("arguments": "{\\"city\\": ...}"): a string that holds an
    object is taken as that object. Anything else, or a number that is not finite (1e999 overflows to inf),
    is Malformed: the text is then not a call, rather than a call with invented or unparseable arguments."""
    try:
        if isinstance(value, str):
            value = _DECODER.decode(value)
        if not isinstance(value, dict):
            raise Malformed("the arguments are not an object")
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):  # Malformed is a ValueError
        raise Malformed("the arguments are not a JSON object") from None


def read_json_call(text: str, i: int) -> tuple[PartialCall, int] | None:
    """The call whose whole JSON object {"name": ..., "arguments" | "parameters": ...} starts at text[i], and
    the index after it; None while the object is still open, and when it is not a valid call (a longer text
    cannot make a closed object valid, and the formats stop reading there either way).

    Only whole, valid calls are read, so a stream sends each call once, complete: arguments streamed piecewise
    could turn out unclosable or invalid ({"city": "Paris"]), and what a client was sent cannot be taken back.
    Other keys are ignored; a call without arguments has an empty object, one with both keys is ambiguous."""
    if i >= len(text) or text[i] != "{":
        return None
    try:
        obj, end = _DECODER.raw_decode(text, i)
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise Malformed("the name is not a non-empty string")
        given = [obj[k] for k in ARGUMENT_KEYS if k in obj]
        if len(given) > 1:
            raise Malformed("both arguments and parameters")
        return PartialCall(name, arguments_json(given[0] if given else {})), end
    except (ValueError, RecursionError):  # still open, or not a call (JSONDecodeError and Malformed alike)
        return None


def json_calls(
    text: str, i: int, separator: str, memo: dict | None = None
) -> tuple[tuple[PartialCall, ...], int | None]:
    """Call objects from text[i] on, separated by `separator`; and where the reading stopped at text that is
    not (yet) a call, or None when it stopped after a call at something else (ignored: what follows the calls
    is not content in any format here). memo (a stream's, see ToolCallStream) resumes after the calls and
    separators an earlier, shorter text already held, so a stream reads each call once, not once per delta."""
    calls: list[PartialCall] = []
    if memo is not None and (saved := memo.get("json_calls")) is not None:
        calls, count, i = saved  # the same list, grown in place; its first count calls depend on text[:i] alone
        del calls[count:]
        i = skip_ws(text, i)
    while (read := read_json_call(text, i)) is not None:
        calls.append(read[0])
        j = skip_ws(text, read[1])
        if j >= len(text) or text[j] != separator:
            return tuple(calls), None
        if memo is not None:
            memo["json_calls"] = (calls, len(calls), j + 1)
        i = skip_ws(text, j + 1)
    return tuple(calls), i


def calls_and_content(text: str, lead: str, calls: tuple[PartialCall, ...], rest: int | None, final: bool) -> Scan:
    """A format's reading: `lead` is the content before the first call, `rest` where the calls stopped at text
    that is not (yet) a whole, valid call. Until the end that text is held, as it may still close into one.
    At the end it is content: all of the text when no call was read (finish_reason stays stop or length, as
    vLLM returns an unparseable call), else what follows the last call, after `lead`. Either way what was sent
    as content, `lead`, is a prefix of it."""
    if not final or (calls and rest is None):
        return Scan(lead, calls)
    if not calls:
        return Scan(text)
    tail = text[len(text[:rest].rstrip(WHITESPACE)) :] if lead else text[rest:]
    return Scan(lead + tail, calls)
