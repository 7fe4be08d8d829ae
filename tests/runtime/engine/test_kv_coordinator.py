"""KvCoordinator: one allocator per KV layer group, windowed groups returning the blocks that leave the window."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pllm.models.kv_groups import KvGroup
from pllm.runtime.engine.kv_cache import KVCacheManager
from pllm.runtime.engine.kv_coordinator import KvCoordinator
from pllm.runtime.engine.request import Request
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.scheduler import Scheduler

GLOBAL, WINDOWED = KvGroup((1,), None), KvGroup((0, 2), 6)


def two_groups(num_global: int, num_windowed: int, block_size: int, window: int = 6) -> KvCoordinator:
    return KvCoordinator((
        KVCacheManager(num_global, block_size, False, KvGroup((1,), None), 0),
        KVCacheManager(num_windowed, block_size, False, KvGroup((0, 2), window), 1),
    ))


def request(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, list(range(num_tokens)), SamplingParams())


def decode_bound(window: int, block_size: int) -> int:
    """Blocks a windowed table holds after a step: the window behind the next query, one block of misalignment."""
    return -(-(window - 1) // block_size) + 1


def test_decoding_long_keeps_the_windowed_table_bounded_and_returns_the_rest():
    kv = two_groups(64, 8, block_size=4)
    req = request("a", 3)
    assert kv.allocate_slots(req, 3)
    global_pool, windowed_pool = kv.managers
    for step in range(300):
        req.num_computed_tokens = req.num_tokens
        kv.advance(req)
        glob, win = req.block_tables
        assert glob.num_dropped == 0 and len(glob.block_ids) == -(-req.num_tokens // 4)
        assert len(win.block_ids) <= decode_bound(6, 4)
        assert win.num_dropped == WINDOWED.first_needed_block(req.num_computed_tokens, 4)
        assert windowed_pool.num_free_blocks == 8 - len(win.block_ids)
        if req.num_tokens == 240:
            break
        req.output_token_ids.append(step)
        assert kv.allocate_slots(req, 1)
    assert req.num_tokens == 240 and glob.num_dropped == 0
    assert win.num_dropped == (240 - 6 + 1) // 4  # position 235 on: the oldest key the next query sees
    kv.free(req)
    assert kv.num_free_blocks == kv.num_blocks and req.block_tables[1].num_dropped == 0


def test_a_prompt_chunk_holds_its_whole_window_and_the_earlier_queries_keys():
    """A chunk's first query still reads keys a window behind it: those blocks stay until the chunk is computed."""
    kv = two_groups(64, 64, block_size=4)
    req = request("a", 40)
    assert kv.allocate_slots(req, 16)
    req.num_computed_tokens = 16
    kv.advance(req)  # the next query (position 16) sees positions 11.. on: blocks 2.. stay
    assert req.block_tables[1].num_dropped == 2 and len(req.block_tables[1].block_ids) == 2
    assert kv.allocate_slots(req, 24)  # positions 16..39: the table covers 11..39 whole
    win = req.block_tables[1]
    assert win.num_dropped == 2 and win.num_blocks == 10


def test_allocation_is_all_or_nothing_across_groups():
    kv = two_groups(8, 2, block_size=4, window=9)  # a window of 9 needs 3 blocks behind a query
    a = request("a", 12)
    assert not kv.allocate_slots(a, 12)  # the global pool has room, the windowed one does not
    assert kv.num_free_blocks == kv.num_blocks and not a.holds_blocks
    assert kv.allocate_slots(a, 8)
    assert [len(t.block_ids) for t in a.block_tables] == [2, 2]


def test_prefix_caching_is_off_with_a_windowed_group():
    from pllm.runtime.worker.kv_budget import GroupBudget

    budgets = (GroupBudget(GLOBAL, 10, 1), GroupBudget(WINDOWED, 10, 2))
    assert not KvCoordinator.from_budgets(budgets, 4, enable_prefix_caching=True).enable_prefix_caching
    assert KvCoordinator.from_budgets(budgets[:1], 4, enable_prefix_caching=True).enable_prefix_caching


def test_a_request_that_cannot_fit_a_group_is_refused_naming_the_group():
    kv = two_groups(64, 2, block_size=4)
    sched = Scheduler(kv, 4, 8, 256, (0,))
    with pytest.raises(ValueError, match=r"window 6\).*only 2"):
        sched.add_request(request("a", 20))  # a chunk of 8 behind a window of 6 needs 5 windowed blocks


class CoordinatorMachine(RuleBasedStateMachine):
    """Random chunked prefills, decodes and frees over a global and a windowed pool: every group's ref counts equal
    its tables' holdings, windowed tables hold only their window, and a windowed table never outgrows its bound."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        window=st.integers(1, 12),
        num_global=st.integers(4, 24),
        num_windowed=st.integers(4, 12),
    )
    def setup(self, block_size, window, num_global, num_windowed) -> None:
        self.bs, self.window = block_size, window
        self.group = KvGroup((0,), window)
        self.kv = two_groups(num_global, num_windowed, block_size, window)
        self.live: list[Request] = []
        self.next_id = 0

    @rule(num_tokens=st.integers(1, 30), chunk=st.integers(1, 8))
    def admit(self, num_tokens, chunk) -> None:
        req = request(str(self.next_id), num_tokens)
        self.next_id += 1
        num_new = min(chunk, num_tokens)
        before = [m.num_free_blocks for m in self.kv.managers]
        if self.kv.allocate_slots(req, num_new):
            self._computed(req, num_new)
            self.live.append(req)
        else:
            assert [m.num_free_blocks for m in self.kv.managers] == before and not req.holds_blocks

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 8))
    def step(self, data, chunk) -> None:
        req = data.draw(st.sampled_from(self.live))
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(0)  # a decode: the sampled token is computed next step
        num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
        tables = [(t.num_dropped, list(t.block_ids)) for t in req.block_tables]
        if self.kv.allocate_slots(req, num_new):
            assert len(req.block_tables[1].block_ids) <= self.group.max_live_blocks(req.num_tokens, 8, self.bs)
            self._computed(req, num_new)
        else:
            assert [(t.num_dropped, t.block_ids) for t in req.block_tables] == tables

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data) -> None:
        req = data.draw(st.sampled_from(self.live))
        self.kv.free(req)
        self.live.remove(req)
        assert not req.holds_blocks

    def _computed(self, req: Request, num_new: int) -> None:
        req.num_computed_tokens += num_new
        self.kv.advance(req)
        glob, win = req.block_tables
        assert glob.num_blocks == win.num_blocks == -(-req.num_computed_tokens // self.bs)  # same positions
        assert win.num_dropped == self.group.first_needed_block(req.num_computed_tokens, self.bs)
        assert len(win.block_ids) <= decode_bound(self.window, self.bs)

    @invariant()
    def ownership(self) -> None:
        if not hasattr(self, "kv"):
            return
        for g, m in enumerate(self.kv.managers):
            holdings = Counter(b for r in self.live for b in r.block_tables[g].block_ids)
            assert all(n == 1 for n in holdings.values()), "no sharing without prefix caching"
            for b in range(m.num_blocks):
                assert m._ref_counts[b] == holdings[b]
                assert (b in m._free) == (holdings[b] == 0)
            assert m.num_free_blocks == m.num_blocks - len(holdings)
        assert self.kv.usage == max(m.usage for m in self.kv.managers)

    def teardown(self) -> None:
        if hasattr(self, "kv"):
            for r in self.live:
                self.kv.free(r)
            assert self.kv.num_free_blocks == self.kv.num_blocks


TestCoordinatorMachine = CoordinatorMachine.TestCase
TestCoordinatorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
