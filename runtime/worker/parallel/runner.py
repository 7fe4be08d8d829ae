"""Rank 0 of a tensor-parallel engine: starts the other ranks, runs its own shard in this process, and sends each
step to the others; a rank that dies takes the engine down with WorkerDied, never a hang."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from pllm.compiler.manifest import BuildManifest
from pllm.models.lora import LoraAdapter
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.worker.huge_pages import ResidentWeights
from pllm.runtime.worker.model_runner import ModelRunner
from pllm.runtime.worker.parallel.group import (
    DistCommunicator,
    RankShard,
    WorkerDied,
    join_group,
    leave_group,
    local_address,
)
from pllm.runtime.worker.parallel.wire import STOP, encode
from pllm.runtime.worker.parallel.worker import worker_main
from pllm.runtime.worker.step import StepBatch, StepOutput

logger = logging.getLogger("pllm")

# After a collective fails, how long to wait for the watcher to name the rank that died (its exit is usually what
# made the collective fail, and is seen within milliseconds).
DEATH_GRACE_S = 2.0
STOP_TIMEOUT_S = 10.0  # a worker asked to stop that has not exited by then is killed


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
        if address.device_type == "cpu" and config.num_threads is None:  # the ranks share the cores
            config = dataclasses.replace(config, num_threads=max(1, (os.cpu_count() or 1) // size))
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        self.workers: list[multiprocessing.Process] = []
        self.pipes: list[Connection] = []
        self.errors: list[Connection] = []  # each worker's last words: the error it exits on
        self.failure: str | None = None
        self._closing = threading.Event()
        for rank in range(1, size):
            receive, send = ctx.Pipe(duplex=False)
            error_in, error_out = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker_main, name=f"pllm-tp-rank{rank}", daemon=True,
                            args=(str(build.path), config, max_model_len, address, rank, receive, error_out))
            p.start()
            receive.close()
            error_out.close()
            self.workers.append(p)
            self.pipes.append(send)
            self.errors.append(error_in)
        self._finalizer = weakref.finalize(self, _stop, self.workers, self.pipes)
        threading.Thread(target=self._watch, name="pllm-tp-watch", daemon=True).start()
        try:
            join_group(address, 0)
            shard = RankShard(0, size, address.device(0), DistCommunicator(0, size))
            self.local = ModelRunner(build, config, max_model_len, shard)
        except Exception as e:
            error = self._died(e)  # names the worker whose exit broke the start, if one did
            self.close()
            raise error from e
        logger.info("pllm: tensor parallel over %d ranks (%s, %s), rank 0 in this process, workers pid %s", size,
                    address.backend, address.device_type, ", ".join(str(p.pid) for p in self.workers))

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

    def set_lora_adapters(self, adapters: Sequence[LoraAdapter]) -> None:
        self.local.set_lora_adapters(adapters)  # refuses any adapter on a split model

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
            for pipe in self.pipes:
                pipe.send_bytes(data)
            dist.broadcast(payload, src=0)
            return self.local.run(batch, inputs)
        except Exception as e:
            raise self._died(e) from e

    def _died(self, e: Exception) -> WorkerDied:
        """The error to raise after a send or collective failed: the rank that died, once the watcher saw it."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while self.failure is None and time.monotonic() < deadline and not self._closing.is_set():
            time.sleep(0.02)
        if self.failure is None:
            self.failure = f"tensor-parallel step failed ({type(e).__name__}: {e})"
        return WorkerDied(self.failure)

    def _watch(self) -> None:
        """Wait on every worker's sentinel; the first to exit while the engine runs is the engine's end."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.workers, start=1)}
        ready = wait(list(sentinels))
        if self._closing.is_set():
            return
        rank, p = sentinels[ready[0]]
        p.join(0.1)
        why = ""
        errors = self.errors[rank - 1]
        try:
            if errors.poll():
                why = f" ({errors.recv_bytes().decode(errors='replace')})"
        except (OSError, EOFError):
            pass
        self.failure = (f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}{why}; the "
                        "engine cannot continue and must be restarted")
        logger.error("pllm: %s", self.failure)

    def close(self) -> None:
        """Stop the workers (STOP, then kill what has not exited) and leave the process group."""
        self._closing.set()
        self._finalizer()
        leave_group()


def _stop(workers: list[multiprocessing.Process], pipes: list[Connection]) -> None:
    for pipe in pipes:
        try:
            pipe.send_bytes(STOP.to_bytes())
        except OSError:
            pass  # that worker is gone already
        pipe.close()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
