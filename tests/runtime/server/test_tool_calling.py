"""Tool calling through the official openai client: tools in the template, forced calls, streaming, round trips."""

from __future__ import annotations

import json

import httpx
import pytest
from tiny_models import make_tiny_model

# A Qwen-like template that renders tools, earlier calls and tool results: it writes <tool_call>, so the server
# reads "auto" output with the hermes format without being told.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    'Call a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}<tool_response>{{ m.tool_call_id }}: {{ m.content }}</tool_response>"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"enum": ["UTC", "CET"]}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_build(tmp_path_factory):
    from pllm.compiler.build import BuildOptions, build

    # Byte-level tokens of a 400-word vocabulary: the tools' JSON alone takes ~500 of them.
    src = make_tiny_model(tmp_path_factory.mktemp("tiny-tools"), max_position_embeddings=4096)
    (src / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    options = BuildOptions(dtype="float32", progress=False)
    return build(str(src), tmp_path_factory.mktemp("build-tools") / "build", options)


@pytest.fixture(scope="module")
def tool_server(tool_build, launch_build):
    return launch_build(tool_build, "--served-model-name", "x", "--kv-cache-memory", "16M")


@pytest.fixture
def tool_client(tool_server):
    from openai import OpenAI

    return OpenAI(base_url=tool_server.api, api_key="unused", max_retries=0, timeout=120)


def test_the_parser_comes_from_the_chat_template_and_is_logged(tool_server):
    assert "tool_choice 'auto' reads the hermes format (the chat template writes '<tool_call>')" in tool_server.log()


def check_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "days"} and isinstance(args["city"], str) and args["days"] in range(1, 8)
    return args


