"""tool_choice "auto" at the chat serving layer: stub engine outputs in every chunking, read with openai's own types."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from pllm.runtime.engine.outputs import CompletionOutput, RequestOutput
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.request_stream import EngineRequest
from pllm.runtime.server.serving import Prepared
from pllm.runtime.server.serving_chat import ChatServing
from pllm.runtime.server.serving_tools import ToolCalling

# A stub engine controls exactly how the text grows, which a model cannot; test_tool_calling.py runs "auto" end to
# end through the server, its text forced into the hermes format by a regex.

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
CALLS = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
)


class StubBase:
    model_name = "stub"


class StubStream:
    """The engine's outputs for one request: the text growing `step` characters at a time, then finished."""

    def __init__(self, text: str, finish_reason: str, step: int):
        cuts = [*range(step, len(text), step), len(text)]
        self.outputs = [
            RequestOutput(
                "chatcmpl-1",
                None,
                [1, 2, 3],
                [CompletionOutput(0, text[:k], list(range(k)), finish_reason if k == len(text) else None)],
                finished=k == len(text),
            )
            for k in cuts
        ]

    async def __aiter__(self):
        for out in self.outputs:
            yield out

    def close(self) -> None:
        pass


def serve(text: str, stream: bool, finish_reason: str = "stop", step: int = 3, **fields):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, stream=stream, **fields)
    serving = ChatServing(StubBase(), ToolCalling("hermes", None))
    prep = Prepared([EngineRequest("chatcmpl-1", [1, 2, 3], SamplingParams(), 0.0)], [""], "chatcmpl-1")
    if not stream:
        response = asyncio.run(serving.response(req, prep, StubStream(text, finish_reason, step)))
        return ChatCompletion.model_validate_json(response.model_dump_json())

    async def events() -> list[str]:
        return [e async for e in serving.stream(req, prep, StubStream(text, finish_reason, step))]

    frames = asyncio.run(events())
    assert frames[-1] == "data: [DONE]\n\n"
    return [ChatCompletionChunk.model_validate_json(f.removeprefix("data: ")) for f in frames[:-1]]


def test_auto_response_carries_the_calls_and_the_content_before_them():
    message = serve(CALLS, stream=False).choices[0]
    assert message.finish_reason == "tool_calls"
    assert message.message.content == "Let me look."
    calls = message.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_time", {"tz": "UTC"}),
    ]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_auto_stream_accumulates_in_the_openai_client_to_the_same_message(step):
    chunks = serve(CALLS, stream=True, step=step)
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    whole = serve(CALLS, stream=False).choices[0]
    assert final.finish_reason == "tool_calls"
    assert final.message.content == whole.message.content == "Let me look."
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any("<" in (d.content or "") for d in deltas)  # no markup reaches the client as content
    for index in (0, 1):
        pieces = [d.tool_calls[0] for d in deltas if d.tool_calls and d.tool_calls[0].index == index]
        assert pieces[0].id and pieces[0].function.name and pieces[0].function.arguments == ""
        assert all(p.id is None and p.function.name is None for p in pieces[1:])
    # The finish comes alone, in an empty delta after the last fragment, as OpenAI sends it.
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "tool_calls" and last.delta.tool_calls is None and last.delta.content is None


def test_auto_plain_answer_stays_content():
    for stream in (False, True):
        out = serve("The answer is 42 < 43.", stream=stream)
        if stream:
            state = ChatCompletionStreamState()
            for chunk in out:
                state.handle_chunk(chunk)
            out = state.get_final_completion()
        choice = out.choices[0]
        assert choice.message.content == "The answer is 42 < 43." and not choice.message.tool_calls
        assert choice.finish_reason == "stop"


