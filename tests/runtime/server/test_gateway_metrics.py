"""/metrics carries the three load gauges an inference gateway (Gateway API Inference Extension) balances pods on,
under the names its model-server protocol lists, and they move with the engine's queue and batch."""

from __future__ import annotations

import re
import threading

import httpx

from pllm.runtime.server.metrics import GATEWAY_METRIC_PREFIX

# the protocol's metric -> the name it lists (vLLM's, the endpoint picker's default)
GATEWAY_GAUGES = {
    "TotalQueuedRequests": "num_requests_waiting",
    "TotalRunningRequests": "num_requests_running",
    "KVCacheUtilization": "kv_cache_usage_perc",
}


def hold_stream(url: str, body: dict, release: threading.Event, statuses: list) -> None:
    """Opens a stream and keeps it open, unread, until released; closing it aborts the request."""
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        statuses.append(r.status_code)
        release.wait(120)


def gauges(text: str, prefix: str) -> dict[str, float]:
    found = {}
    for name in GATEWAY_GAUGES.values():
        m = re.search(rf'^{prefix}:{name}\{{model_name="m"\}} (\S+)$', text, re.MULTILINE)
        assert m, f"{prefix}:{name} with the model_name label is missing from /metrics"
        found[name] = float(m.group(1))
    return found


def test_gateway_gauges_follow_waiting_and_running_requests(launch_long):
    assert GATEWAY_METRIC_PREFIX == "vllm"
    server = launch_long("--max-num-seqs", "1", "--max-model-len", "4096", "--kv-cache-memory", "4M",
                         "--served-model-name", "m")  # fmt: skip
    text = httpx.get(server.url + "/metrics").text
    for name in GATEWAY_GAUGES.values():
        assert f"# TYPE vllm:{name} gauge" in text
    assert gauges(text, "vllm") == dict.fromkeys(GATEWAY_GAUGES.values(), 0.0)

    # one sequence at a time: the first request runs (4000 steps, seconds), the next two wait behind it
    body = {"prompt": "Hello", "max_tokens": 4000, "min_tokens": 4000, "ignore_eos": True, "stream": True}
    release, statuses = threading.Event(), []
    threads = [threading.Thread(target=hold_stream, args=(server.api + "/completions", body, release, statuses))]
    threads[0].start()
    try:
        server.wait_metric("num_requests_running", 1, prefix="vllm")
        assert server.metric("kv_cache_usage_perc", prefix="vllm") > 0
        assert server.metric("num_requests_waiting", prefix="vllm") == 0
        for _ in range(2):
            threads.append(threading.Thread(target=hold_stream, args=(server.api + "/completions", body, release,
                                                                      statuses)))  # fmt: skip
            threads[-1].start()
        server.wait_metric("num_requests_waiting", 2, prefix="vllm")
        text = httpx.get(server.url + "/metrics").text
        assert gauges(text, "vllm") == gauges(text, "pllm")  # one snapshot sets both names
        assert gauges(text, "vllm")["num_requests_running"] == 1
    finally:
        release.set()  # the streams close, the requests are aborted one after another
        for t in threads:
            t.join(120)
    assert statuses == [200, 200, 200]
    server.wait_metric("num_requests_running", 0, prefix="vllm")
    server.wait_metric("num_requests_waiting", 0, prefix="vllm")
    server.wait_metric("kv_cache_usage_perc", 0, prefix="vllm")
