"""The OpenAI surface through the official client: completions, chat, streaming, embeddings, models, metrics."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import time

import httpx
import numpy as np
import pytest

CHAT = [{"role": "user", "content": "Hello, world!"}]


def test_completion_basic(client):
    r = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.index == 0 and isinstance(choice.text, str)
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_prompt_forms_and_echo(client):
    ids = [5, 6, 7, 8]
    r = client.completions.create(model="alias", prompt=["Hello", "Bonjour"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4
    r = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 6
    r = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=4, temperature=0)
    assert r.choices[0].text == "Hello, world!" + plain.choices[0].text


def test_max_tokens_absent_fills_the_context(client):
    r = client.completions.create(model="tiny", prompt=[5, 6, 7], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 256 - 3 and r.choices[0].finish_reason == "length"


def test_chat_basic(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.usage.completion_tokens == 6
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world!"}]}]
    r2 = client.chat.completions.create(model="tiny", messages=parts, max_tokens=6, temperature=0)
    assert isinstance(r2.choices[0].message.content, str) and r2.usage.completion_tokens == 6  # joined: /tokenize


def test_chat_stream_chunk_order(server):
    body = {
        "model": "tiny", "messages": CHAT, "max_tokens": 5, "n": 2, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    events = sse_events(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in ch["delta"] for ch in mine[1:])
        finished = [ch for ch in mine if ch["finish_reason"]]
        assert len(finished) == 1 and finished[0] is mine[-1] and finished[0]["finish_reason"] == "length"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    assert all("usage" not in c or c["usage"] is None for c in chunks[:-1])


def test_stream_text_equals_non_stream(client):
    kwargs = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=7, temperature=0)
    parts = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=7, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in parts)
    assert text == chat.choices[0].message.content


def test_stream_without_usage_ends_with_done(server):
    events = sse_events(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] for e in events[:-1])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_ride_on_every_chunk(server, path):
    body = {"max_tokens": 6, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    body |= {"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT}
    events = sse_events(server, path, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # every token-carrying chunk has the usage so far (chat's opening role chunk carries no tokens)
    content = [c for c in chunks if c["choices"] and "role" not in c["choices"][0].get("delta", {})]
    counts = [c["usage"]["completion_tokens"] for c in content]
    assert content and counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    if path == "/v1/chat/completions":  # the role chunk too: the prompt's tokens, none completed (vLLM's)
        prompt = chunks[-1]["usage"]["prompt_tokens"]
        opening = chunks[0]["usage"]
        assert (opening["prompt_tokens"], opening["completion_tokens"], opening["total_tokens"]) == (prompt, 0, prompt)


def test_n_and_seed(client):
    kwargs = dict(model="tiny", prompt="Hello", max_tokens=10, temperature=1.0, seed=1234)
    a = client.completions.create(n=3, **kwargs)
    b = client.completions.create(n=3, **kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # distinct samples per sequence


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(3 <= len(t) <= 4 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.bytes is not None for t in content)


def test_stop_strings_and_token_ids(client):
    text = client.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    i = next((i for i in range(2, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalnum()), None)
    if i is not None:
        stop = text[i : i + 2]
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0, stop=[stop, "zzzz"])
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]
        assert r.choices[0].model_extra["stop_reason"] == stop
        r = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=30, temperature=0, stop=stop,
            extra_body={"include_stop_str_in_output": True},
        )  # fmt: skip
        assert r.choices[0].text == text[: text.index(stop) + 2]
    # logit_bias forces token 42 first; stop_token_ids then ends the sequence on it
    r = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=30, temperature=0, logit_bias={"42": 100},
        extra_body={"stop_token_ids": [42]},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].model_extra["stop_reason"] == 42


def test_identical_concurrent_greedy(client):
    def one(_):
        r = client.completions.create(model="tiny", prompt="Paged attention keeps", max_tokens=24, temperature=0)
        return r.choices[0].text

    with cf.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(set(texts)) == 1


def test_embeddings_float_and_base64(client):
    r = client.embeddings.create(model="tiny", input=["Hello, world!", "Bonjour"], encoding_format="float")
    assert [d.index for d in r.data] == [0, 1] and r.object == "list"
    vec = np.array(r.data[0].embedding)
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    assert r.usage.prompt_tokens > 0
    b = client.embeddings.create(model="tiny", input="Hello, world!", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b.data[0].embedding), dtype="<f4")
    assert np.allclose(decoded, vec, atol=1e-6)
    default = client.embeddings.create(model="tiny", input="Hello, world!")  # the client asks for base64 and decodes
    assert np.allclose(np.array(default.data[0].embedding), vec, atol=1e-6)
    ids = client.embeddings.create(model="tiny", input=[[5, 6, 7]], encoding_format="float")
    assert len(ids.data[0].embedding) == 64


def test_models_health_version_request_id(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "alias"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    r = httpx.post(
        f"{server.api}/completions", json={"prompt": "Hi", "max_tokens": 1}, headers={"X-Request-Id": "abc-1"}
    )
    assert r.headers["x-request-id"] == "abc-1"
    r = httpx.post(f"{server.api}/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert len(r.headers["x-request-id"]) == 32
    assert httpx.get(f"{server.url}/nope").headers["x-request-id"]


def test_metrics_and_stats_log(server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
        "generation_tokens_total", "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
        "request_success_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
    ):  # fmt: skip
        assert f"pllm:{name}" in text, name
    assert 'finished_reason="length"' in text
    assert server.metric("generation_tokens_total") >= 4
    deadline = time.monotonic() + 5
    while "Avg prompt throughput" not in server.log():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    line = next(x for x in server.log().splitlines() if "Avg prompt throughput" in x)
    for part in ("Avg generation throughput", "Running:", "Waiting:", "KV cache usage", "Prefix cache hit rate"):
        assert part in line


def sse_events(server, path: str, body: dict) -> list[str]:
    events = []
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            else:
                assert line == "", line
    return events


@pytest.fixture(autouse=True)
def _no_leaks(server):
    yield
    server.wait_metric("num_requests_running", 0)
