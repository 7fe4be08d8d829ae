"""Logprobs of sampled and of prompt tokens, from the raw logits (vLLM v1's "raw_logprobs"), for the rows that ask."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pllm.runtime.worker.step import PromptLogprobInputs, SampleInputs, TokenLogprobs

__all__ = ["TokenLogprobs", "gather_logprobs", "prompt_logprobs_of", "rank_of", "raw_logprobs_of", "row_index"]


def row_index(rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor | slice:
    """An index for a subset of rows; a plain slice when it is all of them, so indexing copies nothing."""
    return slice(None) if len(rows) == num_rows else torch.tensor(rows, device=device)


def raw_logprobs_of(logits: torch.Tensor, requests: Sequence[SampleInputs]) -> torch.Tensor | None:
    """log_softmax of the rows whose params ask for logprobs, taken before any logits processing; None if none."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    sub = logits[row_index(rows, len(requests), logits.device)]  # [num_logprob_rows, vocab_size]
    return torch.log_softmax(sub.float(), dim=-1)


def gather_logprobs(
    raw_logprobs: torch.Tensor | None, requests: Sequence[SampleInputs], token_ids: torch.Tensor
) -> list[TokenLogprobs | None]:
    """Per row: the chosen token's logprob and the params.logprobs best; None for rows that did not ask."""
    out: list[TokenLogprobs | None] = [None] * len(requests)
    if raw_logprobs is None:
        return out
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    chosen = token_ids[row_index(rows, len(requests), token_ids.device)].unsqueeze(1)  # [num_logprob_rows, 1]
    chosen_values = raw_logprobs.gather(1, chosen)  # [num_logprob_rows, 1]
    chosen_logprobs = chosen_values.squeeze(1).tolist()
    ranks = rank_of(raw_logprobs, chosen_values)
    max_top = max(requests[i].params.logprobs for i in rows)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if max_top > 0:
        values, ids = raw_logprobs.topk(max_top, dim=-1)  # [num_logprob_rows, max_top]
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        k = requests[i].params.logprobs
        out[i] = TokenLogprobs(
            token_id=int(chosen[j, 0]),
            logprob=chosen_logprobs[j],
            rank=ranks[j],
            top=tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True)),
        )
    return out


def rank_of(logprobs: torch.Tensor, chosen: torch.Tensor) -> list[int]:
    """Per row, the chosen token's rank in the vocabulary: how many logprobs are >= its own (itself included), as
    vLLM v1's sampler counts it, so a tie ranks every tied token last among them. One compare and sum per row.
    logprobs [rows, vocab_size], chosen [rows, 1]."""
    return (logprobs >= chosen).sum(dim=-1).tolist()


# Rows whose logits exist at once: a long prompt's chunk over a 152k vocabulary in float32 would otherwise take
# gigabytes; 256 rows of it take 150 MB, and the LM head still runs as a matmul large enough to be efficient.
PROMPT_LOGPROB_ROWS_PER_PASS = 256


def prompt_logprobs_of(
    hidden: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor], seqs: Sequence[PromptLogprobInputs]
) -> list[list[TokenLogprobs]]:
    """Per sequence: each scored prompt token's logprob and its num_top best, from the hidden rows that predict
    them (seqs' rows concatenated in order); the LM head runs on these rows only, a bounded number at a time."""
    # hidden: [num_rows, hidden_size], num_rows = total len(target_token_ids)
    targets = [t for s in seqs for t in s.target_token_ids]
    assert hidden.shape[0] == len(targets), (tuple(hidden.shape), len(targets))
    max_top = max(s.num_top for s in seqs)
    target = torch.tensor(targets, dtype=torch.long, device=hidden.device).unsqueeze(1)  # [num_rows, 1]
    chosen: list[float] = []
    ranks: list[int] = []
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    for start in range(0, len(targets), PROMPT_LOGPROB_ROWS_PER_PASS):
        end = start + PROMPT_LOGPROB_ROWS_PER_PASS
        logprobs = torch.log_softmax(logits_of(hidden[start:end]).float(), dim=-1)  # [rows, vocab_size]
        chosen_values = logprobs.gather(1, target[start:end])  # [rows, 1]
        chosen += chosen_values.squeeze(1).tolist()
        ranks += rank_of(logprobs, chosen_values)
        if max_top > 0:
            values, ids = logprobs.topk(max_top, dim=-1)  # [rows, max_top]
            top_values += values.tolist()
            top_ids += ids.tolist()
        else:
            top_values += [[]] * logprobs.shape[0]
            top_ids += [[]] * logprobs.shape[0]
    out: list[list[TokenLogprobs]] = []
    row = 0
    for s in seqs:
        k = s.num_top
        out.append([
            TokenLogprobs(t, chosen[r], ranks[r], tuple(zip(top_ids[r][:k], top_values[r][:k], strict=True)))
            for r, t in enumerate(s.target_token_ids, start=row)
        ])
        row += len(s.target_token_ids)
    return out
