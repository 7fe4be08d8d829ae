"""Tool-call formats on fixed model outputs: whole, and streamed split at every character, with the same result."""

from __future__ import annotations

import json
import keyword
import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pllm.runtime.server.tool_parsers import (
    TOOL_CALL_PARSERS,
    NamedCallFormat,
    RequiredCallsFormat,
    ToolCallStream,
    parse_tool_calls,
    parser_from_template,
)

HERMES, LLAMA3, PYTHONIC = (TOOL_CALL_PARSERS[n] for n in ("hermes", "llama3_json", "pythonic"))

# (format, model output, expected content, expected [(name, arguments as a JSON value)])
CASES = [
    (
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris", "unit": "c"})],
    ),
    (
        HERMES,
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [("a", {"x": [1, {"y": "}"}]}), ("b", {})],
    ),
    (
        HERMES,
        '<tool_call>{"name": "say", "arguments": {"text": "a \\"quoted\\" <tool_call> \\u00e9"}}</tool_call>',
        None,
        [("say", {"text": 'a "quoted" <tool_call> é'})],
    ),
    (HERMES, '<tool_call>{"arguments": {"q": 1}, "name": "f"}</tool_call>', None, [("f", {"q": 1})]),
    (HERMES, '<tool_call>{"name": "noargs"}</tool_call>', None, [("noargs", {})]),
    # Arguments written as a JSON string that holds an object (some models do): that object.
    (
        HERMES,
        '<tool_call>{"name": "f", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
        None,
        [("f", {"city": "Paris"})],
    ),
    (HERMES, "a < b, and <tool but no call <", "a < b, and <tool but no call <", []),
    (HERMES, "Plain answer.\n\n", "Plain answer.\n\n", []),
    (HERMES, "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    (
        LLAMA3,
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "z;"}}',
        None,
        [("a", {"x": 1}), ("b", {"y": "z;"})],
    ),
    (LLAMA3, "The weather is {sunny}", "The weather is {sunny}", []),
    (LLAMA3, "{not a call", "{not a call", []),
    (LLAMA3, "<|python", "<|python", []),
    (
        PYTHONIC,
        "[get_weather(city=\"Paris\", days=3), get_time(tz='UTC')]",
        None,
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"tz": "UTC"})],
    ),
    (
        PYTHONIC,
        '[f(a=[1, (2, 3)], b={"k": "v)"}, c=None, d=True)]',
        None,
        [("f", {"a": [1, [2, 3]], "b": {"k": "v)"}, "c": None, "d": True})],
    ),
    (PYTHONIC, "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    (PYTHONIC, "[see(the docs] here", "[see(the docs] here", []),
    (PYTHONIC, "Sure thing.", "Sure thing.", []),
    (NamedCallFormat("get_weather"), '{"city": "Paris"}', None, [("get_weather", {"city": "Paris"})]),
    (
        RequiredCallsFormat(),
        '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]',
        None,
        [("a", {"x": 1}), ("b", {})],
    ),
]
# Text that is not a valid call: a call only when its arguments are a JSON object (vLLM's rule), so these stay
# content, whole (finish_reason stop or length, not tool_calls), and never a call with invented arguments.
NOT_CALLS = [
    (HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"]}}</tool_call>'),
    (HERMES, 'Let me see.\n<tool_call>{"name": "f", "arguments": {"a": [1}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "name": "g", "arguments": {}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": {"city": \'Paris\'}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": {"city": "Paris",}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": "x"}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": null}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "", "arguments": {}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "get_weather", "arguments": {"ci'),  # cut by max_tokens
    (HERMES, '<tool_call>{"name": "get_weather"'),  # cut right after the name
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": ["Paris"}}'),
    (LLAMA3, '{"name": "f", "parameters": {"x": -Infinity}}'),
    (PYTHONIC, "[get_weather(x=1e999)]"),
    (PYTHONIC, "[f(a={1, 2})]"),
    (PYTHONIC, "[f(a=1, a=2)]"),
    (RequiredCallsFormat(), '[{"name": "a", "parameters": {"x": 1'),
]
CASES += [(fmt, text, text, []) for fmt, text in NOT_CALLS]
# A valid call, then one that is not: the call stands (a stream has sent it), the rest is content after it.
CASES += [
    (
        HERMES,
        'Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
        '"arguments": {"x": [1}}</tool_call>',
        'Let me check.\n<tool_call>{"name": "b", "arguments": {"x": [1}}</tool_call>',
        [("a", {})],
    ),
    (
        HERMES,
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "b", "arg',
        '<tool_call>{"name": "b", "arg',
        [("a", {"x": 1})],
    ),
    (
        LLAMA3,
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": NaN}}',
        '{"name": "b", "parameters": {"x": NaN}}',
        [("a", {})],
    ),
    (PYTHONIC, "[f(a=1), g(b=1e999)]", "g(b=1e999)]", [("f", {"a": 1})]),
]
IDS = [f"{type(c[0]).__name__}-{i}" for i, c in enumerate(CASES)]


def strict_object(arguments: str) -> dict:
    """OpenAI's arguments as a strict JSON parser reads them: an object, no NaN or Infinity."""

    def refuse(word: str):
        raise ValueError(word)

    def finite(number: str) -> float:
        assert math.isfinite(float(number)), number
        return float(number)

    value = json.loads(arguments, parse_constant=refuse, parse_float=finite)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES, ids=IDS)
def test_whole_text(fmt, text, content, calls):
    parsed = parse_tool_calls(fmt, text)
    assert parsed.content == content
    assert [(c.name, strict_object(c.arguments)) for c in parsed.tool_calls] == calls
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in parsed.tool_calls)
    assert len({c.id for c in parsed.tool_calls}) == len(calls)


def stream_pieces(fmt, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Feed cumulative text piece by piece as a server does; check OpenAI's delta shape; return what a client
    accumulates: the content and (name, arguments) per call."""
    stream, text, content = ToolCallStream(fmt), "", ""
    calls: list[list[str]] = []
    for k, piece in enumerate(pieces):
        text += piece
        delta = stream.update(text, final=k == len(pieces) - 1)
        content += delta.content
        for d in delta.tool_calls:
            if d.index == len(calls):  # a new call: its first delta has id and name, and no arguments yet
                assert d.id and d.id.startswith("call_") and d.name and d.arguments == ""
                calls.append([d.name, ""])
            else:
                assert d.index == len(calls) - 1 or d.index < len(calls)
                assert d.id is None and d.name is None and d.arguments
                calls[d.index][1] += d.arguments
    return content, [(n, a) for n, a in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES, ids=IDS)
def test_streamed_at_every_split_equals_whole(fmt, text, content, calls):
    whole = parse_tool_calls(fmt, text)
    expected = (whole.content or "", [(c.name, c.arguments) for c in whole.tool_calls])
    assert stream_pieces(fmt, list(text)) == expected  # one character at a time
    for k in range(len(text) + 1):  # two pieces, split everywhere
        assert stream_pieces(fmt, [text[:k], text[k:]]) == expected, k


def test_markup_never_reaches_content_while_streaming():
    text = CASES[1][1]
    stream, seen = ToolCallStream(HERMES), ""
    for k in range(1, len(text) + 1):
        seen += stream.update(text[:k], final=False).content
        assert "<" not in seen and not seen.endswith("\n")
    assert seen == "Let me check."


def test_parallel_tool_calls_false_keeps_the_first_call():
    parsed = parse_tool_calls(HERMES, CASES[1][1], max_calls=1)
    assert [c.name for c in parsed.tool_calls] == ["a"]


def test_a_call_is_sent_once_whole_and_valid():
    # Arguments sent piecewise could turn out invalid ({"city": "Paris"]) and cannot be taken back, so nothing of
    # a call is sent until its object closes; then its start and its arguments.
    stream = ToolCallStream(HERMES)
    text = CASES[0][1]
    close = text.rindex("}") + 1
    for k in range(close):
        assert stream.update(text[:k], final=False).tool_calls == ()
    whole = stream.update(text[:close], final=False)
    assert [(d.name, d.arguments) for d in whole.tool_calls] == [
        ("get_weather", ""),
        (None, '{"city": "Paris", "unit": "c"}'),
    ]


def test_a_forced_named_call_streams_its_arguments_and_never_sends_them_empty():
    named = NamedCallFormat("f")
    assert stream_pieces(named, [" ", "\n", '{"a": ', "1}"]) == ("", [("f", '{"a": 1}')])
    assert stream_pieces(named, [" ", " "]) == ("  ", [])  # cut before the arguments began: no call
    # Cut by max_tokens inside the arguments: the call keeps what was written, as vLLM returns it.
    assert [c.arguments for c in parse_tool_calls(named, '{"a": [1').tool_calls] == ['{"a": [1']


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% if tools %}<tool_call>{{ tools | tojson }}</tool_call>{% endif %}", "hermes"),
        ("{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}", "llama3_json"),
        ("Call as [func_name1(params_name1=params_value1)]", "pythonic"),
        ("<|start_header_id|>ipython<|end_header_id|> [func_name1(a=1)]", None),  # two formats fit: ambiguous
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        (None, None),
    ],
)
def test_parser_from_template(template, expected):
    name, reason = parser_from_template(template)
    assert name == expected
    assert reason


# Drawn calls, written as each model family writes them, read back whole and streamed in drawn pieces.
IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))  # f(if=1)
SCALARS = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=6)
VALUES = st.recursive(SCALARS, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=4), v, max_size=3),
                      max_leaves=6)  # fmt: skip
CALLS = st.lists(st.tuples(IDENT, st.dictionaries(IDENT, VALUES, max_size=3)), min_size=1, max_size=3)


def write(fmt, calls: list[tuple[str, dict]]) -> str:
    if fmt is HERMES:
        return "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)
    if fmt is LLAMA3:
        return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    return "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a in calls) + "]"


def cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)] or [""]


@settings(max_examples=60, deadline=None, database=None)
@given(fmt=st.sampled_from([HERMES, LLAMA3, PYTHONIC]), calls=CALLS, points=st.lists(st.integers(0, 10**4)))
def test_drawn_calls_read_back_whole_and_streamed(fmt, calls, points):
    text = write(fmt, calls)
    parsed = parse_tool_calls(fmt, text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [(n, a) for n, a in calls]
    assert parsed.content is None
    assert stream_pieces(fmt, cut(text, points)) == ("", [(c.name, c.arguments) for c in parsed.tool_calls])


@settings(max_examples=60, deadline=None, database=None)
@given(fmt=st.sampled_from([HERMES, LLAMA3, PYTHONIC]), text=st.text(max_size=40), points=st.lists(st.integers()))
def test_drawn_plain_text_stays_content(fmt, text, points):
    # Text that holds no call of any format (a drawn one could, by chance, for the short pythonic form).
    assume("<tool_call>" not in text and '"name"' not in text and not re.search(r"\[\s*[A-Za-z_][\w.]*\s*\(", text))
    parsed = parse_tool_calls(fmt, text)
    assert parsed.content == text and parsed.tool_calls == ()
    assert stream_pieces(fmt, cut(text, points)) == (text, [])


CORRUPTIONS = "{}[]\",:;'()0 aeNI"


@settings(max_examples=150, deadline=None, database=None)
@given(
    fmt=st.sampled_from([HERMES, LLAMA3, PYTHONIC]),
    calls=CALLS,
    edits=st.lists(st.tuples(st.integers(0, 10**4), st.booleans(), st.sampled_from(CORRUPTIONS)), max_size=3),
    points=st.lists(st.integers(0, 10**4)),
)
def test_corrupted_calls_stream_as_they_read_whole_and_every_call_is_valid(fmt, calls, edits, points):
    # A model's slip anywhere in its calls: never an exception, streamed equals whole, and a call only with a
    # JSON object for arguments; text read as no call is all content.
    text = write(fmt, calls)
    for at, insert, char in edits:
        at %= len(text) + 1
        text = text[:at] + char + text[at:] if insert else text[:at] + text[at + 1 :]
    parsed = parse_tool_calls(fmt, text)
    for call in parsed.tool_calls:
        strict_object(call.arguments)
    if not parsed.tool_calls:
        assert parsed.content == text
    expected = (parsed.content or "", [(c.name, c.arguments) for c in parsed.tool_calls])
    assert stream_pieces(fmt, cut(text, points)) == expected
    assert stream_pieces(fmt, list(text)) == expected


LONG_OUTPUTS = [  # 300 calls, then an open one: a model (or a prompt that steers it) writing calls at length
    (HERMES, '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n' * 300 + '<tool_call>{"name'),
    (LLAMA3, '{"name": "f", "parameters": {"a": 1}}; ' * 300 + '{"name'),
    (RequiredCallsFormat(), "[" + '{"name": "f", "parameters": {"a": 1}}, ' * 300 + '{"name'),
    (PYTHONIC, "[" + "f(a=1), " * 300 + "f(a="),
]


@pytest.mark.parametrize(("fmt", "text"), LONG_OUTPUTS, ids=[type(f).__name__ for f, _ in LONG_OUTPUTS])
def test_a_stream_reads_each_call_once_not_once_per_delta(fmt, text, monkeypatch):
    """The stream is fed the cumulative text at every token: reading every call again each time was O(n^2) over
    a long output, seconds of the event loop for one 8k-token stream. Each call is parsed about once."""
    import pllm.runtime.server.tool_parsers.pythonic as pythonic
    import pllm.runtime.server.tool_parsers.scan as scan

    parses = 0
    decoder, keyword_arguments = scan._DECODER, pythonic._keyword_arguments_json

    class CountingDecoder:
        def raw_decode(self, s, idx=0):
            nonlocal parses
            parses += 1
            return decoder.raw_decode(s, idx)

    def counting_keyword_arguments(source):
        nonlocal parses
        parses += 1
        return keyword_arguments(source)

    monkeypatch.setattr(scan, "_DECODER", CountingDecoder())
    monkeypatch.setattr(pythonic, "_keyword_arguments_json", counting_keyword_arguments)
    stream, deltas = ToolCallStream(fmt), 0
    for k in range(4, len(text) + 4, 4):  # about a token's worth of text a delta
        stream.update(text[:k], final=False)
        deltas += 1
    assert len(stream.calls) == 300
    assert parses <= deltas + 300, (parses, deltas)  # at most the open call each delta, and each call once


def test_a_long_open_python_call_is_read_on_not_again_from_its_start():
    """An open call's argument text is scanned character by character in Python: from where the last delta
    stopped, not from its start, or a 32k-character argument streamed 4 characters a delta took ~8 s."""
    import time

    text = '[f(a="' + "x" * 32_000
    stream, start = ToolCallStream(PYTHONIC), time.process_time()
    for k in range(4, len(text) + 4, 4):
        stream.update(text[:k], final=False)
    assert time.process_time() - start < 2.0
    assert parse_tool_calls(PYTHONIC, text + '")]').tool_calls[0].arguments == json.dumps({"a": "x" * 32_000})
