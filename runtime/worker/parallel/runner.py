"""Rank 0 of a tensor-parallel engine: starts the other ranks, runs its own shard in this process, and sends each
step to the others; a rank that dies takes the engine down with WorkerDied, never a hang."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from pllm.compiler.manifest import BuildManifest
from pllm.models.lora import LoraAdapter
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.worker.huge_pages import ResidentWeights
from pllm.runtime.worker.model_runner import ModelRunner
from pllm.runtime.worker.parallel.group import (
    COLLECTIVE_TIMEOUT_S,
    DistCommunicator,
    RankShard,
    WorkerDied,
    host_store,
    join_group,
    joined_ranks,
    local_address,
)
from pllm.runtime.worker.parallel.lifetime import WorkerExit, Workers, claim_process, rank_threads, stop
from pllm.runtime.worker.parallel.wire import encode
from pllm.runtime.worker.parallel.worker import worker_main
from pllm.runtime.worker.step import StepBatch, StepOutput

logger = logging.getLogger("pllm")

# After a collective fails, how long to wait for the watcher to name the rank that died (its exit is usually what
# made the collective fail, and is seen within milliseconds).
DEATH_GRACE_S = 2.0
# How long rank 0 waits for the workers to reach its store at start (they import torch and connect); a worker that
# exits meanwhile fails the start at once.
JOIN_TIMEOUT_S = COLLECTIVE_TIMEOUT_S
JOIN_POLL_S = 0.05


def check_parallel_size(build: BuildManifest, config: EngineConfig) -> None:
    """The engine's tensor_parallel_size must be the one the build was split for (its kernels and shards are)."""
    if build.tensor_parallel_size != config.tensor_parallel_size:
        raise ValueError(
            f"{build.path}: built for tensor_parallel_size={build.tensor_parallel_size}, but the engine setting is "
            f"tensor_parallel_size={config.tensor_parallel_size}; serve it with tensor_parallel_size="
            f"{build.tensor_parallel_size} or rebuild with pllm-compile --tensor-parallel-size "
            f"{config.tensor_parallel_size}"
        )


def make_runner(build: BuildManifest, config: EngineConfig, max_model_len: int,
                resident: ResidentWeights | None = None) -> ModelRunner | ParallelRunner:
    """The engine's runner: this process alone, or rank 0 of config.tensor_parallel_size ranks. resident: the
    single-rank build's weights file, already read (loader.load_weights)."""
    check_parallel_size(build, config)
    if config.tensor_parallel_size == 1:
        return ModelRunner(build, config, max_model_len, resident=resident)
    return ParallelRunner(build, config, max_model_len)


