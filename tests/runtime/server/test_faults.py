"""In-process faults: a failing step fails its requests only; a dead loop turns /health to 503; 500s leak nothing."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.engine import LLMEngine
from pllm.runtime.server.api import create_app
from pllm.runtime.server.async_engine import AsyncEngine
from pllm.runtime.server.metrics import ServerMetrics

CONFIG = EngineConfig(backend="cpu", max_model_len=128, kv_cache_memory=2**20)


@pytest.fixture
def stack(serve_build):
    llm = LLMEngine(str(serve_build), CONFIG)
    engine = AsyncEngine(llm, ServerMetrics("m"), max_queued_requests=64)
    app = create_app(engine, ["m"])
    engine.start()
    yield llm, engine, app
    engine.stop()


def test_launch_builds_the_engine_on_its_own_thread(serve_build):
    built_on, stepped_on = [], []

    def make():
        built_on.append(threading.current_thread())
        llm = LLMEngine(str(serve_build), CONFIG)
        real_step = llm.step

        def step():
            stepped_on.append(threading.current_thread())
            return real_step()

        llm.step = step
        return llm

    engine = AsyncEngine.launch(make, metrics=ServerMetrics("m"))
    try:
        (r,) = call(create_app(engine, ["m"]), ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3}))
        assert built_on == [stepped_on[0]] and stepped_on[0] is not threading.current_thread()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        engine.stop()


def test_launch_raises_what_building_raised(serve_build):
    def make():
        raise ValueError("max_model_len 999999 exceeds the model's limit")

    with pytest.raises(ValueError, match="max_model_len 999999"):
        AsyncEngine.launch(make)


def call(app, *requests: tuple[str, str, dict | None]) -> list[httpx.Response]:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            return [await c.request(method, path, json=body) for method, path, body in requests]

    return asyncio.run(go())


def no_leak(r: httpx.Response) -> None:
    assert "Traceback" not in r.text and ".py" not in r.text and "/work" not in r.text


def test_failing_step_fails_its_requests_only(stack):
    llm, engine, app = stack
    real_step = llm.step
    num_failures = []

    def flaky_step():
        if not num_failures:
            num_failures.append(1)
            raise RuntimeError("injected fault in /secret/path.py")
        return real_step()

    llm.step = flaky_step
    body = {"prompt": "Hello", "max_tokens": 4}
    bad, good, health = call(app, ("POST", "/v1/completions", body), ("POST", "/v1/completions", body),
                             ("GET", "/health", None))  # fmt: skip
    assert bad.status_code == 500 and bad.json()["error"]["code"] == 500
    no_leak(bad)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
    assert health.status_code == 200 and engine.is_alive
    assert llm.kv.usage == 0 and not llm.has_unfinished()


def test_failing_step_mid_stream_sends_error_then_done(stack):
    llm, _, app = stack
    real_step = llm.step
    num_steps = []

    def flaky_step():
        num_steps.append(1)
        if len(num_steps) == 3:
            raise RuntimeError("injected")
        return real_step()

    llm.step = flaky_step
    (r,) = call(app, ("POST", "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}))  # fmt: skip
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    no_leak(r)


def test_step_failing_after_a_request_finished_fails_it_too(stack):
    """A step that raises after the scheduler finished one of its requests (here: the output processor, after
    update) must fail that request too. It is no longer in the running batch, and it never gets an output: left
    alone, its handler waited forever and its route and text state stayed in the engine for good."""
    llm, engine, app = stack
    real_process = llm.processor.process
    armed = threading.Event()

    def flaky_process(sampled, *args, **kwargs):
        if armed.is_set() and llm.scheduler.running and any(r.is_finished for r in sampled):
            armed.clear()
            raise RuntimeError("injected after update")
        return real_process(sampled, *args, **kwargs)

    llm.processor.process = flaky_process

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            long = asyncio.create_task(
                c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 100, "ignore_eos": True}))
            for _ in range(500):  # the long one decoding, so the short one's step runs beside it
                if llm.scheduler.running:
                    break
                await asyncio.sleep(0.01)
            armed.set()
            short = await asyncio.wait_for(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 15)
            return short, await long

    short, long = asyncio.run(go())
    assert not armed.is_set(), "the fault never fired"
    assert short.status_code == 500 and long.status_code in (200, 500)
    no_leak(short)
    for _ in range(100):
        if not engine.num_unfinished():
            break
        time.sleep(0.01)
    assert engine.num_unfinished() == 0 and not engine._loop._routes
    assert not llm.processor.groups and not llm.processor.seq_states and not llm.has_unfinished()
    assert llm.kv.usage == 0


def test_dead_loop_turns_health_503(stack):
    llm, engine, app = stack

    def broken():
        raise RuntimeError("loop bug")

    llm.has_unfinished = broken
    engine.abort(["nothing"])  # wakes the loop, which then dies in has_unfinished
    engine._thread.join(5)
    health, gen = call(app, ("GET", "/health", None), ("POST", "/v1/completions", {"prompt": "hi"}))
    assert health.status_code == 503 and not engine.is_alive
    assert gen.status_code == 500 and "restart" in gen.json()["error"]["message"]
    no_leak(gen)


def test_a_dead_worker_turns_health_503_while_the_step_is_still_blocked(stack):
    """A tensor-parallel worker killed mid-step can leave the engine thread blocked in a collective with it (gloo
    waits out a 60 s timeout before the step raises), yet the runner's watcher has seen the exit: /health answers
    503 and new requests are refused at once, not after the timeout (a CI run saw the server stay healthy for 60 s)."""
    from pllm.runtime.worker.parallel.group import WorkerDied

    llm, engine, app = stack
    in_step, release, died = threading.Event(), threading.Event(), threading.Event()

    def blocked_step():
        in_step.set()
        release.wait(30)
        raise WorkerDied("tensor-parallel worker rank 1 (pid 1) exited with code -9")

    def check_workers():
        if died.is_set():
            raise WorkerDied("tensor-parallel worker rank 1 (pid 1) exited with code -9")

    llm.step, llm.check_workers = blocked_step, check_workers
    pending = threading.Thread(target=call, args=(app, ("POST", "/v1/completions", {"prompt": "hi"})))
    pending.start()
    try:
        assert in_step.wait(10)
        (health,) = call(app, ("GET", "/health", None))
        assert health.status_code == 200 and engine.is_alive  # the step is slow, nothing known dead
        died.set()
        health, gen = call(app, ("GET", "/health", None), ("POST", "/v1/completions", {"prompt": "hi"}))
        assert health.status_code == 503 and not engine.is_alive and "rank 1" in engine.dead_reason
        assert gen.status_code == 500 and "restart" in gen.json()["error"]["message"]
        assert engine._thread.is_alive()  # still blocked in the step: the verdict came from the watcher
    finally:
        release.set()
        pending.join(30)


def test_handler_bug_is_a_bare_500(stack, monkeypatch):
    _, _, app = stack
    serving = app.app.state.embeddings

    async def boom(*args, **kwargs):
        raise KeyError("/secret/file.py")

    monkeypatch.setattr(serving, "create", boom)
    (r,) = call(app, ("POST", "/v1/embeddings", {"input": "hi"}))
    assert r.status_code == 500 and r.json()["error"]["message"] == "Internal server error."
    assert r.headers["x-request-id"]
    no_leak(r)


def test_chat_template_runs_in_the_sandbox(stack):
    llm, _, app = stack
    # transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment: no attribute escapes.
    llm.tokenizer.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (r,) = call(app, ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    llm.tokenizer.chat_template = None
    (r,) = call(app, ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
