"""warm_up: the cpu backend's first forward before any request, into the padding blocks only."""

from __future__ import annotations

import dataclasses

import torch

from pllm.compiler.manifest import open_build
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.model_runner import ModelRunner
from pllm.runtime.worker.step import GroupBlockTable, SampleInputs, SeqStep, StepBatch
from pllm.runtime.worker.warm_up import warm_up

CONFIG = EngineConfig(backend="cpu", kv_cache_memory=4 << 20, max_num_seqs=4)


def _runner(build_dir, backend: str = "cpu") -> ModelRunner:
    return ModelRunner(open_build(str(build_dir)), dataclasses.replace(CONFIG, backend=backend), 256)


def _prompt_step(runner: ModelRunner) -> StepBatch:
    ids = (5, 17, 3, 99, 42)
    tables = tuple(GroupBlockTable(0, (0,)) for _ in runner.pad_blocks)  # block 0: a block the allocator hands out
    row = SampleInputs(0, SamplingParams(), (), (), frozenset())
    return StepBatch((SeqStep("r", ids, 0, tables, True, len(ids), row),))


def test_warm_up_writes_only_the_padding_blocks(tiny_build):
    runner = _runner(tiny_build("llama"))
    threads = torch.get_num_threads()
    assert warm_up(runner)
    assert torch.get_num_threads() == threads  # the thread count it ran under is given back
    for cache, pad in zip(runner.kv_cache, runner.pad_blocks, strict=True):
        assert cache[:, :, pad].abs().sum() > 0  # it ran: the padding block holds its K/V
        assert not cache[:, :, :pad].any()  # and every block a sequence can own is still untouched zeros


def test_a_warmed_runner_answers_as_a_fresh_one(tiny_build):
    build = tiny_build("llama")
    warmed, fresh = _runner(build), _runner(build)
    assert warm_up(warmed)
    a = warmed.execute(_prompt_step(warmed)).logits
    b = fresh.execute(_prompt_step(fresh)).logits
    assert torch.equal(a, b)


def test_warm_up_leaves_other_backends_alone(tiny_build):
    runner = _runner(tiny_build("llama"), backend="interpret")  # slow to run, and its kernels are proven elsewhere
    assert not warm_up(runner)
    assert not any(cache.any() for cache in runner.kv_cache)
