"""pllm-serve's start-up edges: flag values refused in one line naming the flag and the value, the listening socket
bound before anything loads (a port in use fails at once), and the ready line naming the port actually bound."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from pllm.runtime.server.cli import listen_socket, main
from pllm.runtime.server.cli_args import args_from_options, build_parser
from pllm.runtime.server.draining import bound_url


@pytest.mark.parametrize(
    ("flag", "bad"),
    [
        ("--port", "70000"), ("--port", "-1"), ("--port", "http"),
        ("--log-stats-interval", "0"), ("--log-stats-interval", "-5"), ("--log-stats-interval", "nan"),
        ("--max-body-bytes", "0"),
        ("--shutdown-timeout", "-1"), ("--shutdown-timeout", "nan"), ("--shutdown-timeout", "inf"),
        ("--served-model-name", ""), ("--served-model-name", "  "),
        ("--api-key", ""),
        ("--gpu-memory-utilization", "0"), ("--gpu-memory-utilization", "1.5"), ("--gpu-memory-utilization", "nan"),
        ("--kv-cache-memory", "0"), ("--max-loras", "0"), ("--max-loras", "17"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_in_one_line_naming_flag_and_value(flag, bad, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["build", flag, bad])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"pllm-serve: error: argument {flag}") and repr(bad) in last, last


def test_the_bounds_themselves_are_taken() -> None:
    args = build_parser().parse_args(["build", "--port", "0", "--shutdown-timeout", "0", "--max-body-bytes", "1",
                                      "--log-stats-interval", "0.5"])
    assert (args.port, args.shutdown_timeout, args.max_body_bytes, args.log_stats_interval) == (0, 0.0, 1, 0.5)
    assert build_parser().parse_args(["build", "--port", "65535"]).port == 65535
    args = build_parser().parse_args(["build", "--gpu-memory-utilization", "1", "--max-loras", "16"])
    assert (args.gpu_memory_utilization, args.max_loras) == (1.0, 16)
    args = build_parser().parse_args(["build", "--kv-cache-memory", "512M", "--max-loras", "1"])
    assert (args.kv_cache_memory, args.max_loras) == (512 * 2**20, 1)


def test_an_empty_api_key_in_the_environment_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PLLM_API_KEY", "")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build"])
    assert "$PLLM_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("PLLM_API_KEY", "k")
    assert build_parser().parse_args(["build"]).api_key == "k"
    monkeypatch.delenv("PLLM_API_KEY")
    assert build_parser().parse_args(["build"]).api_key is None  # neither: an open server, as documented


def test_ray_options_are_checked_by_the_same_types() -> None:
    with pytest.raises(ValueError, match="--log-stats-interval: '0'"):
        args_from_options({"build_dir": "b", "log_stats_interval": 0})
    with pytest.raises(ValueError, match="<hidden>"):  # the refusal names the flag, never the key
        args_from_options({"build_dir": "b", "api_key": ""})


def test_a_port_in_use_fails_before_the_build_is_opened(tmp_path, capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        assert main([str(tmp_path / "missing"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 5
    assert err.strip() == f"pllm-serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_port_0_is_a_free_port_and_the_url_names_it() -> None:
    with listen_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        assert port > 0 and bound_url("127.0.0.1", sock) == f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening already: a connection waits in the backlog until the server accepts


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_backend_cuda_without_a_gpu_is_one_line(serve_build, capsys) -> None:
    assert main([str(serve_build), "--backend", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "pllm-serve: error: backend 'cuda' needs a CUDA GPU and a CUDA build of torch; none found")


def test_serving_on_port_0_names_the_bound_port_and_counts_the_first_step(serve_build, tmp_path) -> None:
    exe = shutil.which("pllm-serve", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "pllm.runtime.server"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        flags = ["--port", "0", "--backend", "cpu", "--served-model-name", "tiny"]
        proc = subprocess.Popen([*cmd, str(serve_build), *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while not (m := re.search(r"ready at (http://127\.0\.0\.1:(\d+))", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        url, port = m.group(1), int(m.group(2))
        assert port != 0
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 1
        deadline = time.monotonic() + 10  # the metrics follow the step on the engine thread
        while 'pllm:generation_tokens_total{model_name="tiny"} 1.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, httpx.get(f"{url}/metrics").text
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
