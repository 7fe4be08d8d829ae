"""Nothing per request outlives it: after a messy run (n > 1, aborts of every kind, preemption, refusals, stop
strings, logprobs, embeddings) the engine's per-request state is empty and every KV block is back in the pool."""

from __future__ import annotations

import random

import pytest

from pllm import LLM
from pllm.runtime.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def small(build):
    """A KV pool of a few dozen blocks: sixteen sequences of up to 60 prompt tokens preempt each other."""
    return LLM(build, backend="cpu", kv_cache_memory=3 << 16, max_model_len=256, max_num_seqs=16,
               max_num_batched_tokens=128)


def per_request_state(engine) -> dict[str, int]:
    """Every container of the engine that holds something per request, by name -> its size (all 0 when idle)."""
    s = engine.scheduler
    sizes = {
        "scheduler._requests": len(s._requests),
        "scheduler.waiting": len(s.waiting),
        "scheduler.running": len(s.running),
        "processor.groups": len(engine.processor.groups),
        "processor.seq_states": len(engine.processor.seq_states),
        "pooler": len(engine.pooler),
    }
    for i, m in enumerate(engine.kv.managers):
        sizes[f"kv{i}._req_hashes"] = len(m._req_hashes)
        sizes[f"kv{i}._req_num_cached_blocks"] = len(m._req_num_cached_blocks)
        sizes[f"kv{i}.referenced_blocks"] = sum(1 for c in m._ref_counts if c)
        sizes[f"kv{i}.blocks_not_free"] = m.num_blocks - m.num_free_blocks
    return sizes


def test_a_messy_run_leaves_nothing_behind(small):
    engine = small.engine
    rng = random.Random(0)
    words = ["ab", "cd", "ef", "the", "a", "x"]
    preemptions = engine.scheduler.num_preemptions
    live: list[str] = []
    for i in range(150):
        rid = f"leak{i}"
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        try:
            if rng.random() < 0.08:
                engine.add_embedding_request(rid, prompt)
            else:
                engine.add_request(rid, prompt, SamplingParams(
                    n=rng.choice([1, 1, 2, 3]),
                    max_tokens=rng.choice([1, 2, 5, 20, 40]),
                    temperature=rng.choice([0.0, 0.8]),
                    logprobs=rng.choice([None, 0, 2]),
                    prompt_logprobs=rng.choice([None, None, None, 1]),
                    stop=rng.choice([None, ["a", "e "]]),
                    min_tokens=rng.choice([0, 0, 3]),
                    seed=rng.choice([None, 7]),
                ))
            live.append(rid)
        except ValueError:
            pass
        if live and live[-1] == rid and rng.random() < 0.05:
            with pytest.raises(ValueError):  # the id is in use
                engine.add_request(rid, "hi", SamplingParams())
        if rng.random() < 0.05:
            with pytest.raises(ValueError):  # the prompt leaves no room
                engine.add_request(f"long{i}", "ab " * 400, SamplingParams(max_tokens=5))
        r = rng.random()
        if r < 0.15:
            engine.abort_request(rng.choice(live))  # waiting, running or finished already
        elif r < 0.2:
            engine.abort_request(rng.choice(live) + "#1")  # a child's id: not a request, ignored
        elif r < 0.22:
            engine.abort_request("never-added")
        for _ in range(rng.randint(0, 3)):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > preemptions, "the run never preempted: the pool is too large"
    assert engine.num_unfinished_requests() == 0
    assert per_request_state(engine) == dict.fromkeys(per_request_state(engine), 0)
    assert engine.kv.usage == 0.0


def test_a_step_that_raised_reports_what_it_ran(small):
    """A step that raised after the scheduler finished one of its requests still names it in
    running_request_ids (the server fails those): it has left the running batch, and no output would ever come."""
    engine = small.engine
    engine.add_request("long", "ab cd", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.add_request("short", "ef", SamplingParams(max_tokens=1))
    real_process = engine.processor.process

    def failing(*args, **kwargs):
        raise RuntimeError("injected")

    engine.processor.process = failing
    try:
        with pytest.raises(RuntimeError):
            engine.step()
    finally:
        engine.processor.process = real_process
    assert engine.scheduler.get_request("short") is None  # finished by the failed step's update
    assert engine.running_request_ids() == {"long", "short"}
    for rid in engine.running_request_ids():
        engine.abort_request(rid)
    assert engine.running_request_ids() == set()
    assert per_request_state(engine) == dict.fromkeys(per_request_state(engine), 0)
