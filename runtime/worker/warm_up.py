"""The first forward before the first request: on the cpu backend it pays one-time costs (oneDNN creating its matmul
primitives, OpenMP starting its thread pool, packed weights repacked into panels, bf16 weights packed for oneDNN)
that would otherwise land on the first request; then logs what the panels hold."""

from __future__ import annotations

import logging

import torch

from pllm.models.spec import ModelKind
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.model_runner import ModelRunner
from pllm.runtime.worker.step import GroupBlockTable, SampleInputs, SeqStep, StepBatch

WARM_UP_ID = "pllm-warm-up"
logger = logging.getLogger("pllm")


def warm_up(runner: object) -> bool:
    """Run a short prompt and one decode token through a single-process cpu decoder (call it on the thread that
    will step it); True when it ran. The tokens go to the padding blocks, which no allocator hands out, so no
    sequence's K/V changes. Other runners are left alone: cuda captures its graphs at start-up, the interpret
    backend's forward is slow, and a tensor-parallel forward runs collectives every rank must join."""
    if not isinstance(runner, ModelRunner) or runner.backend != "cpu" or runner.shard is not None:
        return False
    if runner.spec.kind is not ModelKind.DECODER:
        return False
    tables = tuple(GroupBlockTable(0, (pad,)) for pad in runner.pad_blocks)
    row = SampleInputs(0, SamplingParams(), (), (), frozenset())
    prompt = min(8, runner.block_size - 1)  # the prompt and the decode token fit one block (block_size >= 8)
    # One thread: pllm-serve warms up while its main thread imports the HTTP server, and an OpenMP team sharing
    # the cores with that spins at every barrier for the member that lost its core (seconds on 2 cores, against
    # ~0.2 s alone). The later steps, on all threads, still find their kernels made.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's setting (OpenMP's is per thread); the engine thread steps later
    try:
        for start, num_tokens in ((0, prompt), (prompt, 1)):
            ids = tuple(range(start, start + num_tokens))
            runner.execute(StepBatch((SeqStep(WARM_UP_ID, ids, start, tables, True, start + num_tokens, row),)))
    finally:
        torch.set_num_threads(threads)
    from pllm.runtime.backends.cpu.cpu_ops import TorchOps  # the cpu backend's, as the runner's is here

    if isinstance(runner.ops, TorchOps):  # every weight has run once by now
        kernel = runner.ops.quant_kernel
        for note in (None if kernel is None else kernel.memory_note(), runner.ops.linears.memory_note()):
            if note is not None:
                logger.info("pllm cpu backend: %s", note)
    return True
