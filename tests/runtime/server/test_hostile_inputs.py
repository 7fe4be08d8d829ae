"""A hostile client against every endpoint: each bad input is a 400 (or 405/413) in OpenAI's shape naming the field,
nothing leaks a traceback, and afterwards the server still serves. A new field is one row in a table here."""

from __future__ import annotations

import copy
import json

import httpx
import pytest

BAD = "\ud800"  # a lone surrogate: json.dumps writes it as the escape "\ud800", as a hostile client would
COMPLETION = {"prompt": "hi", "max_tokens": 1}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
ENDPOINTS = {
    "completions": ("/completions", COMPLETION),
    "chat": ("/chat/completions", CHAT),
    "chat-stream": ("/chat/completions", {**CHAT, "stream": True}),
    "embeddings": ("/embeddings", {"input": "hi"}),
}
GENERATE = ("completions", "chat", "chat-stream")


def send(server, endpoint: str, fields: dict | None = None, raw: bytes | None = None) -> httpx.Response:
    path, base = ENDPOINTS[endpoint]
    body = raw if raw is not None else json.dumps({**copy.deepcopy(base), **(fields or {})}).encode()
    return httpx.post(server.api + path, content=body, headers={"content-type": "application/json"}, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None, needle: str = "") -> None:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert err["param"] == param, err
    assert needle in err["message"], err
    assert "Traceback" not in r.text and 'File "' not in r.text and ".py" not in r.text and "/work" not in r.text


