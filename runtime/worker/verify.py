"""A step's logits -> each sampling sequence's new tokens; drafted tokens verified by sampling every row.

Speculative decoding with n-gram guesses: row j of a sequence is scored as the sequence would stand had guesses
0..j-1 been right, and the sampler draws each row's token exactly as decoding one token at a time would (every
logits processor, temperature, top-k/top-p/min-p; a seeded row's draw keyed by its output index). The sequence keeps
the rows' tokens up to and including the first that differs from its guess (all of them when every guess matches).
Each kept token is then the token one-at-a-time decoding samples after the tokens kept before it, so the output is
distributed exactly as without guesses, and a guess d is kept with probability p(d), the most a one-hot draft can
get (as rejection sampling with q = onehot(d), vLLM's n-gram path, also gives). Because a seeded row's draw depends
only on (seed, output index), seeded output is the same with speculation on and off, whatever guesses a step's
budget allows; a greedy row keeps its argmax run, so greedy output is too. Logprobs are the target's, from the raw
logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm.runtime.worker.logprobs import TokenLogprobs
from pllm.runtime.worker.sampler import Sampler
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
    out = sampler.sample(logits, rows)  # every row's token as one-at-a-time decoding would draw it
    if not step.has_drafts:
        return [SampledTokens((t,), (lp,) if lp is not None else None) for t, lp in zip(out.token_ids, out.logprobs)]
    results = []
    first = 0
    for seq in step.seqs:
        if seq.sample is None:
            continue
        drafts = seq.draft.token_ids if seq.draft is not None else ()
        used = 1  # row j's token is kept when every guess before it matched its row's token
        while used <= len(drafts) and out.token_ids[first + used - 1] == drafts[used - 1]:
            used += 1
        tokens = tuple(out.token_ids[first : first + used])
        entries = out.logprobs[first : first + used]
        results.append(SampledTokens(tokens, tuple(entries) if entries[0] is not None else None, len(drafts)))
        first += len(drafts) + 1
    assert first == len(rows), (first, len(rows))
    return results
