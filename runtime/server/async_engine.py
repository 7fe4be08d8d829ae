"""AsyncEngine: the LLMEngine on one background thread, fed by a thread-safe command queue, read via asyncio queues."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pllm.runtime.engine.engine import LLMEngine
from pllm.runtime.engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from pllm.runtime.server.metrics import EngineSnapshot, ServerMetrics
from pllm.runtime.server.request_stream import (
    ACCEPTED,
    EngineError,
    EngineRequest,
    RequestStream,
)

logger = logging.getLogger("pllm.server")

MAX_COMMANDS_PER_STEP = 1024  # keeps a flood of submissions from starving the running batch


@dataclass
class _Route:
    """Engine-thread bookkeeping of one live request."""

    stream: RequestStream
    request: EngineRequest
    last_output: RequestOutput | None = None
    last_time: float | None = None


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
        self.log_stats_interval_s = log_stats_interval_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._lock = threading.Lock()  # guards the counters below and dead_reason
        self._num_pending = 0  # requests submitted but not yet added by the engine thread
        # Published by the engine thread: requests that wait for a place in the running batch, and the places
        # (sequence slots) a new request would take at once: none while anyone waits, as admission is FCFS.
        self._num_queued = 0
        self._num_free_slots = engine.scheduler.max_num_seqs
        self._blocked = False  # the last step left requests waiting
        self._num_live = 0  # requests the engine thread is serving
        self.draining = False
        self.dead_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="pllm-engine", daemon=True)

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
            engine._run()

        threading.Thread(target=build_and_run, name="pllm-engine", daemon=True).start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    # -- event-loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._submit(("stop",))
        self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    def num_unfinished(self) -> int:
        with self._lock:
            return self._num_pending + self._num_live

    def _submit(self, command: tuple) -> bool:
        """Queue a command unless the engine is dead (checked under the lock _die takes, so none is lost)."""
        with self._lock:
            if self.dead_reason is not None:
                return False
            self._commands.put(command)
            return True

    def _check_admission(self, num_requests: int) -> None:
        if self.dead_reason is not None or not self._thread.is_alive():
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        if self.draining:
            self._reject("draining")
            raise EngineError(503, "The server is shutting down.", retry_after_s=5)
        limit = self.max_queued_requests
        with self._lock:
            # Only requests that will wait count: pending ones beyond the free slots, and those already waiting.
            # Pending is exact; the rest is at most a step old, so at most limit + max_num_seqs ever queue.
            num_queued = self._num_queued + max(0, self._num_pending - self._num_free_slots)
            if limit is not None and num_queued >= limit:
                self._reject("queue_full")
                raise EngineError(503, "The request queue is full; retry later.", retry_after_s=1)
            self._num_pending += num_requests

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_rejection(reason)

    async def generate(self, requests: list[EngineRequest]) -> RequestStream:
        """Admit the requests (EngineError 503 when full or draining, 400 for bad input); returns their stream."""
        self._check_admission(len(requests))
        stream = RequestStream(self, [r.request_id for r in requests], asyncio.get_running_loop())
        if not self._submit(("add", stream, requests)):
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        try:
            await stream.wait_accepted()
        except BaseException:
            stream.close()
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._submit(("abort", request_ids))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps (embeddings); its exception is re-raised here."""
        if self.dead_reason is not None or not self._thread.is_alive():
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        if self.draining:
            raise EngineError(503, "The server is shutting down.", retry_after_s=5)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._submit(("call", fn, future, loop)):
            raise EngineError(500, "The engine loop is not running; the server must be restarted.")
        return await future

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, let live ones finish for up to timeout_s, then abort the rest (finish_reason abort)."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.num_unfinished() and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        if self.num_unfinished() and self.is_alive:
            logger.info("shutdown timeout reached: aborting %d unfinished requests", self.num_unfinished())
            self._submit(("abort_all",))
            for _ in range(40):  # give the handlers a moment to send their final chunks
                if not self.num_unfinished():
                    break
                await asyncio.sleep(0.05)

    # -- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        next_log = time.monotonic() + self.log_stats_interval_s
        try:
            while True:
                busy = self.engine.has_unfinished()
                timeout = None if busy else max(0.01, min(1.0, next_log - time.monotonic()))
                if not self._process_commands(timeout):
                    break
                if self.engine.has_unfinished():
                    self._step()
                self._publish()
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + self.log_stats_interval_s
                    if self.metrics is not None:
                        self.metrics.log_stats()
        except BaseException as exc:  # a bug in the loop itself: the engine is dead, /health says so
            logger.exception("engine loop died")
            self._die(f"{type(exc).__name__}")
            return
        self._fail_all(EngineError(503, "The server is shutting down."))

    def _process_commands(self, timeout: float | None) -> bool:
        """Run queued commands (waiting up to timeout for the first when idle); False on stop."""
        try:
            command = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return True
        for _ in range(MAX_COMMANDS_PER_STEP):
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(command[1], command[2])
            elif kind == "abort":
                for request_id in command[1]:
                    self._abort(request_id)
            elif kind == "abort_all":
                self._abort_all()
            elif kind == "call":
                self._call(*command[1:])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        return True

    def _add(self, stream: RequestStream, requests: list[EngineRequest]) -> None:
        added: list[str] = []
        try:
            for r in requests:
                prompt = {"prompt_token_ids": r.prompt_token_ids}
                if r.pooling is not None:
                    self.engine.add_embedding_request(r.request_id, prompt, r.pooling, r.arrival_time)
                else:
                    self.engine.add_request(r.request_id, prompt, r.params, r.arrival_time)
                added.append(r.request_id)
                self._routes[r.request_id] = _Route(stream, r)
        except Exception as exc:
            for request_id in added:
                self.engine.abort_request(request_id)
                del self._routes[request_id]
            if isinstance(exc, ValueError):  # the engine's user-facing rejections: too long, out of vocabulary
                stream.put(EngineError(400, str(exc)))
            else:
                logger.exception("add_request failed")
                stream.put(EngineError(500, "Internal server error while adding the request."))
        else:
            stream.put(ACCEPTED)
        finally:
            with self._lock:
                self._num_pending -= len(requests)
                self._num_live = len(self._routes)
                self._publish_queue(self.engine.num_requests()[1], stepped=False)

    def _abort(self, request_id: str, output: bool = False) -> None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return
        self.engine.abort_request(request_id)
        if self.metrics is not None:
            self.metrics.observe_finished("abort", time.monotonic() - route.request.arrival_time)
        if output:
            route.stream.put(_aborted_output(route))

    def _abort_all(self) -> None:
        for request_id in list(self._routes):
            self._abort(request_id, output=True)

    def _call(self, fn: Callable, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            result, error = fn(self.engine), None
        except Exception as exc:
            result, error = None, exc

        def resolve() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:
            pass

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # Fail the requests this step ran, keep the loop (and everyone else) going.
            logger.exception("engine step failed; failing its running requests")
            self._fail_running()
            return
        now = time.monotonic()
        for out in outputs:
            self._dispatch(out, now)

    def _dispatch(self, out: RequestOutput | EmbeddingRequestOutput, now: float) -> None:
        route = self._routes.get(out.request_id)
        if route is None:
            return
        metrics = self.metrics
        pooled = isinstance(out, EmbeddingRequestOutput)
        if metrics is not None and not pooled:  # token latencies are a generation's only
            if route.last_time is None:
                first = out.metrics.get("first_token_time", now)
                metrics.observe_first_token(len(out.prompt_token_ids), first - route.request.arrival_time)
            else:
                metrics.inter_token_latency.observe(now - route.last_time)
        if not pooled:
            route.last_output, route.last_time = out, now
        if out.finished:
            del self._routes[out.request_id]
            if metrics is not None:
                reason = "stop" if pooled else out.outputs[0].finish_reason or "stop"
                metrics.observe_finished(reason, now - route.request.arrival_time)
        route.stream.put(out)

    def _fail_running(self) -> None:
        running = {r.request_id for r in self.engine.scheduler.running}
        victims = [
            rid
            for rid in self._routes
            if rid in running or any(c.startswith(rid + "#") for c in running)  # n > 1 fans out as "rid#i"
        ] or list(self._routes)  # nothing to blame: fail all rather than fail the same step forever
        for request_id in victims:
            route = self._routes.pop(request_id)
            self.engine.abort_request(request_id)
            if self.metrics is not None:
                self.metrics.observe_finished("error", time.monotonic() - route.request.arrival_time)
            route.stream.put(EngineError(500, "Internal server error while generating; the request was dropped."))

    def _publish(self) -> None:
        engine = self.engine
        num_running, num_waiting = engine.num_requests()
        with self._lock:
            self._publish_queue(num_waiting, stepped=True)
            self._num_live = len(self._routes)
        if self.metrics is not None:
            self.metrics.update(
                EngineSnapshot(
                    num_running=num_running,
                    num_waiting=num_waiting,
                    kv_cache_usage=engine.kv.usage,
                    num_generation_tokens=engine.stats.num_generation_tokens,
                    num_preemptions=engine.scheduler.num_preemptions,
                    num_prefix_queries=engine.kv.num_prefix_queries,
                    num_prefix_hits=engine.kv.num_prefix_hits,
                )
            )

    def _publish_queue(self, num_waiting: int, stepped: bool) -> None:
        """Engine thread, under the lock. After a step, every waiting request is one the batch had no room for;
        just after an add (before the step), those up to the free slots will run, unless some already waited."""
        free = self.engine.scheduler.max_num_seqs - self.engine.scheduler.num_running
        if stepped:
            self._blocked = num_waiting > 0
        if self._blocked:
            self._num_queued, self._num_free_slots = num_waiting, 0
        else:
            self._num_queued, self._num_free_slots = max(0, num_waiting - free), max(0, free - num_waiting)

    def _fail_all(self, error: EngineError) -> None:
        for route in self._routes.values():
            route.stream.put(error)
        self._routes.clear()

    def _die(self, reason: str) -> None:
        with self._lock:
            self.dead_reason = reason
            self._num_live = 0
        error = EngineError(500, "The engine loop died; the server must be restarted.")
        self._fail_all(error)
        while True:  # answer whatever was queued before the lock closed the door
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                command[1].put(error)
            elif command[0] == "call":
                _, _, future, loop = command
                try:
                    loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_exception(error))
                except RuntimeError:
                    pass


def _aborted_output(route: _Route) -> RequestOutput:
    """A final output for a request aborted by the server (drain timeout): what it had, finish_reason abort."""
    last = route.last_output
    if last is None:
        outputs = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(route.request.params.n)]
        last = RequestOutput(route.request.request_id, None, route.request.prompt_token_ids, outputs)
    outputs = [o if o.finished else dataclasses.replace(o, finish_reason="abort") for o in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)
