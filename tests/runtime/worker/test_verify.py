"""Verifying drafts: greedy rows keep the argmax run; sampled rows are distributed as the target samples them, and a
seeded row yields the token one-at-a-time sampling draws at its output index."""

from __future__ import annotations

import math

import torch

from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.sampler import Sampler
from pllm.runtime.worker.step import DraftInputs, SampleInputs, SeqStep, StepBatch
from pllm.runtime.worker.verify import sample_step

VOCAB = 8


def _step(params: SamplingParams, drafts: tuple[int, ...], rid: str = "r", num_out: int = 0) -> StepBatch:
    """One sequence with num_out tokens out verifying `drafts`: row j yields its output token num_out + j."""
    rows = tuple(SampleInputs(num_out + j, params, (), (), frozenset()) for j in range(len(drafts) + 1))
    draft = DraftInputs(drafts, rows) if drafts else None
    seq = SeqStep(rid, (5, *drafts), 3, (), True, 4, sample=rows[0], draft=draft)
    return StepBatch((seq,))


def _target(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target's sampling distribution of each row, straight from its definition: top_k then temperature."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    kth = probs.topk(params.top_k, dim=-1).values[:, -1:]
    probs = torch.where(probs >= kth, probs, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def test_greedy_accepts_the_argmax_run_and_corrects_the_first_miss():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0.0)
    sampler = Sampler(VOCAB)
    wrong = (best[1] + 1) % VOCAB
    assert sample_step(sampler, logits, _step(greedy, (best[0], best[1], best[2])))[0].token_ids == tuple(best)
    out = sample_step(sampler, logits, _step(greedy, (best[0], wrong, best[2])))[0]
    assert out.token_ids == (best[0], best[1]) and out.num_draft_tokens == 3


def test_sampled_tokens_follow_the_target_distribution():
    """First token ~ p0 whatever the draft; the second exists only after an accepted draft and then ~ p1."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, VOCAB, generator=gen) * 1.5
    params = SamplingParams(temperature=0.7, top_k=6)
    p = _target(logits, params)
    draft = int(p[0].argsort()[-2])  # a likely token, not the likeliest: both outcomes are common
    sampler = Sampler(VOCAB, seed=0)
    step = _step(params, (draft,))
    trials = 6000
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB)
    for _ in range(trials):
        tokens = sample_step(sampler, logits, step)[0].token_ids
        first[tokens[0]] += 1
        assert (len(tokens) == 2) == (tokens[0] == draft)
        if len(tokens) == 2:
            second[tokens[1]] += 1
    accepted = second.sum()
    for counts, n, probs in ((first, trials, p[0]), (second, accepted, p[1])):
        for t in range(VOCAB):
            q = float(probs[t])
            bound = 4.5 * math.sqrt(q * (1 - q) / float(n)) + 1e-9  # 4.5 sigma: fails by chance ~1e-5 per token
            assert abs(float(counts[t]) / float(n) - q) <= bound, (t, float(counts[t]) / float(n), q)
    assert float(p[0].min()) == 0.0 and first[int(p[0].argmin())] == 0  # top_k's cut tokens never come


def test_a_draft_outside_top_k_is_never_accepted():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]] * 2)
    params = SamplingParams(temperature=1.0, top_k=2, seed=3)
    sampler = Sampler(VOCAB)
    for _ in range(50):
        tokens = sample_step(sampler, logits, _step(params, (7,)))[0].token_ids
        assert len(tokens) == 1 and tokens[0] in (0, 1)


def test_seeded_rows_repeat():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.0, seed=11)
    runs = [[sample_step(Sampler(VOCAB), logits, _step(params, (1, 2)))[0].token_ids for _ in range(20)]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_seeded_tokens_are_one_at_a_time_sampling_whatever_the_guesses():
    """A seeded sequence's token at each output index is the one sampling that row alone draws, so a step's
    tokens do not depend on how many guesses it verifies, nor on which of them were right."""
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(4)) * 0.3  # flat: guesses often miss
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=2024)
    for num_out in (0, 7):
        alone = [Sampler(VOCAB).sample(logits[j : j + 1], _step(params, (), num_out=num_out + j).sampling)
                 .token_ids[0] for j in range(5)]
        # every guess right: the step keeps all five rows' tokens, each the lone draw at its index
        assert sample_step(Sampler(VOCAB), logits, _step(params, tuple(alone[:4]), num_out=num_out))[0].token_ids \
            == tuple(alone)
        for num_drafts in range(1, 5):
            for miss in range(num_drafts):  # guesses right before `miss`, wrong at it
                drafts = tuple(alone[:miss]) + ((alone[miss] + 1) % VOCAB,) + tuple(alone[miss + 1 : num_drafts])
                out = sample_step(Sampler(VOCAB, seed=miss), logits[: num_drafts + 1],
                                  _step(params, drafts, num_out=num_out))[0]
                assert out.token_ids == tuple(alone[: miss + 1]), (num_out, num_drafts, miss)
    # and other seeds or indices give other draws (the index is part of the key)
    draws = {Sampler(VOCAB).sample(logits[:1], _step(SamplingParams(temperature=1.0, seed=s), (), num_out=i)
                                   .sampling).token_ids[0] for s in range(4) for i in range(4)}
    assert len(draws) > 1
