"""What passes between HTTP handlers and the engine thread: requests in, a stream of outputs (or an error) back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.engine.outputs import EmbeddingRequestOutput, RequestOutput
from pllm.runtime.engine.sampling_params import SamplingParams


class Aborter(Protocol):
    def abort(self, request_ids: list[str]) -> None: ...


class EngineError(Exception):
    """A request failed; status and message are what the client sees (never a traceback)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param


class ClientDisconnected(Exception):
    pass


@dataclass(frozen=True)
class EngineRequest:
    """One engine request as a handler hands it over: already tokenized, params validated."""

    request_id: str
    prompt_token_ids: list[int]  # [num_prompt_tokens]
    params: SamplingParams
    arrival_time: float  # time.monotonic() when the HTTP request arrived
    pooling: str | None = None  # "last" | "mean": an embedding request (params unused), one output when done
    lora: LoRARequest | None = None  # the LoRA adapter the request's `model` named; None: the base model


class Reply:
    """The engine thread's one answer to a coroutine (a LoRA load or unload): a result, or the exception to raise.
    Made on the event loop; put() from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future = loop.create_future()

    def put(self, result: object) -> None:
        self._loop.call_soon_threadsafe(self._set, result)

    def _set(self, result: object) -> None:
        if self._future.done():  # the awaiting handler was cancelled
            return
        if isinstance(result, BaseException):
            self._future.set_exception(result)
        else:
            self._future.set_result(result)

    async def wait(self) -> object:
        return await self._future


@dataclass(frozen=True)
class Accepted:
    """The engine thread added every request of a stream."""


@dataclass(frozen=True)
class Cancelled:
    """The client went away."""


# What a stream carries, in order: Accepted or an EngineError first, then outputs until each request finished.
StreamItem = RequestOutput | EmbeddingRequestOutput | EngineError | Accepted | Cancelled


class RequestStream:
    """Outputs of one HTTP request's engine requests, in step order, delivered on the event loop that asked."""

    def __init__(self, engine: Aborter, request_ids: list[str], loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[StreamItem | _Unread] = asyncio.Queue()
        # A request's newest output not yet read. Outputs are cumulative (the whole text, token ids and logprobs
        # so far, each a fresh copy), so a newer one replaces an unread older one, as vLLM's RequestOutputCollector
        # merges them: a client that reads slowly or not at all holds one output a request, not one per step
        # (which was O(tokens^2) memory: ~700 MB for one stalled 8k-token sequence).
        self._unread: dict[str, RequestOutput] = {}
        self._unfinished = set(request_ids)
        self._closed = False

    def put(self, item: StreamItem) -> None:
        """Engine thread: hand an output, an EngineError or Accepted to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self.receive, item)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening any more
            pass

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def receive(self, item: StreamItem) -> None:
        """Event loop: queue an item the engine thread handed over (StepHandoff)."""
        if isinstance(item, RequestOutput):
            unread = item.request_id in self._unread
            self._unread[item.request_id] = item
            if unread:  # its place in the queue is kept; the newer output is what will be read there
                return
            item = _Unread(item.request_id)
        self._queue.put_nowait(item)

    async def _get(self) -> StreamItem:
        item = await self._queue.get()
        return self._unread.pop(item.request_id) if isinstance(item, _Unread) else item

    async def wait_accepted(self) -> None:
        item = await self._get()
        if isinstance(item, EngineError):
            self._unfinished.clear()
            raise item
        assert isinstance(item, Accepted), item

    async def __aiter__(self) -> AsyncIterator[RequestOutput | EmbeddingRequestOutput]:
        while self._unfinished:
            item = await self._get()
            if isinstance(item, Cancelled):
                raise ClientDisconnected()
            if isinstance(item, EngineError):
                raise item
            assert not isinstance(item, Accepted), item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    def close(self) -> None:
        """Abort whatever has not finished (idempotent); called when the handler is done or gone."""
        if not self._closed and self._unfinished:
            self._engine.abort(list(self._unfinished))
        self._closed = True

    def cancel(self) -> None:
        """Event loop: the client disconnected; abort and wake the consumer."""
        self.close()
        self._queue.put_nowait(Cancelled())


@dataclass(frozen=True)
class _Unread:
    """A queue place for a request's newest unread output (RequestStream._unread)."""

    request_id: str


class StepHandoff:
    """The engine thread's side of output delivery: each step's outputs go to each event loop in one callback; then
    the engine thread waits (at most timeout_s) until the loop has run the handlers they woke, when one of them is a
    request's first output (its time to first token), or when a loop has left a callback unrun for max_lag_s.

    Why wait at all: the engine thread and its OpenMP workers keep every core busy from one step to the next, so a
    loop woken with tokens to send may get no core for many steps; under round-robin real-time scheduling not until
    a compute thread's 100 ms time slice runs out (measured on the 2-core VM: a stream's first token reached its
    socket 160 ms after the step that made it, later tokens in bursts a time slice apart). Blocking the engine
    thread frees a core for the loop. Why not after every step: a loop that gets a core within a few milliseconds
    (the usual case) needs no help, and waiting for it each step cost a small model's 1 ms steps 4x on a loaded VM.
    """

    def __init__(self, timeout_s: float, max_lag_s: float) -> None:
        self.timeout_s = timeout_s
        self.max_lag_s = max_lag_s
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StreamItem]]] = {}
        self._first = False  # some item is a request's first output
        self._unrun: list[tuple[threading.Event, float]] = []  # callbacks not yet run: (set once run, when posted)

    def add(self, stream: RequestStream, item: StreamItem, first: bool = False) -> None:
        """Queue an item for this step's delivery; first: the request's first output."""
        self._items.setdefault(stream.loop, []).append((stream, item))
        self._first |= first

    def deliver(self) -> None:
        """Engine thread, after each step: hand over the step's items, then wait as the class says."""
        now = time.monotonic()
        posted: list[threading.Event] = []
        for loop, items in self._items.items():
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(_deliver, loop, items, done)
            except RuntimeError:  # the event loop is gone (shutdown); nobody is listening any more
                continue
            posted.append(done)
        unrun = [(done, t) for done, t in self._unrun if not done.is_set()] + [(done, now) for done in posted]
        if self._first:
            waits = [done for done, _ in unrun]
        else:  # a loop runs its callbacks in order: the oldest unrun one says how far it lags
            waits = [done for done, t in unrun if now - t >= self.max_lag_s]
        self._items, self._first = {}, False
        for done in waits:  # one after another: the loops run meanwhile, so the waits overlap
            done.wait(self.timeout_s)
        self._unrun = [(done, t) for done, t in unrun if not done.is_set()]


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestStream, StreamItem]], done: threading.Event):
    """Event loop: queue each item, then set done once the handlers they woke have run (call_soon keeps order)."""
    for stream, item in items:
        stream.receive(item)
    loop.call_soon(done.set)
