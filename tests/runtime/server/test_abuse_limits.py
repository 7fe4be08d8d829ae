"""Cheap requests that would cost the server a lot, or reach its log unescaped: each is bounded here."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from pllm.runtime.engine.grammar_compile import MAX_OPTIONAL_PROPERTIES
from pllm.runtime.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pllm.runtime.engine.structured_output import GrammarError
from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.request_stream import EngineError
from pllm.runtime.server.serving_tools import ToolCalling


def _object(num_properties: int, num_required: int = 0) -> dict:
    names = [f"p{i:x}" for i in range(num_properties)]
    return {"type": "object", "properties": {n: {} for n in names}, "required": names[:num_required]}


def test_a_schema_of_many_optional_properties_is_refused_before_it_compiles(grammars) -> None:
    # 2,000 optional properties in one 18 KB schema took 19 s of the one grammar thread; refused at once now
    start = time.monotonic()
    with pytest.raises(GrammarError, match=f"2000 optional object properties.*limit of {MAX_OPTIONAL_PROPERTIES}"):
        grammars.compile(StructuredOutputsParams(json=_object(2000))).result()
    # counted over the whole schema, each object as often as it is written (30 of 256 took 22 s)
    spread = {"type": "array", "prefixItems": [_object(MAX_OPTIONAL_PROPERTIES // 4 + 1)] * 4, "items": False}
    with pytest.raises(GrammarError, match="optional object properties"):
        grammars.compile(StructuredOutputsParams(json=spread)).result()
    assert time.monotonic() - start < 5


def test_required_properties_are_not_counted(grammars) -> None:
    # required ones compile in linear time: a 2,000-property object is fine when all but the limit are required
    schema = _object(2000, num_required=2000 - MAX_OPTIONAL_PROPERTIES // 8)
    grammars.compile(StructuredOutputsParams(json=schema)).result()


def test_a_forced_tool_schema_is_bounded_too(grammars) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": _object(MAX_OPTIONAL_PROPERTIES + 1)}}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice="required")
    with pytest.raises(EngineError) as info:
        asyncio.run(ToolCalling("none", None).adjust_params(req, SamplingParams(), grammars))
    assert info.value.status == 400 and info.value.param == "tools"
    assert "optional object properties" in info.value.message


def test_ignored_field_names_reach_the_log_escaped(server) -> None:
    forged = "x\nINFO 01-01 00:00:00 [pllm.server] forged line\x1b[2J"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi", forged: 1}, timeout=30)
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while "ignored request fields: x" not in (log := server.log()):
        assert time.monotonic() < deadline, "the ignored field was not logged"
        time.sleep(0.05)
    assert "\n" + "INFO 01-01 00:00:00 [pllm.server] forged line" not in log
    assert "\x1b" not in log
    assert "ignored request fields: x\\nINFO 01-01 00:00:00 [pllm.server] forged line\\x1b[2J" in log


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_chat_template_kwargs_are_bounded_and_checked_on_every_route(server, path):
    """They can stand in for the special tokens a template prints once a message, so their size is multiplied by the
    message count before the prompt's length is checked; /tokenize renders the same template and is open without the
    API key, so it checks them as chat does (reserved keys included)."""
    messages = [{"role": "user", "content": "hi"}]
    big = {"eos_token": "x" * (70 * 1024)}
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny", "messages": messages, "max_tokens": 1,
                                              "chat_template_kwargs": big}, timeout=60)
    assert r.status_code == 400 and "MAX_TEMPLATE_KWARGS_BYTES" in r.text, r.text
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny", "messages": messages, "max_tokens": 1,
                                              "chat_template_kwargs": {"tokenize": True}}, timeout=60)
    assert r.status_code == 400 and "reserved" in r.text, r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_chat_render_stops_at_what_the_context_can_hold(server, path):
    """The messages' own text fits, but the template wraps each of 1,024 in its role tags: the render passes
    what max_model_len tokens can hold and stops there (ChatPromptTooLong), rather than render it all first."""
    messages = [{"role": "user", "content": "hi"}] * 1024
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny", "messages": messages, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "The chat template rendered more than" in r.text, r.text
    r = httpx.post(f"{server.url}{path}", json={"model": "tiny", "messages": messages[:2], "max_tokens": 1,
                                              "chat_template_kwargs": {"max_chars": 1 << 40}}, timeout=60)
    assert r.status_code == 400 and "reserved" in r.text, r.text
