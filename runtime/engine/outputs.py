"""What the engine hands back: per-request outputs (vLLM's shape) and embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pllm.runtime.engine.kv_cache import PrefixCacheStats

if TYPE_CHECKING:
    from pllm.runtime.engine.lora import LoRARequest


@dataclass
class Logprob:
    """One token's score at one position (vLLM's vllm.logprobs.Logprob, field for field)."""

    logprob: float  # log-probability under log_softmax of the raw logits
    rank: int | None = None  # 1 + the vocabulary entries scoring at least as high (ties counted); top-k: 1..k
    decoded_token: str | None = None  # the token alone as text: tokenizer.decode([token_id])


# One position: the sampled (or prompt) token first, then the params' top-k best first; a token in both once.
LogprobsOnePosition = dict[int, Logprob]
SampleLogprobs = list[LogprobsOnePosition]
PromptLogprobs = list[LogprobsOnePosition | None]  # None at position 0: nothing precedes the first token


@dataclass
class CompletionOutput:
    index: int  # which of the request's n sequences
    text: str  # cumulative text so far (stop strings cut, held-back stop-string prefixes not yet included)
    token_ids: list[int]  # cumulative generated token ids
    finish_reason: str | None = None  # "stop" | "length" | "abort", None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: SampleLogprobs | None = None  # one dict per generated token when params.logprobs is set
    cumulative_logprob: float | None = None
    lora_request: LoRARequest | None = None  # the adapter it ran under (filled by LLM.generate / chat)

    def finished(self) -> bool:
        """Whether this sequence has ended (a method, as vLLM's CompletionOutput.finished(); RequestOutput.finished
        is a field)."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # arrival_time, first_scheduled_time (once it ran), first_token_time, finished_time (time.monotonic)
    metrics: dict = field(default_factory=dict)
    # with params.prompt_logprobs: one entry per prompt token, None for the first (nothing precedes it), then a dict
    # of the token itself and the params.prompt_logprobs best at its position (complete from the first output on)
    prompt_logprobs: PromptLogprobs | None = None
    lora_request: LoRARequest | None = None  # the adapter it ran under (filled by LLM.generate / chat)


@dataclass(frozen=True)
class EmbeddingOutput:
    """The vector of one embedding request (vLLM's EmbeddingOutput, plus the prompt's length)."""

    embedding: list[float]  # L2-normalised
    num_prompt_tokens: int


@dataclass
class EmbeddingRequestOutput:
    """One embedding request's result, handed out once, when it finishes (vLLM's EmbeddingRequestOutput: what
    LLM.embed returns, one per prompt)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    metrics: dict = field(default_factory=dict)  # arrival and finished times (time.monotonic)


@dataclass(frozen=True)
class LoraSnapshot:
    """The engine's LoRA adapters at a snapshot, as vLLM's lora_requests_info reports them: the adapter slots, and the
    adapters named by running and by waiting requests (each name once, sorted)."""

    max_loras: int
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()


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
    # None: an engine that serves no adapters now (none loaded; or an encoder, tensor parallel)
    lora: LoraSnapshot | None = None
