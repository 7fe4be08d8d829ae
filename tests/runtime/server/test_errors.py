"""Every error path answers in OpenAI's shape with the right status: 400, 401, 404, 413, 503 (+ Retry-After)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest


def post(server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(server.api + path, json=body, timeout=30, **kwargs)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(server.api + path, content=body, timeout=30, headers=headers, **kwargs)


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    for needle in needles:
        assert needle in err["message"], err["message"]
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text
    return err


@pytest.mark.parametrize(
    ("path", "body", "needles"),
    [
        ("/completions", {"prompt": ""}, ["empty"]),
        ("/completions", {"prompt": []}, ["empty"]),
        ("/completions", {"prompt": ["ok", ""]}, ["empty"]),
        ("/completions", {"prompt": [999999]}, ["999999", "vocabulary"]),
        ("/completions", {"prompt": [[1, 2], [-1]]}, ["prompt"]),
        # token ids are JSON integers: true, 1.0 and "101" are not coerced into ids 1, 1 and 101
        ("/completions", {"prompt": [True, True]}, ["prompt", "valid integer"]),
        ("/completions", {"prompt": [1.0, 1.0]}, ["prompt", "valid integer"]),
        ("/completions", {"prompt": [[1, 2], ["101"]]}, ["prompt", "valid integer"]),
        ("/completions", {"prompt": "hi", "stop_token_ids": [True]}, ["stop_token_ids", "valid integer"]),
        ("/completions", {"prompt": "hello " * 300}, ["256", "input tokens"]),
        ("/completions", {"prompt": "x" * 200_000}, ["256", "200000"]),
        ("/completions", {}, ["prompt", "Field required"]),
        ("/completions", {"prompt": "hi", "temperature": "hot"}, ["temperature"]),
        ("/completions", {"prompt": "hi", "temperature": 3}, ["temperature"]),
        ("/completions", {"prompt": "hi", "top_p": 0}, ["top_p"]),
        ("/completions", {"prompt": "hi", "n": 100000}, ["n"]),
        ("/completions", {"prompt": "hi", "logprobs": 21}, ["logprobs"]),
        ("/completions", {"prompt": "hi", "max_tokens": 0}, ["max_tokens"]),
        ("/completions", {"prompt": "hi", "max_tokens": 10**12}, ["max_tokens"]),
        ("/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, ["min_tokens"]),
        ("/completions", {"prompt": "hi", "stop": ["s"] * 17}, ["stop"]),
        ("/completions", {"prompt": "hi", "stop": "x" * 300}, ["stop"]),
        ("/completions", {"prompt": "hi", "stop": [""]}, ["stop"]),
        ("/completions", {"prompt": "hi", "stop_token_ids": [400]}, ["stop_token_ids", "400"]),
        ("/completions", {"prompt": "hi", "logit_bias": {"5000": 1}}, ["logit_bias"]),
        ("/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}}, ["logit_bias"]),
        ("/completions", {"prompt": "hi", "logit_bias": {"1": 500}}, ["logit_bias"]),
        ("/completions", {"prompt": "hi", "seed": 2**70}, ["seed"]),
        ("/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, ["stream_options"]),
        ("/completions", {"prompt": "hi", "best_of": 3}, ["best_of"]),
        ("/completions", {"prompt": ["a"] * 65}, ["64"]),
        ("/completions", b"{not json", ["JSON"]),
        ("/completions", [1, 2], ["dictionary"]),
        ("/chat/completions", {"messages": []}, ["messages"]),
        ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, ["image_url"]),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, ["logprobs"]),
        ("/chat/completions", {"messages": [{"content": "hi"}]}, ["role"]),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]}, ["tool"]),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": True}},
            ["reserved"],
        ),
        ("/embeddings", {"input": ""}, ["empty"]),
        ("/embeddings", {"input": [[999999]]}, ["vocabulary"]),
        ("/embeddings", {"input": [[True, False]]}, ["input", "valid integer"]),
        ("/embeddings", {"input": [["101"]]}, ["input", "valid integer"]),
        ("/embeddings", {"input": [1.0]}, ["input", "valid integer"]),
        ("/embeddings", {"input": "hi", "encoding_format": "int8"}, ["encoding_format"]),
        ("/embeddings", {"input": "hi", "dimensions": 3}, ["dimensions"]),
        ("/embeddings", {"input": [5] * 300}, ["256"]),
    ],
)
def test_400(server, path, body, needles):
    assert_error(post(server, path, body), 400, *needles)


def test_422_is_400_with_param(server):
    err = assert_error(post(server, "/completions", {"prompt": "hi", "n": "many"}), 400, "validation error")
    assert err["param"] == "n" and err["type"] == "BadRequestError"


def test_form_body_is_400(server):
    r = httpx.post(server.api + "/completions", data={"prompt": "hi"})
    assert_error(r, 400)


def test_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="", max_tokens=3)
    assert e.value.status_code == 400


def test_unknown_model_404(server, client):
    err = assert_error(post(server, "/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "gpt-9")
    assert err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert_error(httpx.get(server.url + "/no/such/route"), 404)


def test_body_too_large_413(server):
    assert_error(post(server, "/completions", b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'), 413, "limit")

    def chunked():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * 2**20
        yield b'"}'

    r = httpx.post(server.api + "/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, "limit")


@pytest.fixture(scope="module")
def guarded(launch_long):
    """A key, one running sequence and a one-sequence waiting queue; long requests, so the queue can be filled."""
    return launch_long(
        "--api-key", "sekret", "--served-model-name", "m", "--max-num-seqs", "1", "--max-queued-requests", "1",
        "--max-model-len", "4096", "--kv-cache-memory", "4M",
    )  # fmt: skip


def test_401_missing_or_wrong_key(guarded):
    body = {"prompt": "hi", "max_tokens": 2}
    assert_error(post(guarded, "/completions", body), 401)
    assert_error(post(guarded, "/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(post(guarded, "/completions", body, headers={"Authorization": "sekret"}), 401)
    assert post(guarded, "/completions", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert_error(httpx.get(guarded.api + "/models"), 401)
    # documented as open: liveness, version, metrics
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(guarded.url + path).status_code == 200
    # the tokenizer endpoints live outside /v1, open as in vLLM
    assert httpx.post(guarded.url + "/tokenize", json={"prompt": "hi"}).json()["count"] > 0
    assert httpx.post(guarded.url + "/detokenize", json={"tokens": [5, 6]}).status_code == 200
    client = openai.OpenAI(base_url=guarded.api, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_503_when_queue_full(guarded):
    client = openai.OpenAI(base_url=guarded.api, api_key="sekret", max_retries=0, timeout=60)
    # 2000 steps (over a second): the first still runs while the second queues behind it
    long = dict(model="m", prompt="Hello", max_tokens=2000, temperature=0, extra_body={"ignore_eos": True})
    results: list = []

    def run():
        results.append(client.completions.create(**long))

    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    guarded.wait_metric("num_requests_running", 1)
    threads[1].start()
    guarded.wait_metric("num_requests_waiting", 1)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="m", prompt="Hello", max_tokens=2)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
    assert "queue is full" in e.value.response.json()["error"]["message"]
    for t in threads:
        t.join(60)
    assert len(results) == 2 and all(r.usage.completion_tokens == 2000 for r in results)
    assert client.completions.create(model="m", prompt="Hello", max_tokens=2).usage.completion_tokens == 2
    assert 'reason="queue_full"' in httpx.get(guarded.url + "/metrics").text
