"""The /v1/embeddings request body: an input or a batch of them (texts or token ids)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pllm.runtime.server.protocol_sampling import Name, OpenAIModel, TokenIds, at_most, not_bool

MAX_EMBED_INPUTS = 256  # inputs in one /v1/embeddings batch


class EmbeddingRequest(OpenAIModel):
    model: Name | None = None
    input: str | TokenIds | list[str] | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Name | None = None

    @field_validator("dimensions", mode="before")
    @classmethod
    def _dimensions_number_only(cls, value):
        return not_bool(value)

    @field_validator("input")
    @classmethod
    def _check_input_count(cls, inputs):
        return at_most(inputs, MAX_EMBED_INPUTS, "input", "inputs")

    def inputs(self) -> list[str | list[int]]:
        p = self.input
        if isinstance(p, str) or (isinstance(p, list) and (not p or isinstance(p[0], int))):
            return [p]
        return list(p)
