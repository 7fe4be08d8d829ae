"""Scheduler: budgets, FCFS, chunked prefill, prefix hits, preemption, stop rules, and a stateful model."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pllm.runtime.engine.kv_cache import KVCacheManager
from pllm.runtime.engine.kv_coordinator import KvCoordinator
from pllm.runtime.engine.request import FinishReason, Pooling, Request, RequestStatus, ScheduledBatch
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.scheduler import Scheduler

EOS = 0
VOCAB = 7


def next_token(context: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context, as attention does."""
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


class FakeRunner:
    """Writes each scheduled token into a fake paged KV store and samples from what the store holds."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.store: dict[int, list[int | None]] = {}
        self.pooled: dict[str, list[int]] = {}  # pooling request -> positions computed since its admission

    def execute(self, batch: ScheduledBatch) -> dict[str, int]:
        bs = self.kv.block_size
        sampled: dict[str, int] = {}
        for seq in batch.seqs:
            req = seq.request
            assert req.status is RequestStatus.RUNNING
            start = req.num_computed_tokens
            assert len(req.block_ids) * bs >= start + seq.num_new_tokens
            for pos in range(start, start + seq.num_new_tokens):
                block_id = req.block_ids[pos // bs]
                assert self.kv._ref_counts[block_id] == 1, "writing into a shared block"
                self.store.setdefault(block_id, [None] * bs)[pos % bs] = req.all_token_ids[pos]
            if req.pooling is not None:
                assert not seq.samples
                self.pooled.setdefault(req.request_id, []).extend(range(start, start + seq.num_new_tokens))
            if seq.completes:
                context = [self.store[req.block_ids[p // bs]][p % bs] for p in range(req.num_tokens)]
                assert context == req.all_token_ids, "the KV read back is not the sequence's"
            if seq.samples:
                sampled[req.request_id] = next_token(context)
        return sampled


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(**params), max_tokens=max_tokens)


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64):
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(KvCoordinator((kv,)), max_num_seqs, max_num_batched_tokens, max_model_len, (EOS,))
    return kv, sched, FakeRunner(kv)


def step(sched: Scheduler, runner: FakeRunner) -> tuple[ScheduledBatch, list[Request]]:
    batch = sched.schedule()
    assert batch.num_tokens <= sched.max_num_batched_tokens and len(batch.seqs) <= sched.max_num_seqs
    return batch, sched.update(batch, runner.execute(batch))


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> list[Request]:
    finished: list[Request] = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        finished += step(sched, runner)[1]
    raise AssertionError("the scheduler made no progress")


def solo(req: Request, max_model_len: int = 64) -> list[int]:
    """The output of the same request run alone with a roomy cache."""
    _, sched, runner = make(num_blocks=256, max_model_len=max_model_len)
    alone = Request(req.request_id, list(req.prompt_token_ids), req.params, max_tokens=req.max_tokens)
    sched.add_request(alone)
    run_all(sched, runner)
    return alone.output_token_ids


def test_chunked_prefill_respects_the_budget_and_decodes_go_first() -> None:
    kv, sched, runner = make(max_num_batched_tokens=8)
    a = make_request("a", [1] * 20, max_tokens=3, ignore_eos=True)
    sched.add_request(a)
    sizes = []
    while not a.output_token_ids:
        batch, _ = step(sched, runner)
        sizes.append(batch.num_tokens)
    assert sizes == [8, 8, 4]
    b = make_request("b", [2] * 12, max_tokens=3, ignore_eos=True)
    sched.add_request(b)
    batch, _ = step(sched, runner)
    assert [(s.request.request_id, s.num_new_tokens) for s in batch.seqs] == [("a", 1), ("b", 7)]
    run_all(sched, runner)
    assert a.finish_reason is FinishReason.LENGTH and len(a.output_token_ids) == 3
    assert kv.num_free_blocks == kv.num_blocks


def test_fcfs_and_max_num_seqs() -> None:
    _, sched, runner = make(max_num_seqs=2)
    reqs = [make_request(f"r{i}", [i + 1] * 3, max_tokens=2, ignore_eos=True) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    order = []
    while sched.has_unfinished():
        batch, finished = step(sched, runner)
        assert sched.num_running <= 2
        order += [r.request_id for r in finished]
    assert order == [r.request_id for r in reqs]


def test_prefix_hit_on_a_repeated_prompt_gives_the_same_output() -> None:
    kv, sched, runner = make(block_size=4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    a = make_request("a", prompt, max_tokens=5, ignore_eos=True)
    sched.add_request(a)
    run_all(sched, runner)
    b = make_request("b", prompt, max_tokens=5, ignore_eos=True)
    sched.add_request(b)
    batch, _ = step(sched, runner)
    assert b.num_cached_tokens == 8 and batch.seqs[0].num_new_tokens == 2
    run_all(sched, runner)
    assert b.output_token_ids == a.output_token_ids
    assert kv.num_prefix_hits == 8 and kv.num_prefix_queries == 20
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption_under_a_tiny_pool_finishes_everything_correctly() -> None:
    kv, sched, runner = make(num_blocks=6, block_size=2, max_num_batched_tokens=16)
    reqs = [make_request(f"r{i}", [i % 5 + 1, 2, 3], max_tokens=8, ignore_eos=True) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    finished = run_all(sched, runner)
    assert sched.num_preemptions > 0 and sum(r.num_preemptions for r in reqs) == sched.num_preemptions
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    for r in reqs:
        assert r.finish_reason is FinishReason.LENGTH and r.output_token_ids == solo(r)
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption_does_not_inflate_prefix_cache_hits() -> None:
    """Prompts sharing nothing, in a pool too small for them all: every readmission re-finds the request's own
    blocks, which vLLM counts apart (preempted_*); the prefix queries are the prompts' tokens, once, and no hit."""
    kv, sched, runner = make(num_blocks=9, block_size=2, max_num_batched_tokens=16)
    reqs = [make_request(f"r{i}", [i + 1, i + 1, 6, 5], max_tokens=8, ignore_eos=True) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    run_all(sched, runner)
    stats = kv.prefix_cache_stats
    assert sched.num_preemptions > 0 and stats.preempted_requests == sched.num_preemptions
    assert stats.preempted_hits > 0  # readmissions did hit their own blocks
    assert (stats.requests, stats.queries, stats.hits) == (6, 24, 0)


def test_preempted_request_goes_back_to_the_front_of_the_queue() -> None:
    _, sched, runner = make(num_blocks=4, block_size=2, max_num_seqs=2)
    a, b, c = (make_request(x, [1, 2, 3], max_tokens=5, ignore_eos=True) for x in "abc")
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, runner)  # a and b prefill 2 blocks each; c waits on max_num_seqs
    step(sched, runner)  # decodes fit in the blocks they hold
    batch, _ = step(sched, runner)  # a needs a third block: b, the newest, is preempted
    assert batch.preempted == (b,) and [s.request for s in batch.seqs] == [a]
    assert list(sched.waiting) == [b, c] and b.num_computed_tokens == 0 and len(b.output_token_ids) == 2
    run_all(sched, runner)
    assert b.output_token_ids == solo(b)