def accumulated(text: str, stream: bool, finish_reason: str = "stop", step: int = 3):
    """The choice a client ends up with, streamed (accumulated by openai's own client) or not."""
    out = serve(text, stream=stream, finish_reason=finish_reason, step=step)
    if stream:
        state = ChatCompletionStreamState(input_tools=TOOLS)
        for chunk in out:
            state.handle_chunk(chunk)
        out = state.current_completion_snapshot  # get_final_completion() refuses a "length" finish
    return out.choices[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens_finishes_with_length(stream):
    # Cut inside the only call: no call was made, the unfinished text is content (never arguments "").
    choice = accumulated(CALLS[:60], stream, finish_reason="length")
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content == CALLS[:60]
    # Cut inside the second: the first call stands, the unfinished one is content after it.
    cut = CALLS.index("get_time") + 5
    choice = accumulated(CALLS[:cut], stream, finish_reason="length")
    assert choice.finish_reason == "length"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city": "Paris", "days": 3}')
    ]
    assert choice.message.content == "Let me look.\n" + CALLS[CALLS.index("<tool_call>", 20) : cut]


MALFORMED = [
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"]}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"a": [1}}</tool_call>',
    '<tool_call>{"name": "get_weather", "name": "get_time", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"a": 1}, "parameters": {"b": 2}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": \'Paris\'}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris",}}</tool_call>',
]


@pytest.mark.parametrize("text", MALFORMED)
@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_malformed_call_is_content_streamed_or_not(text, step):
    # What the parser cannot read as a call is returned as the model wrote it, streamed or not, finish "stop":
    # no error mid-stream, no call with invented arguments.
    for stream in (False, True):
        choice = accumulated(text, stream, step=step)
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert choice.message.content == text


def test_arguments_written_as_a_json_string_are_that_object():
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'
    for stream in (False, True):
        choice = accumulated(text, stream)
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        assert [c.function.arguments for c in choice.message.tool_calls] == ['{"city": "Paris"}']


def test_parallel_tool_calls_false_returns_the_first_call_only():
    for stream in (False, True):
        out = serve(CALLS, stream=stream, parallel_tool_calls=False)
        if stream:
            state = ChatCompletionStreamState(input_tools=TOOLS)
            for chunk in out:
                state.handle_chunk(chunk)
            out = state.get_final_completion()
        assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_weather"]


HERMES_TEMPLATE = "{% if tools %}Call tools as <tool_call>...</tool_call>{% endif %}{{ messages[0].content }}"


@pytest.mark.parametrize(
    ("flag", "template", "expected", "why"),
    [
        (None, HERMES_TEMPLATE, "hermes", "(the chat template writes '<tool_call>')"),
        ("pythonic", HERMES_TEMPLATE, "pythonic", "(--tool-call-parser)"),  # the flag wins over the template
        ("none", HERMES_TEMPLATE, None, "(--tool-call-parser none)"),
        (None, "{{ messages[0].content }}", None, "(the chat template shows no known tool-call format)"),
    ],
)
def test_the_auto_parser_and_the_start_up_line_saying_why(caplog, flag, template, expected, why):
    with caplog.at_level("INFO", logger="pllm.server"):
        calling = ToolCalling(flag, template)
    assert calling.parser_name == expected
    assert why in caplog.text and (expected or "no format") in caplog.text


def test_the_cli_offers_every_registered_parser():
    from pllm.runtime.server.cli_args import build_parser
    from pllm.runtime.server.tool_parsers import TOOL_CALL_PARSERS

    for name in [*TOOL_CALL_PARSERS, "none"]:
        assert build_parser().parse_args(["build", "--tool-call-parser", name]).tool_call_parser == name
    assert set(TOOL_CALL_PARSERS) >= {"hermes", "llama3_json", "pythonic"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--tool-call-parser", "unknown"])


@pytest.mark.parametrize(
    ("parser", "tool_choice", "skip"), [("hermes", "auto", False), ("pythonic", "auto", True), ("hermes", "none", True)]
)
def test_auto_keeps_special_tokens_in_the_text_where_the_markup_may_be_one(parser, tool_choice, skip):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice=tool_choice)
    params = asyncio.run(ToolCalling(parser, None).adjust_params(req, SamplingParams(), grammars=None))
    assert params.skip_special_tokens is skip
