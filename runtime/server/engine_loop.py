"""EngineLoop: the engine thread. Typed commands (engine_commands.py) in, engine steps, outputs routed to each
request's stream."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass

from pllm.models.lora import LoraError
from pllm.runtime.engine.engine import LLMEngine
from pllm.runtime.engine.outputs import CompletionOutput, EmbeddingRequestOutput, EngineSnapshot, RequestOutput
from pllm.runtime.engine.sampling_params import InvalidParam
from pllm.runtime.server.engine_commands import Abort, AbortAll, AddRequests, Command, LoadLora, Stop, UnloadLora
from pllm.runtime.server.metrics import ServerMetrics
from pllm.runtime.server.request_metrics import EngineInfo
from pllm.runtime.server.request_stream import Accepted, EngineError, EngineRequest, Reply, RequestStream, StepHandoff
from pllm.runtime.worker.parallel.group import WorkerDied

logger = logging.getLogger("pllm.server")

MAX_COMMANDS_PER_STEP = 1024  # keeps a flood of submissions from starving the running batch
# StepHandoff: the longest the engine thread waits, after a step, for an event loop to run its outputs' handlers (a
# bound, so a loop stalled elsewhere never stalls the engine; one with a core runs them in under a millisecond), and
# how long a loop may leave outputs unhandled before the engine waits for it (far under a 100 ms time slice, far
# over the few milliseconds a loaded scheduler takes to give a woken thread a core).
HANDOFF_TIMEOUT_S = 0.05
HANDOFF_MAX_LAG_S = 0.02


@dataclass
class _Route:
    """Engine-thread bookkeeping of one live request."""

    stream: RequestStream
    request: EngineRequest
    last_output: RequestOutput | None = None
    last_time: float | None = None


class EngineLoop:
    """Everything the engine thread does. The event loop talks to it only through submit(), reserve() and the
    published counters, all under one lock."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None, log_stats_interval_s: float) -> None:
        self.engine = engine
        self.metrics = metrics
        self.log_stats_interval_s = log_stats_interval_s
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._handoff = StepHandoff(HANDOFF_TIMEOUT_S, HANDOFF_MAX_LAG_S)  # engine thread only
        self._lock = threading.Lock()  # guards the counters below and dead_reason
        self._num_pending = 0  # requests submitted but not yet added by the engine thread
        # Published by the engine thread: requests that wait for a place in the running batch, and the places
        # (sequence slots) a new request would take at once: none while anyone waits, as admission is FCFS.
        self._num_queued = 0
        self._num_free_slots = engine.snapshot().max_num_seqs
        self._blocked = False  # the last step left requests waiting
        self._num_live = 0  # requests the engine thread is serving
        self.dead_reason: str | None = None
        if metrics is not None:
            metrics.engine_started(EngineInfo(engine.max_model_len, engine.kv.block_size, engine.runner.num_blocks,
                                              engine.kv.enable_prefix_caching))

    # -- called from the event loop ------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the engine cannot go on, or None: the loop's own death, or a tensor-parallel worker's exit. The
        runner's watcher sees an exit within milliseconds, even while this loop's thread is blocked in a collective
        with the dead rank (gloo can wait out its 60 s timeout before the step raises), so /health and admission
        read it here rather than wait for the loop to die."""
        if self.dead_reason is not None:
            return self.dead_reason
        try:
            self.engine.check_workers()  # reads the watcher's verdict only: safe from any thread
        except WorkerDied as e:
            return str(e)
        return None

    def submit(self, command: Command) -> bool:
        """Queue a command unless the engine is dead (checked under the lock _die takes, so none is lost)."""
        with self._lock:
            if self.dead_reason is not None:
                return False
            self._commands.put(command)
            return True

    def reserve(self, num_requests: int, max_queued_requests: int | None) -> bool:
        """Count num_requests as pending unless the waiting queue is full (then False)."""
        with self._lock:
            # Only requests that will wait count: pending ones beyond the free slots, and those already waiting.
            # Pending is exact; the rest is at most a step old, so at most limit + max_num_seqs ever queue.
            num_queued = self._num_queued + max(0, self._num_pending - self._num_free_slots)
            if max_queued_requests is not None and num_queued >= max_queued_requests:
                return False
            self._num_pending += num_requests
            return True

    def num_unfinished(self) -> int:
        with self._lock:
            return self._num_pending + self._num_live

    # -- the engine thread ---------------------------------------------------------------------------
    def run(self) -> None:
        next_log = time.monotonic() + self.log_stats_interval_s
        try:
            while True:
                busy = self.engine.has_unfinished()
                timeout = None if busy else max(0.01, min(1.0, next_log - time.monotonic()))
                if not self._process_commands(timeout):
                    break
                self.engine.check_workers()  # a dead tensor-parallel rank ends the loop even while idle
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
        """Run queued commands (waiting up to timeout for the first when idle); False on Stop."""
        try:
            command = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return True
        for _ in range(MAX_COMMANDS_PER_STEP):
            match command:
                case Stop():
                    return False
                case AddRequests(stream, requests):
                    self._add(stream, requests)
                case Abort(request_ids):
                    for request_id in request_ids:
                        self._abort(request_id)
                case AbortAll():
                    for request_id in list(self._routes):
                        self._abort(request_id, output=True)
                case LoadLora(request, adapter, reply):
                    self._answer(reply, self.engine.install_lora, request, adapter)
                case UnloadLora(name, reply):
                    self._answer(reply, self.engine.remove_lora, name)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        return True

    def _answer(self, reply: Reply, change, *args) -> None:
        try:
            reply.put(change(*args))
        except LoraError as exc:  # a refusal: the engine is unchanged
            reply.put(exc)
        except Exception:
            logger.exception("LoRA adapter update failed")
            reply.put(EngineError(500, "Internal server error while updating the LoRA adapters."))

    def _add(self, stream: RequestStream, requests: tuple[EngineRequest, ...]) -> None:
        added: list[str] = []
        try:
            for r in requests:  # an adapter unloaded since the handler looked it up serves no new request
                if r.lora is not None and self.engine.loras.requests.get(r.lora.name) != r.lora:
                    raise EngineError(404, f"The model `{r.lora.name}` does not exist.", param="model")
            for r in requests:
                prompt = {"prompt_token_ids": r.prompt_token_ids}
                if r.pooling is not None:
                    self.engine.add_embedding_request(r.request_id, prompt, r.pooling, r.arrival_time)
                else:
                    self.engine.add_request(r.request_id, prompt, r.params, r.arrival_time, r.lora)
                added.append(r.request_id)
                self._routes[r.request_id] = _Route(stream, r)
        except Exception as exc:
            for request_id in added:
                self.engine.abort_request(request_id)
                del self._routes[request_id]
            if isinstance(exc, EngineError):
                stream.put(exc)
            elif isinstance(exc, ValueError):  # the engine's user-facing rejections: too long, out of vocabulary
                param = exc.param if isinstance(exc, InvalidParam) else None
                stream.put(EngineError(400, str(exc), param=param))
            else:
                logger.exception("add_request failed")
                stream.put(EngineError(500, "Internal server error while adding the request."))
        else:
            stream.put(Accepted())
        finally:
            snapshot = self.engine.snapshot()
            with self._lock:
                self._num_pending -= len(requests)
                self._num_live = len(self._routes)
                self._publish_queue(snapshot, stepped=False)

    def _abort(self, request_id: str, output: bool = False) -> None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return
        self.engine.abort_request(request_id)
        if self.metrics is not None:
            self.metrics.observe_finished("abort", time.monotonic() - route.request.arrival_time)
        if output:
            route.stream.put(_aborted_output(route))

    def _step(self) -> None:
        stats = self.engine.stats
        steps, tokens = stats.num_steps, stats.num_prompt_tokens + stats.num_generation_tokens
        try:
            outputs = self.engine.step()
        except WorkerDied:
            raise  # the engine cannot step again: run() ends the loop, failing every request
        except Exception:
            # Fail the requests this step ran, keep the loop (and everyone else) going.
            logger.exception("engine step failed; failing its running requests")
            self._fail_running()
            return
        if self.metrics is not None and stats.num_steps > steps:  # a step that ran the model
            self.metrics.observe_iteration(stats.num_prompt_tokens + stats.num_generation_tokens - tokens)
        now = time.monotonic()
        for out in outputs:
            self._dispatch(out, now, self._handoff)
        self._handoff.deliver()

    def _dispatch(self, out: RequestOutput | EmbeddingRequestOutput, now: float, handoff: StepHandoff) -> None:
        route = self._routes.get(out.request_id)
        if route is None:
            return
        if self.metrics is not None:
            self.metrics.observe_output(out, route.request, route.last_time, now)
        first = route.last_time is None
        if not isinstance(out, EmbeddingRequestOutput):
            route.last_output, route.last_time = out, now
        if out.finished:
            del self._routes[out.request_id]
        handoff.add(route.stream, out, first=first)

    def _fail_running(self) -> None:
        running = self.engine.running_request_ids()
        # nothing to blame: fail all rather than fail the same step forever
        victims = [rid for rid in self._routes if rid in running] or list(self._routes)
        for request_id in victims:
            route = self._routes.pop(request_id)
            self.engine.abort_request(request_id)
            if self.metrics is not None:
                self.metrics.observe_finished("error", time.monotonic() - route.request.arrival_time)
            route.stream.put(EngineError(500, "Internal server error while generating; the request was dropped."))

    def _publish(self) -> None:
        snapshot = self.engine.snapshot()
        with self._lock:
            self._publish_queue(snapshot, stepped=True)
            self._num_live = len(self._routes)
        if self.metrics is not None:
            self.metrics.update(snapshot)

    def _publish_queue(self, snapshot: EngineSnapshot, stepped: bool) -> None:
        """Engine thread, under the lock. After a step, every waiting request is one the batch had no room for;
        just after an add (before the step), those up to the free slots will run, unless some already waited."""
        num_waiting = snapshot.num_waiting
        free = snapshot.max_num_seqs - snapshot.num_running_seqs
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
            if isinstance(command, AddRequests):
                command.stream.put(error)
            elif isinstance(command, LoadLora | UnloadLora):
                command.reply.put(error)


def _aborted_output(route: _Route) -> RequestOutput:
    """A final output for a request aborted by the server (drain timeout): what it had, finish_reason abort."""
    last = route.last_output
    if last is None:
        outputs = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(route.request.params.n)]
        last = RequestOutput(route.request.request_id, None, route.request.prompt_token_ids, outputs)
    outputs = [o if o.finished() else dataclasses.replace(o, finish_reason="abort") for o in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)
