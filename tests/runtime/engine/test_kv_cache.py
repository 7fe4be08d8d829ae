"""KVCacheManager: allocation, ref counts, prefix hits, LRU eviction, a stateful model of block ownership."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pllm.runtime.engine.kv_cache import KVCacheManager, PrefixCacheStats, PrefixHit
from pllm.runtime.engine.request import Request
from pllm.runtime.engine.sampling_params import SamplingParams


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams())


def admit(kv: KVCacheManager, req: Request, num_new_tokens: int | None = None) -> PrefixHit:
    """What the scheduler does at admission: look up the prefix, allocate, mark the hit as computed."""
    hit = kv.get_computed_blocks(req)
    num_new = req.num_tokens - hit.num_tokens if num_new_tokens is None else num_new_tokens
    assert kv.allocate_slots(req, num_new, hit)
    req.num_computed_tokens = hit.num_tokens
    return hit


def compute(kv: KVCacheManager, req: Request, num_new_tokens: int) -> None:
    """What update does after the runner computed num_new_tokens of req."""
    req.num_computed_tokens += num_new_tokens
    kv.cache_full_blocks(req)


def check_invariants(kv: KVCacheManager, live: list[Request]) -> None:
    """Ref counts equal ownership, the free list holds exactly the unowned blocks, shared blocks are full."""
    holdings = Counter(b for r in live for b in r.block_ids)
    for b in range(kv.num_blocks):
        assert kv._ref_counts[b] == holdings[b] >= 0
        assert (b in kv._free) == (holdings[b] == 0)
    assert kv.num_free_blocks == kv.num_blocks - len(holdings)
    assert sum(h is not None for h in kv._block_hashes) == len(kv._hash_to_block)
    for h, b in kv._hash_to_block.items():
        assert kv._block_hashes[b] == h
    bs = kv.block_size
    for r in live:
        assert len(set(r.block_ids)) == len(r.block_ids), "a block twice in one table"
        assert len(r.block_ids) * bs >= r.num_computed_tokens
        for i, b in enumerate(r.block_ids):
            if holdings[b] > 1:  # shared: nobody may still write into it
                assert (i + 1) * bs <= r.num_computed_tokens, (r.request_id, i, b)


def test_allocate_and_free_return_the_pool() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(10)))  # 3 blocks
    assert kv.allocate_slots(a, 10)
    assert len(a.block_ids) == 3 and kv.num_free_blocks == 1 and kv.usage == 0.75
    b = make_request("b", list(range(8)))
    assert not kv.allocate_slots(b, 8)  # needs 2, 1 free: no side effects
    assert b.block_ids == [] and kv.num_free_blocks == 1
    compute(kv, a, 10)
    assert kv.allocate_slots(a, 2)  # 12 tokens still fit in 3 blocks
    assert len(a.block_ids) == 3
    kv.free(a)
    assert a.block_ids == [] and kv.num_free_blocks == 4 and kv.usage == 0.0


def test_repeated_prompt_hits_full_blocks_only_after_compute() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = make_request("a", prompt)
    admit(kv, a)
    b = make_request("b", prompt)
    assert kv.get_computed_blocks(b).num_tokens == 0  # a's KV is not computed yet: nothing registered
    compute(kv, a, 10)
    hit = admit(kv, b)
    assert hit.num_tokens == 8 and hit.block_ids == tuple(a.block_ids[:2])
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert kv.num_prefix_queries == 20 and kv.num_prefix_hits == 8
    check_invariants(kv, [a, b])
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16


def test_a_readmission_after_preemption_is_counted_apart_from_prefix_queries_and_hits() -> None:
    """As vLLM's PrefixCacheStats: a preempted request re-finding its own blocks is no prefix sharing, so it goes to
    preempted_*, never to the queries and hits the prefix_cache metrics and the hit rate read."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    compute(kv, a, 10)
    kv.free(a)  # what the scheduler's preemption does
    a.num_computed_tokens, a.num_preemptions = 0, 1
    assert admit(kv, a).num_tokens == 8  # its own two full blocks, still cached
    assert kv.prefix_cache_stats == PrefixCacheStats(requests=1, queries=10, hits=0, preempted_requests=1,
                                                     preempted_queries=10, preempted_hits=8)
    assert kv.num_prefix_queries == 10 and kv.num_prefix_hits == 0
    b = make_request("b", list(range(10)))  # a new request sharing the prefix: a real hit
    admit(kv, b)
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (20, 8)
    assert kv.prefix_cache_stats + kv.prefix_cache_stats == PrefixCacheStats(4, 40, 16, 2, 20, 16)


def test_fully_cached_prompt_leaves_one_block_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(8)))  # exactly 2 blocks
    admit(kv, a)
    compute(kv, a, 8)
    kv.free(a)
    b = make_request("b", list(range(8)))
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 4  # the last block is recomputed, so the step yields logits
    c = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(c).num_tokens == 8


def test_hash_chains_over_the_parent() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    compute(kv, a, 5)
    b = make_request("b", [9, 9, 3, 4, 5])  # same second block, different first: no hit
    assert kv.get_computed_blocks(b).num_tokens == 0
    c = make_request("c", [1, 2, 3, 9, 5])
    assert kv.get_computed_blocks(c).num_tokens == 2


