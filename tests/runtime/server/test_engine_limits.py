"""The server keeps its limits honest: max_model_len fits the KV cache, the queue bound counts only waiting
requests, and embeddings are scheduled like completions (budget, disconnect, queue bound)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

# 4 MiB of fp32 KV for the tiny model (8 KiB per 16-token block, one block kept for padding): 8176 tokens
KV_4M = ("--kv-cache-memory", "4M")


def _completion(server, max_tokens: int = 2, timeout: float = 60) -> httpx.Response:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(server.api + "/completions", json=body, timeout=timeout)


def _embedding(server, num_inputs: int, num_tokens: int, timeout: float = 120) -> httpx.Response:
    inputs = [[(7 * i + j) % 50 + 3 for j in range(num_tokens)] for i in range(num_inputs)]
    return httpx.post(server.api + "/embeddings", json={"model": "tiny", "input": inputs}, timeout=timeout)


def test_max_model_len_is_what_the_kv_cache_holds(launch_long, tiny_build, tmp_path):
    server = launch_long("--served-model-name", "tiny", "--kv-cache-memory", "1M")
    (card,) = httpx.get(server.api + "/models").json()["data"]
    assert card["max_model_len"] == 2032  # 127 blocks of 16 tokens, not the model's 8192
    assert "max_model_len lowered from the model's 8192 to 2032" in server.log()
    # a request without max_tokens is served up to that limit, not refused
    body = {"model": "tiny", "prompt": "Hello", "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.api + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 2032
    # an explicit limit the cache cannot hold refuses to start, with one line saying why
    exe = shutil.which("pllm-serve", path=str(Path(sys.executable).parent))
    build = tiny_build("llama", max_position_embeddings=8192)
    cmd = [exe, str(build), "--backend", "cpu", "--kv-cache-memory", "1M", "--max-model-len", "8192"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("pllm-serve: error: engine setting max_model_len=8192: larger than")
    assert "KV cache (2032)" in error


def test_burst_on_an_idle_server_is_not_refused(launch):
    server = launch("--served-model-name", "tiny", "--max-num-seqs", "16", "--max-queued-requests", "4", *KV_4M)
    statuses: list[int] = []

    def run():
        statuses.append(_completion(server, max_tokens=8).status_code)

    threads = [threading.Thread(target=run) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200] * 10  # ten fit the running batch at once: none of them waits


def test_abandoned_embedding_stops_delaying_completions(launch_long):
    server = launch_long("--served-model-name", "tiny", "--max-model-len", "2048", *KV_4M)
    start = time.monotonic()
    assert _completion(server).status_code == 200
    alone = time.monotonic() - start
    try:
        # 512k tokens: seconds of work the client abandons (it gives up and disconnects after 0.3 s)
        _embedding(server, num_inputs=256, num_tokens=2000, timeout=0.3)
    except httpx.TimeoutException:
        pass
    start = time.monotonic()
    assert _completion(server).status_code == 200
    behind = time.monotonic() - start
    assert behind < alone + 2.0, f"a 2-token completion took {behind:.2f} s behind an abandoned embedding"
    server.wait_metric("kv_cache_usage_perc", 0.0)  # the embedding's blocks are back
    server.wait_metric("num_requests_running", 0.0)
    r = _embedding(server, num_inputs=2, num_tokens=300)
    assert r.status_code == 200 and [d["index"] for d in r.json()["data"]] == [0, 1]
    assert r.json()["usage"]["prompt_tokens"] == 600
    server.wait_metric("kv_cache_usage_perc", 0.0)


def test_queue_bound_counts_embedding_inputs(launch_long):
    server = launch_long(
        "--served-model-name", "tiny", "--max-num-seqs", "1", "--max-queued-requests", "1",
        "--max-num-batched-tokens", "256", *KV_4M,
    )  # fmt: skip
    results: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: results.append(_embedding(server, num_inputs=8, num_tokens=2000)))
    thread.start()
    deadline = time.monotonic() + 30
    while server.metric("num_requests_waiting") < 2:  # one input runs, the others wait their turn
        assert time.monotonic() < deadline, "the embedding inputs never queued in the scheduler"
        time.sleep(0.02)
    r = _completion(server)
    assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
    thread.join(120)
    assert results[0].status_code == 200 and len(results[0].json()["data"]) == 8
    assert _completion(server).status_code == 200