def test_the_newest_request_preempts_itself_when_it_alone_needs_a_block() -> None:
    kv, sched, runner = make(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3], max_tokens=5, ignore_eos=True)  # KV for 3 tokens: 2 blocks
    b = make_request("b", [4, 5, 6, 1], max_tokens=4, ignore_eos=True)  # KV for 4 tokens: 2 blocks, full
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    batch, _ = step(sched, runner)  # a decodes into its 2nd block; b needs a 3rd block and is the newest
    assert batch.preempted == (b,) and [s.request for s in batch.seqs] == [a]
    run_all(sched, runner)
    assert a.output_token_ids == solo(a) and b.output_token_ids == solo(b)
    assert kv.num_free_blocks == kv.num_blocks


def test_add_request_rejects_what_can_never_run() -> None:
    _, sched, _ = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request("e", []))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request("long", [1] * 32))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request(make_request("big", [1] * 10, max_tokens=10))
    sched.add_request(make_request("fits", [1] * 10, max_tokens=7))  # 16 tokens of KV at most
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("fits", [1]))


@pytest.mark.parametrize(
    ("params", "max_tokens", "max_model_len", "reason", "num_out"),
    [
        ({}, 10, 64, FinishReason.STOP, 1),  # EOS
        ({"ignore_eos": True}, 10, 64, FinishReason.LENGTH, 10),
        ({"ignore_eos": True}, 50, 12, FinishReason.LENGTH, 9),  # max_model_len: 3 + 9 = 12
        ({"min_tokens": 6}, 10, 64, FinishReason.STOP, 6),  # EOS only counts from the 6th token
        ({"min_tokens": 6}, 4, 64, FinishReason.LENGTH, 4),  # a length limit is never deferred
    ],
)
def test_stop_conditions(params, max_tokens, max_model_len, reason, num_out) -> None:
    class EOSRunner(FakeRunner):
        def execute(self, batch):
            return {k: EOS for k in super().execute(batch)}

    kv = KVCacheManager(64, 4)
    sched = Scheduler(KvCoordinator((kv,)), 4, 64, max_model_len, (EOS,))
    r = make_request("r", [1, 2, 3], max_tokens=max_tokens, **params)
    sched.add_request(r)
    run_all(sched, EOSRunner(kv))
    assert r.finish_reason is reason and len(r.output_token_ids) == num_out
    assert r.status is RequestStatus.FINISHED and kv.num_free_blocks == 64


