"""N-gram (prompt lookup) drafting: guess a sequence's next tokens from what followed its last few tokens before."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pllm.runtime.engine.config import SpeculativeConfig


def propose_ngram(token_ids: Sequence[int], config: SpeculativeConfig, max_drafts: int) -> tuple[int, ...]:
    """Up to max_drafts tokens that followed the latest earlier occurrence of the sequence's last n tokens, for the
    largest n in [prompt_lookup_min, prompt_lookup_max] that occurs earlier; () when none does.

    The latest occurrence (not the first, as vLLM's proposer takes) is the one nearest what is being written: in a
    text that is edited or repeated, it is the copy the output is following. A match may overlap the suffix itself
    (a run of one repeated token proposes more of it): the copy then reads on into its own guesses, as an LZ77
    copy does, so a loop shorter than max_drafts is proposed for max_drafts tokens."""
    num_tokens = len(token_ids)
    if max_drafts < 1 or num_tokens < config.prompt_lookup_min + 1:
        return ()
    tokens = np.asarray(token_ids, dtype=np.int64)  # [num_tokens]
    for n in range(min(config.prompt_lookup_max, num_tokens - 1), config.prompt_lookup_min - 1, -1):
        suffix = tokens[num_tokens - n :]  # [n]
        # windows start at 0 .. num_tokens - n - 1: each is followed by at least one token, the suffix excluded
        windows = sliding_window_view(tokens[: num_tokens - 1], n)  # [num_tokens - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            drafts = tokens[start : start + max_drafts].tolist()
            period = num_tokens - start  # > 0: the copy's distance back; past the end it repeats its own guesses
            while len(drafts) < max_drafts:
                drafts.append(drafts[len(drafts) - period])
            return tuple(drafts)
    return ()
