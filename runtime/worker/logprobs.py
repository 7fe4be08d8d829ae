"""Logprobs of sampled tokens, from the raw logits (vLLM v1's default "raw_logprobs"), for the rows that ask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pllm.runtime.worker.step import SampleInputs


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int  # the chosen token
    logprob: float  # its log-probability under log_softmax of the raw logits
    top: tuple[tuple[int, float], ...]  # the params.logprobs best (token_id, logprob), best first


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
    chosen_logprobs = raw_logprobs.gather(1, chosen).squeeze(1).tolist()
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
            top=tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True)),
        )
    return out
