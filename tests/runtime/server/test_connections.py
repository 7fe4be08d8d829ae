"""Held connections: slow heads, slow bodies and silence are cut; a cap answers 503; /health shows a drain."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

TIMEOUT_S = 1.5
SLACK_S = 2.0  # scheduling on a loaded 2-core machine; still far below "held until shutdown"
MAX_CONNECTIONS = 6  # above the five the first test holds at once


@pytest.fixture(scope="module")
def strict(launch):
    return launch("--request-header-timeout", str(TIMEOUT_S), "--request-body-timeout", str(TIMEOUT_S),
                  "--timeout-keep-alive", str(TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
                  "--max-model-len", "64")  # fmt: skip


def connect(server, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S + 10)
    if first:
        s.sendall(first)
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start, data = time.monotonic(), b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data, time.monotonic() - start


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_slow_head_slow_body_and_silence_are_closed(strict):
    body = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
    slow_head = connect(strict, HEAD[:30])
    slow_body = connect(strict, HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    silent = connect(strict)
    slow_next_head = connect(strict, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    slow_next_head.recv(4096)  # the first response; then half of a second request head
    slow_next_head.sendall(b"GET /health HTTP/1.1\r\nHo")
    idle = connect(strict, b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    idle.recv(4096)
    results = {}
    threads = [
        threading.Thread(target=lambda n=n, s=s: results.__setitem__(n, read_until_closed(s)))
        for n, s in [("head", slow_head), ("body", slow_body), ("silent", silent), ("next", slow_next_head),
                     ("idle", idle)]
    ]  # fmt: skip
    for t in threads:
        t.start()
    time.sleep(TIMEOUT_S + SLACK_S + 1)
    for t in threads:
        t.join(1)
    assert set(results) == {"head", "body", "silent", "next", "idle"}, results
    for name, (_, elapsed) in results.items():
        assert elapsed < TIMEOUT_S + SLACK_S, (name, elapsed)
    assert results["head"][0] == results["silent"][0] == b""  # (next and idle may still hold their last body)
    response = results["body"][0]
    assert response.startswith(b"HTTP/1.1 408 "), response[:200]
    err = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == 408 and err["type"] == "RequestTimeoutError" and "1.5 s" in err["message"]
    r = httpx.post(strict.api + "/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_normal_request_is_served_beside_stalled_connections(strict):
    stalled = [connect(strict, HEAD[:20]), connect(strict)]
    r = httpx.post(strict.api + "/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    for s in stalled:
        s.close()


def test_connections_past_the_cap_get_503_not_a_queue(strict):
    held = [connect(strict) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # accepted by the server, still inside the head deadline
    start = time.monotonic()
    r = httpx.get(strict.url + "/version", timeout=30)
    assert time.monotonic() - start < TIMEOUT_S
    assert r.status_code == 503 and r.headers["connection"] == "close" and r.headers["retry-after"]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 503
    for s in held:
        s.close()
    time.sleep(0.2)
    assert httpx.get(strict.url + "/version", timeout=30).status_code == 200


def test_health_is_503_while_draining(launch_long):
    server = launch_long("--max-num-seqs", "1", "--max-model-len", "4096", "--kv-cache-memory", "4M",
                         "--shutdown-timeout", "4")  # fmt: skip
    body = {"prompt": "Hello", "max_tokens": 4000, "min_tokens": 4000, "ignore_eos": True}
    finished = []
    thread = threading.Thread(
        target=lambda: finished.append(httpx.post(server.api + "/completions", json=body, timeout=60).status_code)
    )
    thread.start()
    server.wait_metric("num_requests_running", 1)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 3
    while (r := httpx.get(server.url + "/health", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "/health stayed 200 after SIGTERM"
        time.sleep(0.05)
    assert r.status_code == 503 and server.proc.poll() is None  # still draining, still answering
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 503 and "draining" in err["message"]
    thread.join(30)
    assert server.proc.wait(30) == 0 and finished == [200]
