"""The scheduler and KV-cache manager at their limits: budgets and caps of 1, a pool that fits one request,
requests arriving mid-prefill, aborts in every state, n > 1, preemption: every step makes progress, the pool comes
back whole, and each request's greedy output is what it is alone."""

from __future__ import annotations

import pytest

from pllm import LLM, SamplingParams
from pllm.runtime.engine.config import SpeculativeConfig
from pllm.runtime.engine.kv_cache import KVCacheManager
from pllm.runtime.engine.kv_coordinator import KvCoordinator
from pllm.runtime.engine.request import Request, RequestStatus
from pllm.runtime.engine.scheduler import Scheduler

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # tiny llama: k+v, layers, block of 16, kv heads, head_dim, fp32
PROMPTS = [
    "Paged attention keeps the KV cache in fixed-size blocks. " * 2,
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog",
    "a",
    "numbers 0123456789 " * 2,
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _req(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, list(prompt), SamplingParams(ignore_eos=True), max_tokens=max_tokens)


def test_a_guess_never_takes_the_block_a_later_running_sequence_needs() -> None:
    """a decodes with guesses, b needs the last free block for its own next token: b must not be preempted."""
    kv = KVCacheManager(5, 2, enable_prefix_caching=False)
    spec = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max=1)
    sched = Scheduler(KvCoordinator((kv,)), 4, 64, 64, (0,), speculative=spec)
    a, b = _req("a", [3, 3, 3], 4), _req("b", [5, 6, 7, 8], 3)
    sched.add_request(a)
    sched.add_request(b)
    sched.update(sched.schedule(), {"a": 3, "b": 4})  # both prefilled: 4 blocks held, 1 free
    assert kv.num_free_blocks == 1
    batch = sched.schedule()
    assert not batch.preempted and sched.num_preemptions == 0
    assert {s.request.request_id: s.num_new_tokens for s in batch.seqs} == {"a": 1, "b": 1}


def test_a_guess_never_takes_the_budget_a_later_running_sequence_needs() -> None:
    """a decodes with guesses, b is mid-prefill: b's chunk comes before a's guesses in the token budget."""
    kv = KVCacheManager(32, 2, enable_prefix_caching=False)
    spec = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max=1)
    sched = Scheduler(KvCoordinator((kv,)), 4, 4, 64, (0,), speculative=spec)
    a, b = _req("a", [3, 3, 3], 8), _req("b", [5, 6, 7, 8, 9, 10, 11], 3)
    sched.add_request(a)
    sched.add_request(b)
    sched.update(sched.schedule(), {"a": 3})  # a prefilled (3 tokens), b's first token computed
    assert (a.num_computed_tokens, b.num_computed_tokens) == (3, 1)
    batch = sched.schedule()
    assert {s.request.request_id: s.num_new_tokens for s in batch.seqs} == {"a": 1, "b": 3}


@pytest.fixture(scope="module")
def alone(plain):
    return {p: plain.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS}


def _state(req: Request) -> str:
    if req.status is RequestStatus.RUNNING:
        return "prefilling" if req.num_computed_tokens < req.num_prompt_tokens else "decoding"
    return "preempted" if req.num_preemptions else "waiting"


def _drive(engine, plan, hook=None):
    """Add plan[k] before step k (requests arrive while others are mid-prefill), call hook(finals) before each
    step, step until done; every step with work to do makes progress. Returns {request_id: final output}."""
    finals: dict[str, object] = {}
    steps = 0
    schedule = engine.scheduler.schedule

    def checked_schedule():
        batch = schedule()
        waits = any(r.ready for r in engine.scheduler.waiting)
        assert not batch.is_empty or not (engine.scheduler.running or waits), "a step scheduled nothing"
        assert batch.num_tokens <= engine.scheduler.max_num_batched_tokens
        assert len(batch.seqs) <= engine.scheduler.max_num_seqs
        return batch

    engine.scheduler.schedule = checked_schedule
    while plan or engine.has_unfinished():
        if plan:
            engine.add_request(*plan.pop(0))
        if hook is not None:
            hook(finals)
        if engine.has_unfinished():
            outs = engine.step()
            for out in outs:
                if out.finished:
                    finals[out.request_id] = out
        steps += 1
        assert steps < 5000, "no progress"
    return finals


def _check_whole(engine):
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine.num_unfinished_requests() == 0 and not engine.has_unfinished()
    snap = engine.snapshot()
    assert (snap.num_running, snap.num_waiting, snap.num_running_seqs, snap.kv_cache_usage) == (0, 0, 0, 0.0)


