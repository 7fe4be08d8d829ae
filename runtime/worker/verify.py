"""A step's logits -> each sampling sequence's new tokens; drafted tokens verified by rejection sampling.

Speculative decoding with a one-hot draft distribution (n-gram guesses): the draft token d at a scored row is
accepted with probability p(d) under the target's sampling distribution p (after every logits processor,
temperature, top-k/top-p/min-p), else the row's token is drawn from the residual max(p - onehot(d), 0), normalised,
and the sequence stops there; when every draft is accepted the last row yields one more token from p. The tokens
are then distributed exactly as the target samples them one at a time (Leviathan et al. 2023; vLLM's rejection
sampler does the same with q = onehot). A greedy row accepts d exactly when d is its argmax, and otherwise yields
the argmax: greedy output is that of decoding without drafts. Logprobs are the target's, from the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm.runtime.worker.logprobs import TokenLogprobs, gather_logprobs, raw_logprobs_of
from pllm.runtime.worker.sampler import Sampler, greedy_ids
from pllm.runtime.worker.step import StepBatch


@dataclass(frozen=True)
class SampledTokens:
    """One sampling sequence's result of a step."""

    token_ids: tuple[int, ...]  # the accepted drafts, then the token after them (one token without drafts)
    logprobs: tuple[TokenLogprobs, ...] | None  # one per token; None when its params do not ask for logprobs
    num_draft_tokens: int = 0  # drafts verified (len(token_ids) - 1 of them were accepted)


def sample_step(sampler: Sampler, logits: torch.Tensor, step: StepBatch) -> list[SampledTokens]:
    """The tokens of each sequence of `step` that samples, in batch order; logits [num_scored_rows, vocab_size]."""
    rows = step.sampling
    if not step.has_drafts:
        out = sampler.sample(logits, rows)
        return [SampledTokens((t,), (lp,) if lp is not None else None) for t, lp in zip(out.token_ids, out.logprobs)]
    assert tuple(logits.shape) == (len(rows), sampler.vocab_size), (tuple(logits.shape), len(rows))
    raw_logprobs = raw_logprobs_of(logits, rows)  # before anything below changes the logits
    processed = sampler.process_logits(logits, rows)  # [num_rows, vocab_size] float32
    greedy = greedy_ids(processed).tolist()  # [num_rows]: every row's, read by the greedy ones
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs: dict[int, torch.Tensor] = {}
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        dist = sampler.probs(processed[index], [rows[i] for i in random_rows])  # [num_random, vocab_size]
        dist = dist / dist.sum(dim=-1, keepdim=True)
        probs = dict(zip(random_rows, dist.unbind(0)))
    chosen_rows = [0] * len(rows)  # the token each row yielded (rows past a rejection: unused)
    spans: list[tuple[int, int, int]] = []  # per sequence: first row, rows used, drafts verified
    first = 0
    for seq in step.seqs:
        if seq.sample is None:
            continue
        drafts = seq.draft.token_ids if seq.draft is not None else ()
        used = 0
        for j in range(len(drafts) + 1):
            row = first + j
            token, accepted = _verify_row(sampler, rows[row], greedy[row], probs.get(row),
                                          drafts[j] if j < len(drafts) else None)
            chosen_rows[row] = token
            used += 1
            if not accepted:
                break
        spans.append((first, used, len(drafts)))
        first += len(drafts) + 1
    assert first == len(rows)
    logprobs = gather_logprobs(raw_logprobs, rows, torch.tensor(chosen_rows, device=logits.device))
    out = []
    for start, used, num_drafts in spans:
        tokens = tuple(chosen_rows[start : start + used])
        entries = logprobs[start : start + used]
        out.append(SampledTokens(tokens, tuple(entries) if entries[0] is not None else None, num_drafts))
    return out


def _verify_row(sampler: Sampler, request, greedy_id: int, probs: torch.Tensor | None, draft: int | None
                ) -> tuple[int, bool]:
    """(the row's token, whether the sequence goes on to the next row): draft None is the row after the drafts."""
    if probs is None:  # greedy
        return greedy_id, draft is not None and greedy_id == draft
    device = probs.device
    if draft is not None:
        u = float(torch.rand((), generator=sampler.generator_of(request, device), device=device))
        if u < float(probs[draft]):
            return draft, True
        probs = probs.clone()
        probs[draft] = 0.0  # the residual max(p - onehot(draft), 0); draw normalises by its mass
        if float(probs.sum()) <= 0.0:  # p was all on the draft and u rounded past it: nothing else can follow
            return draft, True
    return int(sampler.draw(probs.unsqueeze(0).clone(), [request])[0]), False
