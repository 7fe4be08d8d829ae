"""Live pllm-serve processes on loopback over a tiny random llama build, and small HTTP helpers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, prefix: str = "pllm") -> float:
        """The value of one unlabelled-by-us `prefix:` series (model_name label only)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        m = re.search(rf"^{prefix}:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        assert m, f"metric {prefix}:{name} not found"
        return float(m.group(1))

    def wait_metric(self, name: str, value: float, timeout_s: float = 15.0, prefix: str = "pllm") -> None:
        deadline = time.monotonic() + timeout_s
        while (now := self.metric(name, prefix)) != value:
            assert time.monotonic() < deadline, f"{prefix}:{name} stayed at {now}, expected {value}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def start_server(build_dir: Path, log_dir: Path, *args: str) -> LiveServer:
    port = free_port()
    exe = shutil.which("pllm-serve", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "pllm.runtime.server"]
    cmd += [str(build_dir), "--host", "127.0.0.1", "--port", str(port), "--backend", "cpu", *args]
    log_path = log_dir / f"serve-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(proc, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pllm-serve exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"pllm-serve did not become healthy in {START_TIMEOUT_S} s:\n{server.log()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def serve_build(tiny_build):
    return tiny_build("llama")


def _launcher(build_dir: Path, tmp_path_factory):
    """(*cli_args) -> a started LiveServer of build_dir, killed at the end of the session if still running."""
    servers: list[LiveServer] = []
    log_dir = tmp_path_factory.mktemp("serve-logs")

    def make(*args: str) -> LiveServer:
        server = start_server(build_dir, log_dir, *args)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def launch(serve_build, tmp_path_factory):
    """Factory: (*cli_args) -> a started LiveServer of the tiny model (512 positions)."""
    yield from _launcher(serve_build, tmp_path_factory)


@pytest.fixture(scope="session")
def launch_build(tmp_path_factory):
    """Factory: (build_dir, *cli_args) -> a started LiveServer of any build (one a test module made itself)."""
    servers: list[LiveServer] = []
    log_dir = tmp_path_factory.mktemp("serve-logs")

    def make(build_dir: Path, *args: str) -> LiveServer:
        servers.append(start_server(build_dir, log_dir, *args))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def launch_long(tiny_build, tmp_path_factory):
    """The same for the tiny model with 8192 positions: requests of thousands of tokens, which outlast a drain
    window however fast the engine gets (a 500-token request takes the tiny model ~0.3 s)."""
    yield from _launcher(tiny_build("llama", max_position_embeddings=8192), tmp_path_factory)


@pytest.fixture(scope="session")
def server(launch) -> LiveServer:
    """The shared server: max_model_len 256, 16 sequences a step, a 3072-token KV cache, stats every second."""
    return launch(
        "--served-model-name", "tiny", "alias",
        "--max-model-len", "256",
        "--max-num-seqs", "16",
        "--kv-cache-memory", "1536K",
        "--log-stats-interval", "1",
    )  # fmt: skip


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grammars(tiny_build):
    """A grammar cache over the tiny llama's tokenizer, as the server's engine holds one (no server started)."""
    from transformers import AutoTokenizer

    from pllm.runtime.engine.structured_output import GrammarCache

    tok = AutoTokenizer.from_pretrained(str(tiny_build("llama")))
    cache = GrammarCache(tok, len(tok), (tok.eos_token_id,))
    yield cache
    cache.shutdown()


@pytest.fixture(scope="module")
def hf_logprobs(tiny_dir):
    """The reference for served logprobs: ids -> transformers' log-softmax [len(ids), vocab] of the tiny llama the
    shared server serves (fp32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama")), dtype=torch.float32)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    """transformers' tokenizer of the tiny llama the shared server serves."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir("llama")))
