"""The /v1/completions request body: a prompt or a batch of them (texts or token ids), echo and logprobs."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from pllm.runtime.engine.sampling_params import MAX_LOGPROBS, MAX_N
from pllm.runtime.server.protocol_sampling import (
    MAX_TOKENS_LIMIT,
    SamplingRequest,
    TokenIds,
    at_most,
    not_bool,
)

MAX_PROMPTS = 64  # prompts in one /v1/completions batch


class CompletionRequest(SamplingRequest):
    prompt: str | TokenIds | list[str] | list[TokenIds]
    # 0 only with echo (vLLM's convention): the prompt comes back, scored when logprobs is set, and nothing else
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, max_length=0)  # not supported: only absent or empty passes
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    add_special_tokens: bool = True  # vLLM's: BOS and the like added to a text prompt

    @field_validator("max_tokens", "logprobs", "best_of", mode="before")
    @classmethod
    def _completion_numbers_only(cls, value):
        return not_bool(value)

    @field_validator("prompt")
    @classmethod
    def _check_prompt_count(cls, prompt):
        return at_most(prompt, MAX_PROMPTS, "prompt", "prompts")

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of is not supported; leave it unset or equal to n")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and (not p or isinstance(p[0], int))):
            return [p]
        return list(p)
