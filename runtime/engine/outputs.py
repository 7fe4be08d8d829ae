"""What the engine hands back: per-request outputs (vLLM's shape) and embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

from pllm.runtime.engine.kv_cache import PrefixCacheStats
from pllm.runtime.worker.logprobs import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int  # which of the request's n sequences
    text: str  # cumulative text so far (stop strings cut, held-back stop-string prefixes not yet included)
    token_ids: list[int]  # cumulative generated token ids
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None  # one entry per generated token when params.logprobs is set
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival, first_token, finished times (time.monotonic)
    # with params.prompt_logprobs: one entry per prompt token, None for the first (nothing precedes it), then each
    # token's logprob and the params.prompt_logprobs best at its position (complete from the first output on)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]  # L2-normalised
    num_prompt_tokens: int


@dataclass
class EmbeddingRequestOutput:
    """One embedding request's result, handed out once, when it finishes (vLLM's PoolingRequestOutput)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    metrics: dict = field(default_factory=dict)  # arrival and finished times (time.monotonic)


@dataclass(frozen=True)
class EngineSnapshot:
    """Cumulative engine counters and current gauges, read on the engine thread after a step."""

    num_running: int  # requests with a sequence in the running batch (n > 1 counts once)
    num_waiting: int  # requests queued (new or preempted), none of whose sequences is running
    num_running_seqs: int  # sequences in the running batch (n > 1 counts each)
    max_num_seqs: int  # the running batch's sequence cap
    kv_cache_usage: float  # fraction of KV blocks referenced, in [0, 1]
    num_generation_tokens: int
    num_preemptions: int
    prefix_cache: PrefixCacheStats  # lookups at admission; readmissions after preemption counted apart
    # speculative decoding (0 when off): verify steps of a sequence, tokens guessed, guesses the model confirmed
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
