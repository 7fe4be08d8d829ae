"""AsyncEngine: the event loop's handle on the engine thread: admission, typed commands in, request streams out."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pllm.models.lora import LoraAdapter
from pllm.runtime.engine.engine import LLMEngine
from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.server.engine_loop import (
    Abort,
    AbortAll,
    AddRequests,
    Command,
    EngineLoop,
    LoadLora,
    Stop,
    UnloadLora,
)
from pllm.runtime.server.metrics import ServerMetrics
from pllm.runtime.server.request_stream import EngineError, EngineRequest, Reply, RequestStream

logger = logging.getLogger("pllm.server")


class AsyncEngine:
    """Owns the engine thread; every LLMEngine call (add, abort, step, embed) happens on that thread."""

    def __init__(
        self,
        engine: LLMEngine,
        metrics: ServerMetrics | None = None,
        max_queued_requests: int | None = None,
        log_stats_interval_s: float = 10.0,
    ):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.draining = False
        self.hurried = False  # a second shutdown signal (hurry): the drain aborts what runs now
        self._loop = EngineLoop(engine, metrics, log_stats_interval_s)
        self._thread = threading.Thread(target=self._loop.run, name="pllm-engine", daemon=True)

    @classmethod
    def launch(cls, make_engine: Callable[[], LLMEngine], **kwargs: Any) -> AsyncEngine:
        """Build the engine on the thread that will step it, start its loop, and return once it is ready; raises
        whatever make_engine raises. On the cpu backend this matters: stepping on a thread other than the one that
        loaded the weights runs each decode step about 1.5x slower (a second OpenMP thread pool competes)."""
        ready: queue.SimpleQueue = queue.SimpleQueue()

        def build_and_run() -> None:
            try:
                engine = cls(make_engine(), **kwargs)
            except BaseException as exc:  # handed to the caller, which re-raises it
                ready.put(exc)
                return
            engine._thread = threading.current_thread()
            ready.put(engine)
            try:
                engine._loop.run()
            finally:
                engine.engine.close()  # a tensor-parallel engine's workers stop with its loop

        threading.Thread(target=build_and_run, name="pllm-engine", daemon=True).start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._submit(Stop())
        self._thread.join(timeout_s)

    @property
    def dead_reason(self) -> str | None:
        return self._loop.failure

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    def num_unfinished(self) -> int:
        return self._loop.num_unfinished()

    def _submit(self, command: Command) -> bool:
        return self._loop.submit(command)

    def _check_admission(self, num_requests: int) -> None:
        if self.dead_reason is not None or not self._thread.is_alive():
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        if self.draining:
            self._reject("draining")
            raise EngineError(503, "The server is shutting down.", retry_after_s=5)
        if not self._loop.reserve(num_requests, self.max_queued_requests):
            self._reject("queue_full")
            raise EngineError(503, "The request queue is full; retry later.", retry_after_s=1)

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_rejection(reason)

    async def generate(self, requests: list[EngineRequest]) -> RequestStream:
        """Admit the requests (EngineError 503 when full or draining, 400 for bad input); returns their stream."""
        self._check_admission(len(requests))
        stream = RequestStream(self, [r.request_id for r in requests], asyncio.get_running_loop())
        if not self._submit(AddRequests(stream, tuple(requests))):
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        try:
            await stream.wait_accepted()
        except BaseException:
            stream.close()
            raise
        return stream

    async def load_lora(self, request: LoRARequest, adapter: LoraAdapter) -> int:
        """Serve an adapter read and checked off the engine thread: the engine thread takes it between steps.
        -> its slot; LoraError when refused (the engine then unchanged)."""
        return await self._ask(lambda reply: LoadLora(request, adapter, reply))

    async def unload_lora(self, name: str) -> int:
        """Stop serving the adapter to new requests (those added already finish on it). -> its slot."""
        return await self._ask(lambda reply: UnloadLora(name, reply))

    async def _ask(self, command: Callable[[Reply], Command]):
        reply = Reply(asyncio.get_running_loop())
        if self.dead_reason is not None or not self._submit(command(reply)):
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        return await reply.wait()

    def abort(self, request_ids: list[str]) -> None:
        self._submit(Abort(tuple(request_ids)))

    def hurry(self) -> None:
        """Cut a drain short: its live requests are aborted now rather than at its timeout."""
        self.hurried = True

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, let live ones finish for up to timeout_s (or until hurry()), then abort the rest
        (finish_reason abort)."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.num_unfinished() and time.monotonic() < deadline and self.is_alive and not self.hurried:
            await asyncio.sleep(0.05)
        if self.num_unfinished() and self.is_alive:
            logger.info("%s: aborting %d unfinished requests",
                        "drain cut short" if self.hurried else "shutdown timeout reached", self.num_unfinished())
            self._submit(AbortAll())
            for _ in range(40):  # give the handlers a moment to send their final chunks
                if not self.num_unfinished():
                    break
                await asyncio.sleep(0.05)