def test_lru_eviction_prefers_uncached_then_oldest() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3])  # block 0 full + cached, block 1 partial
    admit(kv, a)
    compute(kv, a, 3)
    kv.free(a)
    b = make_request("b", [5, 6, 7])
    admit(kv, b)
    compute(kv, b, 3)
    kv.free(b)
    assert kv.num_free_blocks == 4  # cached blocks count as free
    # One fresh block: the uncached partial blocks go first, both cached prefixes survive.
    c = make_request("c", [8])
    assert kv.allocate_slots(c, 1)
    assert kv.get_computed_blocks(make_request("x", [1, 2, 0])).num_tokens == 2
    assert kv.get_computed_blocks(make_request("y", [5, 6, 0])).num_tokens == 2
    # Two more: one uncached left, then the least recently freed cached block (a's) is evicted.
    assert kv.allocate_slots(c, 5)  # 3 blocks in all: 2 fresh
    assert kv.get_computed_blocks(make_request("x", [1, 2, 0])).num_tokens == 0
    assert kv.get_computed_blocks(make_request("y", [5, 6, 0])).num_tokens == 2
    check_invariants(kv, [c])


def test_reviving_a_free_cached_block_counts_against_free_space() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=2)
    a = make_request("a", [1, 2, 3])
    admit(kv, a)
    compute(kv, a, 3)
    kv.free(a)
    b = make_request("b", [1, 2, 3, 4, 5])  # hit on 1 block (free, cached) + 2 fresh: 3 > 2
    hit = kv.get_computed_blocks(b)
    assert hit.num_tokens == 2
    assert not kv.allocate_slots(b, 3, hit)
    assert b.block_ids == [] and kv.num_free_blocks == 2 and kv.num_prefix_queries == 3
    assert kv.allocate_slots(b, 1, hit)  # a chunk that fits
    assert b.block_ids[0] == hit.block_ids[0]
    check_invariants(kv, [b])


def test_concurrent_duplicate_prefix_registers_once() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [1, 2, 3])
    admit(kv, a)
    admit(kv, b)  # neither computed yet: both miss
    compute(kv, a, 3)
    compute(kv, b, 3)
    assert len(kv._hash_to_block) == 1
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    assert kv.get_computed_blocks(make_request("c", [1, 2, 3])).num_tokens == 2


def test_reset_and_disabled_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3])
    admit(kv, a)
    compute(kv, a, 3)
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3])).num_tokens == 0
    kv.free(a)
    assert kv.num_free_blocks == 8
    off = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    c = make_request("c", [1, 2, 3])
    admit(off, c)
    compute(off, c, 3)
    assert off.get_computed_blocks(make_request("d", [1, 2, 3])).num_tokens == 0
    assert off.num_prefix_queries == 0


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)


class KVMachine(RuleBasedStateMachine):
    """Requests are admitted (with prefix hits), computed in chunks, grown by decode tokens, and freed.

    A fake KV store records which token each slot holds; every computed position of every live request must
    read back its own token through its block table, so a wrong prefix hit or a clobbered shared block shows.
    """

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.kv = KVCacheManager(num_blocks, block_size)
        self.live: list[Request] = []
        self.store: dict[int, list[int | None]] = {}
        self.next_id = 0

    def _write(self, req: Request, num_new: int) -> None:
        bs = self.kv.block_size
        for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
            block_id = req.block_ids[pos // bs]
            assert self.kv._ref_counts[block_id] == 1, "writing into a shared block"
            self.store.setdefault(block_id, [None] * bs)[pos % bs] = req.all_token_ids[pos]

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
        suffix=st.lists(st.integers(0, 3), min_size=1, max_size=6),
        chunk=st.integers(1, 8),
    )
    def admit(self, prefix: list[int], suffix: list[int], chunk: int) -> None:
        req = make_request(f"r{self.next_id}", prefix + suffix)
        self.next_id += 1
        hit = self.kv.get_computed_blocks(req)
        assert hit.num_tokens < req.num_tokens
        num_new = min(chunk, req.num_tokens - hit.num_tokens)
        free_before = self.kv.num_free_blocks
        if not self.kv.allocate_slots(req, num_new, hit):
            assert req.block_ids == [] and self.kv.num_free_blocks == free_before
            self.kv.free(req)
            return
        req.num_computed_tokens = hit.num_tokens
        self.live.append(req)
        self._write(req, num_new)
        compute(self.kv, req, num_new)

    @rule(data=st.data(), chunk=st.integers(1, 8), new_token=st.integers(0, 3))
    def step(self, data: st.DataObject, chunk: int, new_token: int) -> None:
        if not self.live:
            return
        req = data.draw(st.sampled_from(self.live))
        if req.num_computed_tokens == req.num_tokens:  # sequence computed: a decode appends a token
            req.output_token_ids.append(new_token)
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        if self.kv.allocate_slots(req, num_new):
            self._write(req, num_new)
            compute(self.kv, req, num_new)

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        if not self.live:
            return
        req = data.draw(st.sampled_from(self.live))
        self.live.remove(req)
        self.kv.free(req)

    @rule()
    def reset(self) -> None:
        self.kv.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "kv"):
            return
        check_invariants(self.kv, self.live)
        bs = self.kv.block_size
        for req in self.live:
            for pos in range(req.num_computed_tokens):
                assert self.store[req.block_ids[pos // bs]][pos % bs] == req.all_token_ids[pos]

    def teardown(self) -> None:
        if hasattr(self, "kv"):
            for req in self.live:
                self.kv.free(req)
            assert self.kv.num_free_blocks == self.kv.num_blocks


KVMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestKVMachine = KVMachine.TestCase