def _device_type(backend: str) -> str:
    if backend == "cuda" or (backend == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


class ParallelRunner:
    """The ModelRunner interface the engine uses (execute, budgets, limits), over N ranks."""

    def __init__(self, build: BuildManifest, config: EngineConfig, max_model_len: int):
        size = config.tensor_parallel_size
        address = local_address(size, _device_type(config.backend))
        if address.device_type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"engine setting tensor_parallel_size={size}: needs {size} GPUs, "
                             f"{torch.cuda.device_count()} visible")
        if address.device_type == "cpu" and config.num_threads is None:  # the ranks share the process's threads
            config = dataclasses.replace(config, num_threads=rank_threads(size))
        claim_process()  # one tensor-parallel engine per process: refused here, before anything starts
        self._workers = Workers()
        # stop() runs once: from close(), garbage collection, or the interpreter's exit (before multiprocessing's
        # own exit hook, registered earlier, would terminate() the workers, which ignore SIGTERM)
        self._finalizer = weakref.finalize(self, stop, self._workers)
        atexit.register(self._finalizer)
        self.exited: WorkerExit | None = None
        self.failure: str | None = None
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        try:
            store = host_store(address)
            for rank in range(1, size):
                receive, send = ctx.Pipe(duplex=False)
                error_in, error_out = ctx.Pipe(duplex=False)
                p = ctx.Process(target=worker_main, name=f"pllm-tp-rank{rank}", daemon=True,
                                args=(str(build.path), config, max_model_len, address, rank, receive, error_out))
                p.start()
                receive.close()
                error_out.close()
                self._workers.processes.append(p)
                self._workers.pipes.append(send)
                self._workers.errors.append(error_in)
            self._watcher = threading.Thread(target=self._watch, name="pllm-tp-watch", daemon=True)
            self._watcher.start()
            self._await_workers(store, size)
            join_group(address, 0, store)
            self._workers.joined = True
            shard = RankShard(0, size, address.device(0), DistCommunicator(0, size))
            self.local = ModelRunner(build, config, max_model_len, shard)
        except Exception as e:
            error = self._died(e, "start")  # names the worker whose exit broke the start, if one did
            self.close()
            raise error from e
        logger.info("pllm: tensor parallel over %d ranks (%s, %s), rank 0 in this process, workers pid %s", size,
                    address.backend, address.device_type, ", ".join(str(p.pid) for p in self.workers))

    @property
    def workers(self) -> list[multiprocessing.Process]:
        return self._workers.processes

    def _await_workers(self, store: dist.TCPStore, size: int) -> None:
        """Wait until every worker has reached rank 0's store, failing at once when one exits meanwhile (a script
        without the __main__ guard, a crash while importing) instead of after the store's timeout."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not joined_ranks(store, size):
            self.check()
            if time.monotonic() > deadline:
                raise WorkerDied(f"tensor-parallel workers (pid {', '.join(str(p.pid) for p in self.workers)}) did "
                                 f"not reach rank 0's store within {JOIN_TIMEOUT_S:.0f} s")
            time.sleep(JOIN_POLL_S)

    # -- what the engine reads ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.local.backend

    @property
    def ops(self):
        return self.local.ops

    @property
    def kv_budgets(self):
        return self.local.kv_budgets

    @property
    def num_blocks(self) -> int:
        return self.local.num_blocks

    @property
    def max_model_len(self) -> int:
        return self.local.max_model_len

    def set_lora_adapters(self, adapters: Sequence[LoraAdapter | None]) -> None:
        self.local.set_lora_adapters(adapters)  # refuses any adapter on a split model

    def set_lora_slot(self, slot: int, adapter: LoraAdapter, slots: Sequence[LoraAdapter | None]) -> None:
        self.local.set_lora_slot(slot, adapter, slots)  # refuses it, as above

    # -- the step ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise WorkerDied once a worker has exited (the watcher thread saw its sentinel)."""
        if self.failure is not None:
            raise WorkerDied(self.failure)

    def execute(self, batch: StepBatch) -> StepOutput:
        self.check()
        inputs = self.local.prepare(batch)
        header, payload = encode(inputs)
        data = header.to_bytes()
        try:
            for pipe in self._workers.pipes:
                pipe.send_bytes(data)
            dist.broadcast(payload, src=0)
            return self.local.run(batch, inputs)
        except Exception as e:
            raise self._died(e, "step") from e

    def _died(self, e: Exception, action: str) -> WorkerDied:
        """The error to raise after the start or a step failed (`action` says which): the rank that died, once the
        watcher saw it."""
        deadline = time.monotonic() + DEATH_GRACE_S
        waiting = bool(self.workers) and not self._workers.closing.is_set()  # none started: no watcher to wait on
        while waiting and self.failure is None and time.monotonic() < deadline and not self._workers.closing.is_set():
            time.sleep(0.02)
        if self.failure is None:
            self.failure = f"tensor-parallel {action} failed ({type(e).__name__}: {e})"
        return WorkerDied(self.failure)

    def _watch(self) -> None:
        """Wait on every worker's sentinel; the first to exit while the engine runs is the engine's end."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.workers, start=1)}
        ready = wait(list(sentinels))
        if self._workers.closing.is_set():
            return
        rank, p = sentinels[ready[0]]
        p.join(0.1)
        self.exited = WorkerExit(rank, p.pid, p.exitcode, self._workers.last_words(rank))
        if self._workers.closing.is_set():  # stopped meanwhile (close, or the interpreter's exit): not a failure
            return
        self.failure = self.exited.describe(self._workers.joined)
        logger.error("pllm: %s", self.failure)

    def close(self) -> None:
        """Stop the workers (STOP, then kill what has not exited), leave the process group, and give the process back
        its torch thread count (ModelRunner.close)."""
        self._finalizer()
        atexit.unregister(self._finalizer)
        local = getattr(self, "local", None)  # absent when the start failed before rank 0's runner was made
        if local is not None:
            local.close()