@pytest.mark.parametrize(
    "num_blocks, max_num_seqs, max_num_batched_tokens",
    [(3, 1, 1), (3, 2, 3), (4, 3, 7), (6, 8, 5), (3, 8, 64)],
)
def test_limits_equal_alone(build, alone, num_blocks, max_num_seqs, max_num_batched_tokens):
    # one block more for the runner's padding block: 3 blocks of 16 hold exactly one sequence of max_model_len
    llm = LLM(build, backend="cpu", kv_cache_memory=(num_blocks + 1) * BLOCK_BYTES, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, max_model_len=48)
    engine = llm.engine
    assert engine.kv.num_blocks == num_blocks
    plan = [(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    plan.append(("fan", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)))
    plan.append(("again", PROMPTS[0], GREEDY))  # a prefix hit, if its blocks survived the pressure
    finals = _drive(engine, plan)
    for i, p in enumerate(PROMPTS):
        assert finals[f"r{i}"].outputs[0].token_ids == alone[p], i
    assert [c.token_ids for c in finals["fan"].outputs] == [alone[PROMPTS[2]]] * 2
    assert finals["again"].outputs[0].token_ids == alone[PROMPTS[0]]
    _check_whole(engine)


def test_abort_in_every_state(build, alone):
    """Abort one request in each state as it is reached; the rest finish as they do alone, and the pool and the
    counters come back whole."""
    llm = LLM(build, backend="cpu", kv_cache_memory=5 * BLOCK_BYTES, max_num_seqs=3, max_num_batched_tokens=5,
              max_model_len=48)
    engine = llm.engine
    prompts = PROMPTS * 3
    plan = [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    plan.append(("fan", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)))
    aborted: dict[str, str] = {}  # request id -> its state when aborted

    def hook(finals):
        for rid in list(finals):  # finished in the step just taken: an abort now changes nothing
            if rid not in aborted:
                aborted[rid] = "finished"
                engine.abort_request(rid)
                break
        for req in [*engine.scheduler.running, *engine.scheduler.waiting]:
            state = _state(req)
            if state not in aborted.values() and not req.request_id.startswith("fan"):
                aborted[req.request_id] = state
                unfinished = engine.num_unfinished_requests()
                engine.abort_request(req.request_id)
                assert engine.num_unfinished_requests() == unfinished - 1
                assert engine.scheduler.get_request(req.request_id) is None and not req.holds_blocks
        running = {r.request_id for r in engine.scheduler.running}
        if "fan#0" in running and "fan#1" not in running and "fan" not in aborted:  # one child running, one not
            aborted["fan"] = "fan split"
            engine.abort_request("fan")
        engine.abort_request("nobody")  # unknown: ignored

    finals = _drive(engine, plan, hook)
    assert set(aborted.values()) >= {"waiting", "prefilling", "decoding", "preempted", "finished"}, aborted
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        if aborted.get(rid, "finished") == "finished":
            assert finals[rid].outputs[0].token_ids == alone[p], rid
        else:
            assert rid not in finals
    _check_whole(engine)


def test_prompts_at_and_past_max_model_len_are_refused_clearly(build):
    llm = LLM(build, backend="cpu", kv_cache_memory=8 * BLOCK_BYTES, max_num_batched_tokens=4, max_model_len=32)
    engine = llm.engine
    for n in (32, 33):
        with pytest.raises(ValueError, match="maximum context length is 32"):
            engine.add_request(f"p{n}", list(range(1, n + 1)), GREEDY)
    engine.add_request("p31", list(range(1, 32)), GREEDY)  # one output token of room, chunked 4 a step
    finals = _drive(engine, [])
    assert len(finals["p31"].outputs[0].token_ids) == 1 and finals["p31"].outputs[0].finish_reason == "length"
    _check_whole(engine)


def test_a_pool_too_small_for_any_request_is_refused_at_start(build):
    with pytest.raises(ValueError, match=r"max_model_len=48: larger than .* KV cache \(32\)"):
        LLM(build, backend="cpu", kv_cache_memory=3 * BLOCK_BYTES, max_model_len=48)


def test_a_request_too_big_for_the_pool_is_refused_at_admission() -> None:
    sched = Scheduler(KvCoordinator.single(2, 4), 4, 4, 64, (0,))
    with pytest.raises(ValueError, match="need 3 KV blocks of 4 tokens, but the cache has only 2"):
        sched.add_request(_req("big", [1] * 8, 2))
    assert not sched.has_unfinished()


@pytest.mark.parametrize("max_num_seqs, max_num_batched_tokens", [(1, 1), (3, 5), (8, 16)])
def test_a_sliding_window_model_returns_blocks_and_equals_alone(tiny_build, max_num_seqs, max_num_batched_tokens):
    """mistral with a window of 8: a sequence holds only the blocks its window and chunk reach, so a pool far
    smaller than max_model_len runs everything, each as it runs alone."""
    build = str(tiny_build("mistral", sliding_window=8))
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    roomy = LLM(build, backend="cpu", kv_cache_memory=1 << 24, max_model_len=64)
    want = [o.outputs[0].token_ids for o in roomy.generate(PROMPTS, params, use_tqdm=False)]
    small = LLM(build, backend="cpu", kv_cache_memory=4 * BLOCK_BYTES, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, max_model_len=64)
    engine = small.engine
    assert engine.kv.num_blocks < engine.kv.num_blocks_for(64)  # no sequence of max_model_len fits it whole
    finals = _drive(engine, [(f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == want
    _check_whole(engine)


def test_an_old_request_is_not_starved_by_a_stream_of_new_short_ones() -> None:
    """FCFS under preemption: a long request admitted first finishes while short ones keep arriving and the pool
    is too small for all; each output equals the request's output alone."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_scheduler import FakeRunner, make_request, solo, step

    kv = KVCacheManager(6, 2)
    sched = Scheduler(KvCoordinator((kv,)), 3, 4, 64, (0,))
    runner = FakeRunner(kv)
    old = make_request("old", [1, 2, 3, 4, 5], 6, ignore_eos=True)
    sched.add_request(old)
    everyone = [old]
    steps = 0
    while not old.is_finished:
        new = make_request(f"n{steps}", [6, 5, steps % 7], 2, ignore_eos=True)
        sched.add_request(new)  # one more short request every step
        everyone.append(new)
        batch, _ = step(sched, runner)
        assert not batch.is_empty
        steps += 1
        assert steps < 40, "the old request starves"
    assert sched.num_preemptions > 0  # the pool was under pressure
    while sched.has_unfinished():
        step(sched, runner)
    for req in everyone:
        assert req.output_token_ids == solo(req), req.request_id
    assert kv.num_free_blocks == kv.num_blocks