@pytest.mark.parametrize("seed", range(3))
def test_named_tool_choice_always_makes_a_call_that_parses(tool_client, seed):
    r = tool_client.chat.completions.create(
        model="x", messages=USER, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=seed, max_tokens=200
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_weather_call(choice.message.tool_calls[0])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_calls_one_of_the_tools(tool_client, parallel):
    for seed in range(3):
        r = tool_client.chat.completions.create(
            model="x",
            messages=USER,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=1.0,
            seed=seed,
            max_tokens=1500,  # room for many calls: the grammar lets a sampled list run on
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
        for call in choice.message.tool_calls:
            if call.function.name == "get_time":
                assert json.loads(call.function.arguments)["tz"] in ("UTC", "CET")
            else:
                check_weather_call(call)
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


def test_streamed_call_deltas_are_shaped_as_openai_sends_them(tool_client):
    kwargs = dict(model="x", messages=USER, tools=TOOLS, tool_choice=NAMED, temperature=0.0, max_tokens=200)
    whole = tool_client.chat.completions.create(**kwargs).choices[0]
    chunks = list(tool_client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert all(len(d.tool_calls) == 1 for d in deltas if d.tool_calls)
    first, rest = calls[0], calls[1:]
    # The first delta of a call: index, id, type and name, arguments ""; then argument fragments only.
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert len(rest) >= 2 and all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    assert not any(d.content for d in deltas)  # no content: the output is only the call
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    arguments = "".join(c.function.arguments for c in rest)
    assert arguments == whole.message.tool_calls[0].function.arguments  # greedy: the same call, piece by piece
    check_weather_call(whole.message.tool_calls[0])


def test_round_trip_call_then_tool_result_then_answer(tool_client, tool_build):
    from transformers import AutoTokenizer

    first = tool_client.chat.completions.create(
        model="x", messages=USER, tools=TOOLS, tool_choice=NAMED, temperature=0.0, max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *USER,
        first.choices[0].message.model_dump(exclude_none=True),  # the assistant message as the client got it
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    answer = tool_client.chat.completions.create(
        model="x", messages=messages, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=8
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    # The next turn was rendered through the template with the call (arguments as an object) and the result.
    tok = AutoTokenizer.from_pretrained(str(tool_build))
    rendered = tok.apply_chat_template(
        [
            *USER,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": "get_weather", "arguments": json.loads(call.function.arguments)}}
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert f"<tool_response>{call.id}: Sunny, 21 C</tool_response>" in rendered
    assert answer.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)


def test_tools_reach_the_template(tool_client):
    plain = tool_client.chat.completions.create(model="x", messages=USER, max_tokens=1)
    with_tools = tool_client.chat.completions.create(
        model="x", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"tools": [WEATHER] * 2}, "tools", "same name"),
        ({"tools": [WEATHER] * 129, "tool_choice": "none"}, "tools", "129"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "pattern"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
             "tool_choice": "required"},
            "tools",
            "schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 300_000}}]},
            "tools",
            "characters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools",
            "object",
        ),
        ({"messages": [{"role": "tool", "content": "21 C"}]}, "messages", "tool_call_id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]},
            "messages",
            "JSON object",
        ),
        (
            {"messages": [{"role": "user", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
            "messages",
            "assistant",
        ),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_400_naming_the_field(tool_server, fields, param, needle):
    body = {"messages": USER, "max_tokens": 1, **fields}
    r = httpx.post(f"{tool_server.api}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == 400, error
    assert needle is None or needle in error["message"], error


def test_invalid_tools_are_the_only_error_named(tool_server):
    """tools that fail validation make a 400 about tools alone: the tool_choice beside them is not also refused as
    if no tools were given."""
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": ["object", "null"]}}}]
    body = {"messages": USER, "max_tokens": 1, "tools": bad, "tool_choice": "auto"}
    r = httpx.post(f"{tool_server.api}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools" and "tool_choice" not in error["message"], error


def test_auto_without_a_known_format_is_400_naming_tool_choice(server):
    # The shared test server's template shows no tool-call format and no --tool-call-parser was given.
    body = {"messages": USER, "tools": TOOLS, "max_tokens": 1}
    r = httpx.post(f"{server.api}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser" in r.json()["error"]["message"]
    assert "no format for tool_choice 'auto'" in server.log()
    ok = httpx.post(f"{server.api}/chat/completions", json={**body, "tool_choice": "none"}, timeout=60)
    assert ok.status_code == 200 and "tool_calls" not in ok.json()["choices"][0]["message"]


def test_llm_chat_passes_tools_to_the_template(tool_build):
    from pllm import LLM

    llm = LLM(str(tool_build), backend="cpu", kv_cache_memory=4 << 20)
    with_tools = llm.apply_chat_template(USER, tools=TOOLS)
    assert llm.tokenizer.decode(with_tools).startswith("<|im_start|>system\n<tools>" + json.dumps(WEATHER))
    assert len(llm.apply_chat_template(USER)) < len(with_tools)
    out = llm.chat(USER, tools=TOOLS)[0]
    assert out.prompt_token_ids == with_tools


# tool_choice "auto" end to end: a tiny random model cannot choose to call a tool, so a regex (structured output,
# which leaves tool parsing alone) makes it write text in the hermes format, content first; the server reads it.
HERMES_OUTPUT = (
    r'Checking[.]\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", "days": [1-7]\}\}\n'
    r'</tool_call>\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}\n</tool_call>'
)


def test_auto_reads_the_models_own_hermes_calls_streamed_and_not(tool_client):
    from openai.lib.streaming.chat import ChatCompletionStreamState

    kwargs = dict(
        model="x", messages=USER, tools=TOOLS, temperature=0.0, max_tokens=300,
        extra_body={"structured_outputs": {"regex": HERMES_OUTPUT}},
    )  # fmt: skip
    whole = tool_client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Checking."
    assert [c.function.name for c in whole.message.tool_calls] == ["get_weather", "get_time"]
    check_weather_call(whole.message.tool_calls[0])
    assert json.loads(whole.message.tool_calls[1].function.arguments)["tz"] in ("UTC", "CET")

    chunks = list(tool_client.chat.completions.create(**kwargs, stream=True))
    assert not any("<" in (c.choices[0].delta.content or "") for c in chunks if c.choices)  # no markup leaks
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and streamed.message.content == "Checking."
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_forced_tool_choice_and_structured_output_together_is_400(tool_server):
    body = {"messages": USER, "tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}
    r = httpx.post(f"{tool_server.api}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


def test_tokenize_renders_tools_as_chat_does(tool_client, tool_server):
    chat = tool_client.chat.completions.create(model="x", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=1)
    r = httpx.post(f"{tool_server.url}/tokenize", json={"messages": USER, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] == chat.usage.prompt_tokens
    bad = httpx.post(f"{tool_server.url}/tokenize", json={"messages": USER, "tools": [WEATHER] * 2}, timeout=60)
    assert bad.status_code == 400 and "same name" in bad.json()["error"]["message"]
