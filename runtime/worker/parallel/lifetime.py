"""The life of a tensor-parallel engine's worker processes, seen from rank 0: the one engine a process may hold, the
threads each rank gets, how a worker's exit is described, and how the workers are stopped (close, garbage
collection or the interpreter's exit alike)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch.distributed as dist

from pllm.runtime.worker.parallel.group import leave_group
from pllm.runtime.worker.parallel.wire import STOP

STOP_TIMEOUT_S = 10.0  # a worker asked to stop that has not exited by then is killed

# Held from a ParallelRunner's start until its workers are stopped: torch.distributed has one default process group
# per process, so one tensor-parallel engine per process.
_ENGINE_SLOT = threading.Lock()


class EngineAlreadyRunning(RuntimeError):
    """A second tensor-parallel engine in a process that already runs one (or its own default process group)."""


def claim_process() -> None:
    """Take this process's one tensor-parallel slot, or raise EngineAlreadyRunning saying why not; nothing is
    started or changed when it raises, so the engine already running goes on."""
    if not _ENGINE_SLOT.acquire(blocking=False):
        raise EngineAlreadyRunning(
            "a tensor-parallel engine is already running in this process, and a process holds one (torch.distributed "
            "has one default process group per process): close() the other LLM first, or start this one in "
            "another process")
    if dist.is_initialized():
        _ENGINE_SLOT.release()
        raise EngineAlreadyRunning(
            "this process already holds a torch.distributed default process group (not pllm's): a tensor-parallel "
            "engine needs its own; destroy that group first, or start the engine in another process")


def thread_budget() -> int:
    """The cpu threads this process was given: OMP_NUM_THREADS when set (as Ray sets it from an actor's CPUs, and
    deploy/ from the container's), else the CPUs its affinity mask allows; never the machine's core count."""
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def rank_threads(size: int) -> int:
    """Each rank's torch threads when `size` ranks share this process's budget (thread_budget): at least 1."""
    return max(1, thread_budget() // size)


@dataclass(frozen=True)
class WorkerExit:
    """A worker process that exited while the engine ran (or started)."""

    rank: int
    pid: int | None
    exitcode: int | None
    last_words: str  # the error it wrote before exiting; "" when it wrote none

    def describe(self, joined: bool) -> str:
        why = f" ({self.last_words})" if self.last_words else ""
        text = f"tensor-parallel worker rank {self.rank} (pid {self.pid}) exited with code {self.exitcode}{why}"
        if joined or self.last_words:
            return f"{text}; the engine cannot continue and must be restarted"
        return f"{text} before it joined the process group; {_spawn_hint()}"


def _spawn_hint() -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main is None:
        return "its stderr above says why"
    return (f"workers are spawned and a spawned process first re-imports the main module ({main}), so a script "
            "that creates LLM(..., tensor_parallel_size=N) needs the `if __name__ == \"__main__\":` guard "
            "around it; the worker's stderr above says what it hit")


@dataclass
class Workers:
    """Rank 0's handles on ranks 1..N-1, shared with the finalizer that stops them (it must not hold the runner)."""

    processes: list[multiprocessing.Process] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)  # each worker's step headers
    errors: list[Connection] = field(default_factory=list)  # each worker's last words: the error it exits on
    closing: threading.Event = field(default_factory=threading.Event)  # set before any worker is asked to stop
    joined: bool = False  # whether this process joined the default process group (and must leave it)

    def last_words(self, rank: int) -> str:
        errors = self.errors[rank - 1]
        try:
            if errors.poll():
                return errors.recv_bytes().decode(errors="replace")
        except (OSError, EOFError):
            pass
        return ""


def stop(workers: Workers) -> None:
    """STOP each worker, kill any that has not exited within STOP_TIMEOUT_S, leave the group and free the process's
    slot. Runs once per engine: from close(), garbage collection or the interpreter's exit."""
    workers.closing.set()  # first: the watcher must not report these exits as the engine's death
    try:
        for pipe in workers.pipes:
            try:
                pipe.send_bytes(STOP.to_bytes())
            except OSError:
                pass  # that worker is gone already
            pipe.close()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in workers.processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()  # never terminate(): workers ignore SIGTERM
                p.join()
        if workers.joined:
            leave_group()
    finally:
        _ENGINE_SLOT.release()
