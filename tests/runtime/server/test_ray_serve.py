"""pllm on Ray Serve: two replicas of the tiny model on a local Ray instance (two CPUs), one engine each, behind
Serve's proxy and pllm's prefix-affinity ingress (the default); both answer, the API is pllm-serve's (errors,
streaming, /metrics), requests sharing a long prompt prefix stay on one replica and hit its prefix cache, and a
replica killed under load is replaced while only the requests it held fail. Ray is stopped at the end."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import httpx
import openai
import pytest

from .conftest import free_port

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'pllm[ray]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'pllm[ray]')")

# 8192 positions: a 3000-token request runs for seconds, long enough to kill its replica under it
OPTIONS = {"backend": "cpu", "served_model_name": ["tiny"], "max_model_len": 4096, "kv_cache_memory": "8M"}


@pytest.fixture(scope="module")
def serve_build(tiny_build):
    return tiny_build("llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def ray_url(serve_build):
    from pllm.runtime.server.ray_serve import deployment

    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "OMP_NUM_THREADS")}
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")  # the replicas inherit them
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment({"build_dir": str(serve_build), **OPTIONS}, num_replicas=2, ray_actor_options={"num_cpus": 1})
        serve.run(app, name="pllm", route_prefix="/")  # returns once both replicas are up
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert not ray.is_initialized()


def test_both_replicas_answer(ray_url):
    seen: dict[str, int] = {}
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    texts = set()
    with httpx.Client(timeout=60) as http:
        for _ in range(40):  # Serve's router picks between the two; 40 tries all landing on one: ~1e-12
            r = http.post(ray_url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            replica = r.headers["x-pllm-replica"]
            assert len(r.headers.get_list("x-request-id")) == 1  # the proxy's, not echoed twice
            seen[replica] = seen.get(replica, 0) + 1
            texts.add(r.json()["choices"][0]["text"])
            if len(seen) == 2 and min(seen.values()) >= 2:
                break
    assert len(seen) == 2, seen
    assert len(texts) == 1  # same build, same greedy tokens on either replica


def test_the_api_is_pllm_serves(ray_url):
    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=5, stream=True, temperature=0))
    assert sum(len(c.choices[0].text) > 0 for c in chunks if c.choices) >= 1
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Hello", max_tokens=2)
    assert e.value.response.json()["error"]["code"] == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=-1)
    assert e.value.response.json()["error"]["param"] == "temperature"
    assert httpx.get(ray_url + "/health", timeout=10).status_code == 200
    metrics = httpx.get(ray_url + "/metrics", timeout=10).text
    assert 'pllm:num_requests_waiting{model_name="tiny"}' in metrics
    assert 'vllm:num_requests_waiting{model_name="tiny"}' in metrics


def chat(http: httpx.Client, url: str, system: str, user: str) -> tuple[str, int]:
    """One greedy one-token chat turn: the replica that answered and the prompt tokens it found cached."""
    body = {"model": "tiny", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}  # fmt: skip
    r = http.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.headers["x-pllm-replica"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_shared_prompt_prefix_stays_on_the_replica_that_cached_it(ray_url):
    # 16 system prompts, ~1.5k characters each (~6 routing chunks), distinct from their first word
    systems = [f"Policy {i}: " + " ".join(f"rule {i}.{j} is to answer briefly." for j in range(50)) for i in range(16)]
    holder: dict[int, str] = {}
    with httpx.Client(timeout=60) as http:
        for i, system in enumerate(systems):
            replica, _ = chat(http, ray_url, system, "first question")
            holder[i] = replica
        # each prefix's later turns land where its first did, and reuse its KV blocks there
        for i in (13, 14, 15):  # the latest, whose blocks no later prompt has evicted
            for turn in range(3):
                replica, cached = chat(http, ray_url, systems[i], f"follow-up {turn} of thread {i}")
                assert replica == holder[i], (i, turn, replica, holder)
                assert cached >= 64, (i, turn, cached)  # the system prompt's blocks, not a block or two of chance
    # a new prefix goes by power of two choices, so distinct prefixes spread over both replicas
    # (all 16 on one replica by chance: 2 / 2**16)
    assert len(set(holder.values())) == 2, holder


def replica_metrics(url: str, want: set[str] | None = None, timeout_s: float = 60) -> dict[str, dict[str, float]]:
    """The unlabelled pllm: series of each replica (or of those in `want`), by replica: /metrics reaches the replica
    Serve picks, so ask until each has answered. Serve's pick prefers the shorter queue, so a replica still holding
    a request is reached only once the others are as busy or it is free again."""
    seen: dict[str, dict[str, float]] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30) as http:
        while len(seen) < 2 if want is None else not want <= set(seen):
            assert time.monotonic() < deadline, f"/metrics reached only {sorted(seen)} in {timeout_s:g} s"
            r = http.get(url + "/metrics")
            series = re.findall(r'^pllm:(\w+)\{model_name="tiny"\} (\S+)$', r.text, re.MULTILINE)
            seen[r.headers["x-pllm-replica"]] = {k: float(v) for k, v in series}
    return seen


def test_a_client_that_leaves_aborts_its_request_on_the_replica(ray_url):
    before = replica_metrics(ray_url)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "min_tokens": 3000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", ray_url + "/v1/completions", json=body, timeout=60) as r:
        replica = r.headers["x-pllm-replica"]
        for n, _ in enumerate(r.iter_lines()):
            if n == 4:
                break  # leave after a few tokens: closing the connection is the disconnect
    deadline = time.monotonic() + 60
    while (now := replica_metrics(ray_url, {replica})[replica])["num_requests_running"] > 0:
        assert time.monotonic() < deadline, "the request kept running on its replica after its client left"
        time.sleep(0.2)
    generated = now["generation_tokens_total"] - before[replica]["generation_tokens_total"]
    assert 0 < generated < 3000, generated  # aborted, not run to its 3000 tokens


def test_without_prefix_affinity_the_proxy_calls_the_replicas_directly(ray_url, serve_build):
    from pllm.runtime.server.ray_serve import deployment

    # a second application beside the first, one replica, no CPU reserved (the first holds both)
    app = deployment({"build_dir": str(serve_build), **OPTIONS}, False, ray_actor_options={"num_cpus": 0})
    serve.run(app, name="direct", route_prefix="/direct")
    try:
        assert set(serve.status().applications["direct"].deployments) == {"PllmServer"}  # no ingress in front
        r = httpx.post(ray_url + "/direct/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        assert "#PllmServer#" in r.headers["x-pllm-replica"]
    finally:
        serve.delete("direct")


def test_serve_owned_options_are_refused():
    from pllm.runtime.server.ray_serve import check_options

    with pytest.raises(ValueError, match="port: set by Ray Serve"):
        check_options({"build_dir": "/b", "port": 9000})
    with pytest.raises(ValueError, match="unknown pllm-serve option 'max_num_seq'"):
        check_options({"build_dir": "/b", "max_num_seq": 4})


def stream_once(url: str, body: dict, out: dict, key: int, started: threading.Event) -> None:
    """One streamed completion: records the replica that took it and how it ended ("length" or the error)."""
    try:
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            out[key] = {"replica": r.headers.get("x-pllm-replica"), "status": r.status_code, "end": None}
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["finish_reason"]:
                        out[key]["end"] = choices[0]["finish_reason"]
    except httpx.HTTPError as exc:
        out.setdefault(key, {"replica": None, "status": None})["end"] = repr(exc)


def test_a_killed_replica_is_replaced_and_only_its_requests_fail(ray_url):
    url = ray_url + "/v1/completions"
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "min_tokens": 3000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    out: dict[int, dict] = {}
    events = [threading.Event() for _ in range(6)]
    threads = [threading.Thread(target=stream_once, args=(url, body, out, i, events[i])) for i in range(6)]
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60), "a stream never started"
    on = {}
    for i, o in out.items():
        on.setdefault(o["replica"], []).append(i)
    assert len(on) == 2, on  # the load is on both replicas
    victim = max(on, key=lambda r: len(on[r]))
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(120)
    failed = {i for i, o in out.items() if o["end"] != "length"}
    survivors = [i for r, ids in on.items() if r != victim for i in ids]
    assert failed <= set(on[victim]), (out, on)  # nothing on the other replica failed
    assert all(out[i]["end"] == "length" for i in survivors)
    assert failed, "the killed replica's streams all finished: the kill came too late to test anything"
    # Serve starts a replacement: meanwhile and after, every new request is answered, none by the dead replica
    (survivor,) = set(on) - {victim}
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=60) as http:
        while not seen - {survivor}:
            assert time.monotonic() < deadline, f"no replacement replica answered in 120 s (seen {seen})"
            r = http.post(url, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-pllm-replica"])
            time.sleep(0.1)
    assert victim not in seen, seen
