"""What passes between HTTP handlers and the engine thread: requests in, a stream of outputs (or an error) back."""

from __future__ import annotations

import asyncio
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
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._unfinished = set(request_ids)
        self._closed = False

    def put(self, item: StreamItem) -> None:
        """Engine thread: hand an output, an EngineError or Accepted to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening any more
            pass

    async def wait_accepted(self) -> None:
        item = await self._queue.get()
        if isinstance(item, EngineError):
            self._unfinished.clear()
            raise item
        assert isinstance(item, Accepted), item

    async def __aiter__(self) -> AsyncIterator[RequestOutput | EmbeddingRequestOutput]:
        while self._unfinished:
            item = await self._queue.get()
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
