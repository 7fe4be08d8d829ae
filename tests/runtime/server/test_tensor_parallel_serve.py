"""pllm-serve --tensor-parallel-size 2 answers the official openai client with the single-process tokens; a
killed worker fails the request in flight, turns /health to 503 and makes the server exit non-zero."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import openai
import pytest

from pllm.runtime.engine.llm import LLM
from pllm.runtime.engine.sampling_params import SamplingParams

PROMPT = "Hello, world! The quick"


@pytest.fixture(scope="module")
def tp_server(tiny_tp_build, launch_build):
    return launch_build(tiny_tp_build("llama", 2), "--tensor-parallel-size", "2", "--served-model-name", "tiny",
                        "--max-model-len", "512")


def test_openai_client_gets_the_single_rank_answer(tp_server, tiny_build):
    client = openai.OpenAI(base_url=tp_server.api, api_key="unused", max_retries=0, timeout=60)
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Bonjour"}],
                                          max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    with LLM(str(tiny_build("llama")), backend="cpu") as one:
        params = SamplingParams(temperature=0.0, max_tokens=12)
        expected = one.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
        expected_chat = one.chat([{"role": "user", "content": "Bonjour"}], params, use_tqdm=False)[0].outputs[0].text
    assert completion.choices[0].text == expected == streamed
    assert chat.choices[0].message.content == expected_chat


def test_a_killed_worker_fails_the_request_and_the_server_exits(tp_server):
    # runs after the test above (file order): this one ends the module's server
    pid = int(re.search(r"workers pid (\d+)", tp_server.log()).group(1))
    client = openai.OpenAI(base_url=tp_server.api, api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=480, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the request is running
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    saw_503 = False
    while tp_server.proc.poll() is None and time.monotonic() - start < 30:
        try:
            saw_503 |= httpx.get(f"{tp_server.url}/health", timeout=1).status_code == 503
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert saw_503
    assert tp_server.proc.wait(timeout=30) != 0
    assert time.monotonic() - start < 30
    log = tp_server.log()
    assert f"worker rank 1 (pid {pid}) exited with code -9" in log