# (endpoint, fields that put a lone surrogate somewhere, the param that must name it)
SURROGATES = [
    *[(e, {"model": BAD}, "model") for e in ENDPOINTS],
    *[(e, {"user": BAD}, "user") for e in ENDPOINTS],
    *[(e, {"stop": BAD}, "stop") for e in GENERATE],
    *[(e, {"stop": ["ok", BAD]}, "stop.1") for e in GENERATE],
    *[(e, {"some_unknown_field": BAD}, "some_unknown_field") for e in ENDPOINTS],
    *[(e, {"logit_bias": {BAD: 1}}, "logit_bias") for e in GENERATE],  # a key
    ("completions", {"prompt": BAD}, "prompt"),
    ("completions", {"prompt": ["ok", "a" + BAD]}, "prompt.1"),
    ("completions", {"suffix": BAD}, "suffix"),
    *[
        (e, fields, param)
        for e in ("chat", "chat-stream")
        for fields, param in [
            ({"messages": [{"role": "user", "content": BAD}]}, "messages.0.content"),
            ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": BAD}]}, "messages.1.content"),
            ({"messages": [{"role": BAD, "content": "hi"}]}, "messages.0.role"),
            ({"messages": [{"role": "user", "content": "hi", "name": BAD}]}, "messages.0.name"),
            ({"messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]}, "messages.0.content.0.text"),
            ({"messages": [{"role": "user", "content": [{"type": BAD, "text": "hi"}]}]}, "messages.0.content.0.type"),
            (
                {"tools": [{"type": "function", "function": {"name": BAD}}], "tool_choice": "none"},
                "tools.0.function.name",
            ),
            ({"tool_choice": BAD}, "tool_choice"),
            ({"response_format": {"type": BAD}}, "response_format.type"),
            ({"chat_template_kwargs": {"x": BAD}}, "chat_template_kwargs.x"),
            ({"chat_template_kwargs": {BAD: 1}}, "chat_template_kwargs"),
        ]
    ],
    ("embeddings", {"input": BAD}, "input"),
    ("embeddings", {"input": ["ok", BAD]}, "input.1"),
    ("embeddings", {"encoding_format": BAD}, "encoding_format"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), SURROGATES)
def test_lone_surrogate_is_400_naming_the_field(server, endpoint, fields, param):
    assert_error(send(server, endpoint, fields), 400, param, "UTF-8")


@pytest.mark.parametrize(
    ("endpoint", "raw", "param"),
    [
        ("completions", b'{"prompt": "a\xffb", "max_tokens": 1}', "prompt"),
        ("completions", b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}', "prompt"),  # a surrogate encoded in UTF-8
        ("chat", b'{"messages": [{"role": "user", "content": "\xc3"}]}', "messages.0.content"),
        ("chat-stream", b'{"messages": [{"role": "user", "content": "\x80"}], "stream": true}', "messages.0.content"),
        ("embeddings", b'{"input": ["ok", "\xfe"]}', "input.1"),
    ],
)
def test_invalid_utf8_bytes_are_400_naming_the_field(server, endpoint, raw, param):
    assert_error(send(server, endpoint, raw=raw), 400, param, "UTF-8")


NUMBERS = {
    "completions": ["temperature", "top_p", "presence_penalty", "max_tokens", "n", "seed", "logprobs", "extra"],
    "chat": ["temperature", "frequency_penalty", "repetition_penalty", "top_logprobs", "max_completion_tokens"],
    "chat-stream": ["top_p", "min_p"],
    "embeddings": ["dimensions", "extra"],
}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize(("endpoint", "field"), [(e, f) for e, fields in NUMBERS.items() for f in fields])
def test_non_finite_number_is_400_naming_the_field(server, endpoint, field, literal):
    body = json.dumps({**ENDPOINTS[endpoint][1], field: 0}).replace(f'"{field}": 0', f'"{field}": {literal}')
    assert_error(send(server, endpoint, raw=body.encode()), 400, field, "finite")


@pytest.mark.parametrize(
    ("endpoint", "raw", "param"),
    [
        *[(e, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None) for e in ENDPOINTS],
        *[(e, b"[" * 100_000, None) for e in ENDPOINTS],
        ("completions", b'{"prompt": "hi", "logit_bias": ' + b'{"a": ' * 200 + b"1" + b"}" * 201, "logit_bias"),
        (
            "chat",
            b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": ' + b"[" * 80 + b"]" * 80 + b"}",
            "tool_choice",
        ),
        ("completions", b"", None),
        ("completions", b"{not json", None),
        ("chat", b'{"messages": [}', None),
        ("embeddings", b'{"input": 1' + b"0" * 5000 + b"}", None),  # past Python's int digit limit
    ],
)
def test_unparseable_or_deep_body_is_400(server, endpoint, raw, param):
    r = send(server, endpoint, raw=raw)
    if raw == b"":  # no body at all: the required field is missing
        assert_error(r, 400, None, "Field required")
    else:
        assert_error(r, 400, param)


# Wrong JSON types: scalars get an object, containers get a number; the param is the top-level field.
WRONG_TYPES = {
    "completions": ["prompt", "model", "temperature", "top_p", "top_k", "min_p", "n", "max_tokens", "min_tokens",
                    "stop", "stop_token_ids", "seed", "logprobs", "echo", "stream", "user", "ignore_eos",
                    "repetition_penalty", "presence_penalty", "frequency_penalty", "best_of", "suffix"],
    "chat": ["messages", "logprobs", "top_logprobs", "max_completion_tokens", "add_generation_prompt", "tools",
             "continue_final_message", "n", "stop", "user", "model"],
    "chat-stream": ["stream", "stream_options", "temperature"],
    "embeddings": ["input", "model", "encoding_format", "dimensions", "user"],
}  # fmt: skip
CONTAINERS = {"messages", "stop_token_ids", "tools", "stream_options", "logit_bias", "chat_template_kwargs"}


@pytest.mark.parametrize(("endpoint", "field"), [(e, f) for e, fields in WRONG_TYPES.items() for f in fields])
def test_wrong_type_is_400_naming_the_field(server, endpoint, field):
    assert_error(send(server, endpoint, {field: 5 if field in CONTAINERS else {"x": [1]}}), 400, field)


@pytest.mark.parametrize("endpoint", ["completions", "chat", "embeddings"])
@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"null", b"1", b"true"])
def test_body_that_is_not_an_object_is_400(server, endpoint, raw):
    r = send(server, endpoint, raw=raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == 400, r.text


# Every bounded field at its bound (accepted) and one past (400): (endpoint, fields, param or None when accepted)
BOUNDS = [
    ("completions", {"n": 128}, None), ("completions", {"n": 129}, "n"), ("completions", {"n": 0}, "n"),
    ("completions", {"logprobs": 20}, None), ("completions", {"logprobs": 21}, "logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 20}, None),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    # max_model_len 256: an output limit the context holds after the prompt, and one past it (vLLM's 400)
    ("completions", {"max_tokens": 6, "prompt": [5] * 250}, None),
    ("completions", {"max_tokens": 7, "prompt": [5] * 250}, "max_tokens"),
    ("chat", {"max_completion_tokens": 2**20}, "max_completion_tokens"), ("chat", {"max_tokens": 256}, "max_tokens"),
    ("completions", {"max_tokens": 2**20 + 1}, "max_tokens"),
    ("chat", {"max_completion_tokens": 2**20 + 1}, "max_completion_tokens"),
    ("completions", {"stop": ["s"] * 16}, None), ("completions", {"stop": ["s"] * 17}, "stop"),
    ("chat", {"stop": "x" * 256}, None), ("chat", {"stop": "x" * 257}, "stop"),
    ("completions", {"logit_bias": {str(i): 1 for i in range(400)}}, None),  # the whole tiny vocabulary
    ("completions", {"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ("completions", {"logit_bias": {"1": 100, "2": -100}}, None),
    ("completions", {"logit_bias": {"1": 100.01}}, "logit_bias"),
    ("completions", {"logit_bias": {"1": -100.01}}, "logit_bias"),
    ("completions", {"temperature": 2}, None), ("completions", {"temperature": 2.01}, "temperature"),
    ("completions", {"temperature": -0.01}, "temperature"),
    ("chat", {"top_p": 1}, None), ("chat", {"top_p": 1.01}, "top_p"), ("chat", {"top_p": 0}, "top_p"),
    ("completions", {"presence_penalty": -2, "frequency_penalty": 2}, None),
    ("completions", {"presence_penalty": -2.01}, "presence_penalty"),
    ("chat", {"frequency_penalty": 2.01}, "frequency_penalty"),
    ("chat", {"repetition_penalty": 100}, None), ("chat", {"repetition_penalty": 100.1}, "repetition_penalty"),
    ("completions", {"seed": 2**63 - 1}, None), ("completions", {"seed": 2**63}, "seed"),
    ("completions", {"prompt": [5] * 255}, None),  # max_model_len 256 leaves one position for output
    ("completions", {"prompt": ["a"] * 64}, None),
    ("embeddings", {"input": ["a"] * 256}, None),
    ("chat", {"user": "u" * 256, "model": "tiny"}, None), ("chat", {"user": "u" * 257}, "user"),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "fields", "param"), BOUNDS)
def test_bound_and_one_past(server, endpoint, fields, param):
    r = send(server, endpoint, fields)
    if param is None:
        assert r.status_code == 200, r.text[:500]
    else:
        assert_error(r, 400, param)


@pytest.mark.parametrize(
    ("endpoint", "fields", "needle"),
    [  # past a bound the model validators check as a whole: the message names the field
        ("completions", {"prompt": [5] * 256}, "256"),
        ("completions", {"prompt": ["a"] * 65}, "prompt"),
        ("embeddings", {"input": ["a"] * 257}, "input"),
    ],
)
def test_one_past_a_whole_request_bound(server, endpoint, fields, needle):
    param = "input" if endpoint == "embeddings" else "prompt"
    assert_error(send(server, endpoint, fields), 400, param, needle)


@pytest.mark.parametrize("endpoint", ["completions", "chat", "embeddings"])
@pytest.mark.parametrize("chunked", [False, True])
def test_body_past_the_limit_is_413(server, endpoint, chunked):
    path = ENDPOINTS[endpoint][0]
    body = b'{"prompt": "' + b"x" * (4 * 2**20) + b'"}'
    content = (body[i : i + 2**20] for i in range(0, len(body), 2**20)) if chunked else body
    r = httpx.post(server.api + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert_error(r, 413, None, "limit")


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/version", "/metrics"])
def test_read_endpoints_ignore_junk_and_refuse_other_methods(server, path):
    junk = json.dumps({"x": BAD}).encode() + b"\xff"
    for r in (httpx.get(server.url + path + "?x=%ff%00&" + "y" * 2000, timeout=30),
              httpx.request("GET", server.url + path, content=junk, timeout=30)):  # fmt: skip
        assert r.status_code == 200, r.text[:300]
    r = httpx.request("DELETE", server.url + path, timeout=30)
    assert_error(r, 405, None)


def test_still_serving_after_the_matrix(server):
    # Runs last in this file: nothing above may have hurt the engine or logged a traceback.
    r = httpx.post(server.api + "/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()
