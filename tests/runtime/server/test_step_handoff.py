"""StepHandoff: a step's outputs reach each event loop in one callback, in order; the engine thread waits for a
request's first output to be handled, for the rest only once a loop lags, and never longer than its bound."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pllm.runtime.server.request_stream import RequestStream, StepHandoff


class _NoAbort:
    def abort(self, request_ids: list[str]) -> None:
        raise AssertionError(f"nothing should be aborted, got {request_ids}")


class _LoopThread:
    """An event loop running on its own thread, as the server's is beside the engine thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = _LoopThread()
    yield lt
    lt.close()


def _stream(lt: _LoopThread) -> RequestStream:
    async def make() -> RequestStream:
        return RequestStream(_NoAbort(), ["r"], asyncio.get_running_loop())

    return lt.run(make())


def test_items_arrive_in_order_in_one_callback_per_loop(loop_thread):
    a, b = _stream(loop_thread), _stream(loop_thread)
    calls = []
    real = loop_thread.loop.call_soon_threadsafe
    loop_thread.loop.call_soon_threadsafe = lambda *args: calls.append(args[0]) or real(*args)
    handoff = StepHandoff(timeout_s=10.0, max_lag_s=0.0)  # waits for every callback: both queues are filled after
    for item in ("a1", "b1", "a2"):
        handoff.add(a if item[0] == "a" else b, item)
    handoff.deliver()
    assert len(calls) == 1

    async def drain() -> list[str]:
        return [a._queue.get_nowait(), a._queue.get_nowait(), b._queue.get_nowait()]

    assert loop_thread.run(drain()) == ["a1", "a2", "b1"]


def test_first_output_is_handled_before_deliver_returns(loop_thread):
    stream = _stream(loop_thread)
    handled = threading.Event()

    async def consume() -> None:
        await stream._queue.get()
        time.sleep(0.3)  # the handler's work with its output (format the chunk, write the socket), without awaiting
        handled.set()

    task = asyncio.run_coroutine_threadsafe(consume(), loop_thread.loop)
    time.sleep(0.05)  # the consumer is parked on its queue
    handoff = StepHandoff(timeout_s=30.0, max_lag_s=60.0)
    handoff.add(stream, "token", first=True)
    handoff.deliver()
    assert handled.is_set()
    task.result(10)


def test_later_outputs_are_waited_for_once_the_loop_lags(loop_thread):
    stream = _stream(loop_thread)
    gate = threading.Event()
    loop_thread.loop.call_soon_threadsafe(gate.wait)  # the loop is stalled (it has no core) until the gate opens
    handoff = StepHandoff(timeout_s=30.0, max_lag_s=0.2)
    handoff.add(stream, "t2")
    handoff.deliver()  # not a first output, not lagging yet: returns though the loop has not run the callback
    assert stream._queue.empty()
    time.sleep(0.3)
    waiter = threading.Thread(target=handoff.deliver)  # a step later the callback lags: the engine waits for it
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    gate.set()
    waiter.join(10)
    assert not waiter.is_alive()
    assert loop_thread.run(stream._queue.get()) == "t2"


def test_a_stalled_loop_holds_the_engine_only_up_to_the_bound(loop_thread):
    stream = _stream(loop_thread)
    gate = threading.Event()
    loop_thread.loop.call_soon_threadsafe(gate.wait)
    handoff = StepHandoff(timeout_s=0.2, max_lag_s=0.0)
    handoff.add(stream, "first", first=True)
    start = time.monotonic()
    handoff.deliver()
    assert time.monotonic() - start < 5.0
    gate.set()
    assert loop_thread.run(stream._queue.get()) == "first"


def test_a_closed_loop_is_skipped():
    loop = asyncio.new_event_loop()
    stream = RequestStream(_NoAbort(), ["r"], loop)
    loop.close()
    handoff = StepHandoff(timeout_s=30.0, max_lag_s=0.0)
    handoff.add(stream, "late", first=True)
    handoff.deliver()  # returns at once: nobody is listening any more


def test_a_reader_that_falls_behind_holds_one_output_a_request(loop_thread):
    """Outputs are cumulative copies: a stalled SSE reader used to queue one per step, O(tokens^2) memory
    (~700 MB for one 8k-token sequence). A newer output replaces its request's unread one, in its queue place."""
    from pllm.runtime.engine.outputs import CompletionOutput, RequestOutput

    def output(rid: str, k: int, finished: bool = False) -> RequestOutput:
        return RequestOutput(rid, None, [1], [CompletionOutput(0, "x" * k, list(range(k)))], finished)

    async def run() -> tuple[int, list[tuple[str, int]]]:
        stream = RequestStream(_NoAbort(), ["a", "b"], asyncio.get_running_loop())
        for k in range(1, 1001):
            stream.receive(output("a", k))
            stream.receive(output("b", k, finished=k == 1000))
        stream.receive(output("a", 1001, finished=True))
        queued = stream._queue.qsize()
        return queued, [(out.request_id, len(out.outputs[0].text)) async for out in stream]

    queued, read = loop_thread.run(run())
    assert queued == 2
    assert read == [("a", 1001), ("b", 1000)]