def test_stop_token_ids() -> None:
    _, sched, runner = make()
    r = make_request("r", [1, 2, 3], max_tokens=30, ignore_eos=True)
    sched.add_request(r)
    run_all(sched, runner)
    want = r.output_token_ids[2]
    s = make_request("s", [1, 2, 3], max_tokens=30, ignore_eos=True, stop_token_ids=[want])
    sched.add_request(s)
    run_all(sched, runner)
    assert s.finish_reason is FinishReason.STOP and s.output_token_ids[-1] == want
    assert want not in s.output_token_ids[:-1]


def test_abort_and_finish_free_blocks_at_once() -> None:
    kv, sched, runner = make(max_num_seqs=1)
    a = make_request("a", [1] * 9, max_tokens=5)
    b = make_request("b", [2] * 9, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    assert a.block_ids and sched.num_waiting == 1
    sched.abort_request("b")  # waiting
    sched.finish_request("a", FinishReason.STOP)  # running, e.g. a stop string
    assert (a.finish_reason, b.finish_reason) == (FinishReason.STOP, FinishReason.ABORT)
    assert kv.num_free_blocks == kv.num_blocks and not sched.has_unfinished()
    assert sched.get_request("a") is None
    sched.abort_request("a")  # already finished: ignored
    assert step(sched, runner)[0].is_empty


class SchedulerMachine(RuleBasedStateMachine):
    """Any interleaving of add, step, abort and finish keeps the block pool consistent, and every request that
    ends by its own stop rules produces exactly what it produces alone."""

    @initialize(
        num_blocks=st.integers(3, 10),
        block_size=st.integers(1, 3),
        max_num_seqs=st.integers(1, 4),
        max_num_batched_tokens=st.integers(1, 16),
    )
    def setup(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens) -> None:
        self.kv, self.sched, self.runner = make(
            num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len=24
        )
        self.all: list[Request] = []
        self.cut: set[str] = set()  # aborted or finished from outside: their output is partial

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]),
        suffix=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=5),
        max_tokens=st.integers(1, 8),
        ignore_eos=st.booleans(),
    )
    def add(self, prefix, suffix, max_tokens, ignore_eos) -> None:
        req = make_request(f"r{len(self.all)}", prefix + suffix, max_tokens, ignore_eos=ignore_eos)
        max_len = min(req.num_tokens + max_tokens, 24)
        try:
            self.sched.add_request(req)
        except ValueError:
            assert self.kv.num_blocks_for(max_len - 1) > self.kv.num_blocks
            return
        self.all.append(req)

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]),
        suffix=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=12),
        pooling=st.sampled_from(list(Pooling)),
    )
    def add_embedding(self, prefix, suffix, pooling) -> None:
        req = Request(f"r{len(self.all)}", prefix + suffix, SamplingParams(), max_tokens=0, pooling=pooling)
        try:
            self.sched.add_request(req)
        except ValueError:
            assert self.kv.num_blocks_for(req.num_tokens) > self.kv.num_blocks
            return
        self.all.append(req)

    @rule(num_steps=st.integers(1, 6))
    def run_steps(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self.step()

    def step(self) -> None:
        if not self.sched.has_unfinished():
            assert self.sched.schedule().is_empty
            return
        before = {r.request_id for r in self.sched.running}
        num_hits = self.kv.num_prefix_hits
        batch, finished = step(self.sched, self.runner)
        event("preemption" if batch.preempted else "no preemption")  # coverage: --hypothesis-show-statistics
        event("prefix hit" if self.kv.num_prefix_hits > num_hits else "no prefix hit")
        assert not batch.is_empty, "unfinished requests but nothing scheduled"
        for r in batch.preempted:
            assert r.status is RequestStatus.WAITING and r.request_id in before
            assert all(s.request is not r for s in batch.seqs)
            self.runner.pooled.pop(r.request_id, None)  # recomputed from its first token
        if self.sched.max_num_batched_tokens >= len(before):  # a token for each: a prefill chunk stalls none
            running = [s.request.request_id for s in batch.seqs if s.request.request_id in before]
            assert len(running) == len(before) - len(batch.preempted), "a running request skipped a step"
        for r in finished:
            assert r.status is RequestStatus.FINISHED and not r.block_ids

    @rule(data=st.data(), abort=st.booleans())
    def cut_short(self, data, abort) -> None:
        if not self.sched.has_unfinished():
            return
        req = data.draw(st.sampled_from(list(self.sched.running) + list(self.sched.waiting)))
        if abort:
            self.sched.abort_request(req.request_id)
        else:
            self.sched.finish_request(req.request_id, FinishReason.STOP)
        self.cut.add(req.request_id)
        assert req.is_finished and not req.block_ids

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "sched"):
            return
        kv, sched = self.kv, self.sched
        live = list(sched.running) + list(sched.waiting)
        assert len(sched.running) <= sched.max_num_seqs
        assert all(r.status is RequestStatus.RUNNING for r in sched.running)
        for r in sched.waiting:
            assert r.status is RequestStatus.WAITING and not r.block_ids and r.num_computed_tokens == 0
        holdings = Counter(b for r in live for b in r.block_ids)
        for b in range(kv.num_blocks):
            assert kv._ref_counts[b] == holdings[b] >= 0
            assert (b in kv._free) == (holdings[b] == 0)
        bs = kv.block_size
        for r in sched.running:
            assert len(set(r.block_ids)) == len(r.block_ids)
            for i, b in enumerate(r.block_ids):
                if holdings[b] > 1:  # shared only via the prefix cache: full and computed
                    assert (i + 1) * bs <= r.num_computed_tokens

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        for _ in range(1000):  # drain, checking the invariants after every step
            if not self.sched.has_unfinished():
                break
            self.step()
            self.consistent()
        assert not self.sched.has_unfinished(), "the scheduler made no progress"
        assert self.kv.num_free_blocks == self.kv.num_blocks
        for r in self.all:
            assert r.is_finished
            if r.request_id in self.cut:
                continue
            if r.pooling is not None:  # pooled over every position, each computed once, and nothing sampled
                assert r.finish_reason is FinishReason.STOP and not r.output_token_ids
                assert self.runner.pooled[r.request_id] == list(range(r.num_tokens)), r.request_id
                continue
            assert r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
            assert r.output_token_ids == solo(r, max_model_len=24), r.request_id


SchedulerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


class LengthClassRunner(FakeRunner):
    """Also records, per cached position, whether its K/V was computed with the sequence past `threshold` (what a
    longrope model's rotation depends on), and checks every sampling step reads K/V of its current class only."""

    def __init__(self, kv: KVCacheManager, threshold: int) -> None:
        super().__init__(kv)
        self.threshold = threshold
        self.classes: dict[int, list[bool | None]] = {}
        self.num_tokens_computed: dict[str, int] = Counter()

    def execute(self, batch: ScheduledBatch) -> dict[str, int]:
        bs = self.kv.block_size
        for seq in batch.seqs:
            req = seq.request
            past = req.num_tokens > self.threshold  # the table this step's tokens are rotated with
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + seq.num_new_tokens):
                self.classes.setdefault(req.block_ids[pos // bs], [None] * bs)[pos % bs] = past
            self.num_tokens_computed[req.request_id] += seq.num_new_tokens
            if seq.completes:
                read = {self.classes[req.block_ids[p // bs]][p % bs] for p in range(req.num_tokens)}
                assert read == {past}, (req.request_id, req.num_tokens, read)
        return super().execute(batch)


@pytest.mark.parametrize("budget, num_blocks", [(64, 64), (5, 64), (5, 5)])
def test_sequences_passing_the_recompute_length_are_computed_again(budget, num_blocks) -> None:
    """A sequence whose length passes recompute_past_len is computed again from its first token, once; a prompt
    already past it never is; outputs equal the same requests run alone; under chunking and preemption too."""
    threshold = 10
    kv = KVCacheManager(num_blocks, 4, enable_prefix_caching=False)  # as the engine makes it for such models
    sched = Scheduler(KvCoordinator((kv,)), 8, budget, 64, (EOS,), recompute_past_len=threshold)
    runner = LengthClassRunner(kv, threshold)
    crossing = make_request("crossing", [1, 2, 3, 4, 5, 6], max_tokens=8, ignore_eos=True)  # 6 -> 14 tokens
    long_prompt = make_request("long", list(range(1, 13)), max_tokens=4, ignore_eos=True)  # 12 -> 16 tokens
    short = make_request("short", [3, 1, 4], max_tokens=4, ignore_eos=True)  # 3 -> 7 tokens: never passes
    reference = {r.request_id: solo(r) for r in (crossing, long_prompt, short)}  # solo never recomputes
    for r in (crossing, long_prompt, short):
        sched.add_request(r)
    run_all(sched, runner)
    assert {r.request_id: r.output_token_ids for r in (crossing, long_prompt, short)} == reference
    assert (sched.num_preemptions > 0) == (num_blocks == 5)
    if sched.num_preemptions == 0:
        # crossing: 10 tokens with the short table (6 prompt + 4 decodes), then all 11 again, then 2 decodes
        assert runner.num_tokens_computed == {"crossing": 10 + 11 + 2, "long": 12 + 3, "short": 3 + 3}
    assert kv.num_free_blocks == kv.num_blocks
def test_an_encoder_scheduler_never_chunks_a_prompt():
    """chunk_prompts=False (encoders): inputs go whole into steps of at most the token budget, in FCFS order; one
    that does not fit the rest of a step waits for the next; one longer than the budget is refused."""
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(KvCoordinator((kv,)), max_num_seqs=8, max_num_batched_tokens=10, max_model_len=32,
                      eos_token_ids=(EOS,),
                      chunk_prompts=False)
    lens = [4, 5, 3, 10, 1]
    for i, n in enumerate(lens):
        sched.add_request(Request(f"e{i}", [1] * n, SamplingParams(), max_tokens=0, pooling=Pooling.MEAN))
    steps = []
    while sched.has_unfinished():
        batch = sched.schedule()
        assert all(s.num_new_tokens == s.request.num_prompt_tokens and s.completes for s in batch.seqs)
        steps.append([s.request.request_id for s in batch.seqs])
        sched.update(batch, {})
    # e2 is not split into the one token left beside e0 and e1; e4 would fit beside e2, but nobody overtakes e3
    assert steps == [["e0", "e1"], ["e2"], ["e3"], ["e4"]]
    assert kv.num_free_blocks == kv.num_blocks
    with pytest.raises(ValueError, match="input of 11 tokens exceeds max_num_batched_tokens 10"):
        sched.add_request(Request("long", [1] * 11, SamplingParams(), max_tokens=0, pooling=Pooling.MEAN))
