"""Speculation's bookkeeping without a model: a fake model reads the tokens it needs back out of a simulated paged
KV cache (through the step's block tables, as attention does), so a rolled-back draft left in a slot, a block
returned too early by a window or a wrong prefix hit changes its output. Random workloads (prompts, limits,
guess counts, cache sizes, window or prefix caching) must give every sequence the tokens it gets alone."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.models.kv_groups import KvGroup
from pllm.runtime.engine.config import SpeculativeConfig
from pllm.runtime.engine.kv_cache import KVCacheManager
from pllm.runtime.engine.kv_coordinator import KvCoordinator
from pllm.runtime.engine.request import Request, RequestStatus
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.scheduler import Scheduler
from pllm.runtime.worker.sampler import Sampler
from pllm.runtime.worker.step import StepBatch
from pllm.runtime.worker.verify import sample_step

VOCAB = 11  # small: the fake model falls into loops the n-gram lookup predicts, and leaves them
EOS = 0
BLOCK = 4
WINDOW = 6  # the windowed group's: the fake model reads 2 tokens back, always inside it


def next_token(prev2: int, prev1: int) -> int:
    """The fake model: the next token from the two before it."""
    return (prev1 * 5 + prev2 * 3 + (prev1 == prev2)) % VOCAB


def alone(prompt: list[int], max_tokens: int, ignore_eos: bool) -> list[int]:
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        seq.append(next_token(seq[-2], seq[-1]))
        out.append(seq[-1])
        if seq[-1] == EOS and not ignore_eos:
            break
    return out


class FakeRunner:
    """Writes each computed token into its slot of every group's pool; reads the two tokens before each row from
    the step's own tokens or, before the step, from the pool through the block table."""

    def __init__(self, num_groups: int, num_blocks: int) -> None:
        self.pools = [[None] * (num_blocks * BLOCK) for _ in range(num_groups)]

    def execute(self, step: StepBatch) -> torch.Tensor:
        rows = []
        for seq in step.seqs:
            tokens = {}
            for g, table in enumerate(seq.block_tables):
                def slot(p, table=table):
                    assert p // BLOCK >= table.first_block, f"position {p} read after its block was returned"
                    return table.block_ids[p // BLOCK - table.first_block] * BLOCK + p % BLOCK

                for p in range(seq.start_position - 2, seq.start_position):
                    if p >= 0:
                        tokens.setdefault(p, self.pools[g][slot(p)])
                        assert tokens[p] == self.pools[g][slot(p)], "groups disagree"
                for i, t in enumerate(seq.token_ids):
                    self.pools[g][slot(seq.start_position + i)] = t
            for i, t in enumerate(seq.token_ids):
                tokens[seq.start_position + i] = t
            assert None not in tokens.values(), "read a slot never written"
            for p in range(seq.end_position - seq.num_scored_rows, seq.end_position):
                row = torch.full((VOCAB,), -10.0)
                row[next_token(tokens[p - 1], tokens[p]) if p >= 1 else 1] = 10.0
                rows.append(row)
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)


def run(specs, k, lookup, budget, max_seqs, num_blocks, windowed, caching, rounds=2):
    groups = [KVCacheManager(num_blocks, BLOCK, caching and not windowed, KvGroup((0,), None), 0)]
    if windowed:
        groups.append(KVCacheManager(num_blocks, BLOCK, False, KvGroup((1,), WINDOW), 1))
    kv = KvCoordinator(tuple(groups))
    speculative = SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_max=lookup[1],
                                    prompt_lookup_min=lookup[0]) if k else None
    scheduler = Scheduler(kv, max_seqs, budget, 200, (EOS,), speculative=speculative)
    runner, sampler = FakeRunner(len(groups), num_blocks), Sampler(VOCAB)
    for r in range(rounds):  # the second round meets the first's cached blocks
        requests = []
        for i, (prompt, max_tokens, ignore_eos) in enumerate(specs):
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
            request = Request(f"{r}-{i}", list(prompt), params, max_tokens=max_tokens)
            scheduler.add_request(request)
            requests.append(request)
        for _ in range(2000):
            if not scheduler.has_unfinished():
                break
            batch = scheduler.schedule()
            step = batch.snapshot(scheduler.stop)
            out = sample_step(sampler, runner.execute(step), step)
            sampling = [s.request for s in batch.seqs if s.samples]
            scheduler.update(batch, {q.request_id: o.token_ids for q, o in zip(sampling, out, strict=True)})
            for q in scheduler.running:  # every table covers exactly the computed tokens between steps
                for m in kv.managers:
                    assert m.table(q).num_blocks == m.num_blocks_for(q.num_computed_tokens), q.request_id
        assert not scheduler.has_unfinished()
        assert kv.num_free_blocks == kv.num_blocks
        for request, (prompt, max_tokens, ignore_eos) in zip(requests, specs, strict=True):
            assert request.status is RequestStatus.FINISHED
            assert request.output_token_ids == alone(prompt, max_tokens, ignore_eos), request.request_id
    return scheduler


prompts = st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=14)
workloads = st.lists(st.tuples(prompts, st.integers(1, 30), st.booleans()), min_size=1, max_size=5)


@settings(max_examples=examples(60), deadline=None)
@given(
    specs=workloads,
    k=st.integers(0, 6),
    lookup=st.sampled_from([(1, 1), (1, 3), (2, 4)]),
    budget=st.integers(8, 24),
    max_seqs=st.integers(1, 4),
    num_blocks=st.integers(13, 30),  # a 44-token sequence needs 11 blocks; fewer than all need: preemptions
    windowed=st.booleans(),
    caching=st.booleans(),
)
def test_random_workloads_equal_decoding_alone(specs, k, lookup, budget, max_seqs, num_blocks, windowed, caching):
    run(specs, k, lookup, budget, max_seqs, num_blocks, windowed, caching)


def test_drafts_are_accepted_rejected_and_preempted_here():
    """The fixed workload the random ones vary: guesses both ways, preemptions, prefix hits, a windowed group."""
    specs = [([1, 2, 3, 1, 2], 30, True), ([4, 4, 4], 25, False), ([7, 3, 9, 7, 3], 30, True), ([5, 6], 28, True)]
    for windowed, caching in ((False, True), (True, False)):
        scheduler = run(specs, 4, (1, 3), 12, 4, 12, windowed, caching)
        stats = scheduler.spec_stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
        assert scheduler.num_preemptions > 0
        if caching:
            assert scheduler.kv.num_prefix_hits > 0
