"""OpenAI API edges a hostile client probes, against what vLLM and OpenAI accept and return: every refusal is a 400
whose `param` names the field at fault (a cross-field rule too), and the openai client's calls all work."""

from __future__ import annotations

import json

import httpx
import pytest

COMPLETION = {"prompt": "hi", "max_tokens": 1}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.api + path, json=body, timeout=60)


def assert_400(r: httpx.Response, param: str, needle: str) -> None:
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400, err
    assert err["param"] == param, err
    assert needle in err["message"], err


# (path, fields over the base body, the param the error must name, a needle of its message)
CROSS_FIELD = [
    ("/completions", {"n": 2, "best_of": 3}, "best_of", "best_of"),
    ("/completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs"),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "continue_final_message": True},
        "continue_final_message", "add_generation_prompt",
    ),
    ("/chat/completions", {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "tools"),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        "messages", "'image_url'",
    ),
    # a text part without its text: the message says so, not that 'text' parts are unsupported
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", "text is"),
    ("/completions", {"prompt": ["a"] * 65}, "prompt", "64"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "fields", "param", "needle"), CROSS_FIELD)
def test_cross_field_errors_name_the_field(server, path, fields, param, needle):
    base = COMPLETION if path == "/completions" else CHAT
    r = post(server, path, {**base, **fields})
    assert_400(r, param, needle)
    if needle == "text is":
        assert "not supported" not in r.json()["error"]["message"]


# Errors found after validation (the prompt's tokens, the embedding's size) name the field too.
SERVING = [
    ("/completions", {**COMPLETION, "prompt": ""}, "prompt", "empty"),
    ("/completions", {**COMPLETION, "prompt": [[1, 2], []]}, "prompt", "empty"),
    ("/completions", {**COMPLETION, "prompt": [5, 99999]}, "prompt", "99999"),
    ("/completions", {**COMPLETION, "prompt": "ab" * 4000}, "prompt", "context length"),
    ("/embeddings", {"input": [[]]}, "input", "empty"),
    ("/embeddings", {"input": [99999]}, "input", "99999"),
    ("/embeddings", {"input": "hi", "dimensions": 4}, "dimensions", "dimensions=4"),
    ("/embeddings", {"input": "hi", "dimensions": True}, "dimensions", "boolean"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "ab " * 200}]}, "messages", "context"),
]


@pytest.mark.parametrize(("path", "body", "param", "needle"), SERVING)
def test_prompt_errors_name_the_field(server, path, body, param, needle):
    assert_400(post(server, path, body), param, needle)


# JSON true is not a number: OpenAI refuses it; a lax int would run seed true as seed 1 and logprobs true as 1.
BOOL_AS_NUMBER = [
    ("/completions", "seed"), ("/completions", "logprobs"), ("/completions", "n"), ("/completions", "max_tokens"),
    ("/completions", "temperature"), ("/completions", "top_k"), ("/chat/completions", "max_completion_tokens"),
    ("/chat/completions", "top_p"), ("/chat/completions", "min_tokens"), ("/chat/completions", "presence_penalty"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "field"), BOOL_AS_NUMBER)
def test_bool_is_not_a_number(server, path, field):
    base = COMPLETION if path == "/completions" else CHAT
    assert_400(post(server, path, {**base, field: True}), field, "")


def test_logit_bias_value_bool_is_400(server):
    assert_400(post(server, "/completions", {**COMPLETION, "logit_bias": {"5": True}}), "logit_bias", "")


def test_echo_without_generation_counts_no_completion_tokens(server):
    # echo with max_tokens 0 returns the prompt only: usage counts what was sent, as OpenAI does, streamed or not
    body = {"prompt": "hello there", "max_tokens": 0, "echo": True, "logprobs": 1}
    whole = post(server, "/completions", body).json()
    assert whole["choices"][0]["text"] == "hello there"
    prompt_tokens = whole["usage"]["prompt_tokens"]
    assert whole["usage"] == {**whole["usage"], "completion_tokens": 0, "total_tokens": prompt_tokens}
    with httpx.stream("POST", server.api + "/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    usage = json.loads(events[-2])["usage"]
    assert (usage["completion_tokens"], usage["total_tokens"]) == (0, prompt_tokens)


def test_models_retrieve(server, client):
    import openai

    for name in ("tiny", "alias"):
        card = client.models.retrieve(name)
        assert (card.id, card.object, card.owned_by) == (name, "model", "pllm")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["param"] == "model" and "nope" in info.value.body["message"]


def test_client_sees_cross_field_param(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, n=2, best_of=3)
    assert info.value.body["param"] == "best_of"


NOT_JSON_TYPES = [{"content-type": "text/plain"}, {}, {"content-type": "application/x-www-form-urlencoded"}]


@pytest.mark.parametrize("headers", NOT_JSON_TYPES)
def test_body_not_sent_as_json_says_so(server, headers):
    # curl -d sends a form's content type: the error says what to send, not that a dictionary was expected
    body = b'{"prompt": "hi", "max_tokens": 1}'
    r = httpx.post(server.api + "/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "Content-Type: application/json" in err["message"] and err["code"] == 400, err
