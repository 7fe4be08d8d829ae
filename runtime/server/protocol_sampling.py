"""Request bodies' shared base: bounded field types, structured output, SamplingRequest and its SamplingParams."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pllm.runtime.engine.sampling_params import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SAMPLING_EPS,
    InvalidParam,
    SamplingParams,
    StructuredOutputsParams,
)
from pllm.runtime.server.limits import MAX_REQUEST_ID_LEN
from pllm.runtime.server.protocol_vllm import GUIDED_FIELDS, UNHONOURED_VLLM_FIELDS, first_unhonoured

MAX_STOP_TOKEN_IDS = 64
MAX_TOKENS_LIMIT = 1 << 20  # any larger max_tokens is a client bug (past the prompt's context: serving.check_fits)
MAX_NAME_LEN = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way
MIN_TOP_P = 1e-6


def not_bool(value):
    """JSON true is not a number: a lax int or float would run it as 1 (OpenAI refuses it; so does this server)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


NotBool = BeforeValidator(not_bool)


def at_most(items, limit: int, field: str, noun: str):
    """A list of several prompts (not one list of token ids) holds at most `limit` of them."""
    if isinstance(items, list) and items and not isinstance(items[0], int) and len(items) > limit:
        raise ValueError(f"{field}: at most {limit} {noun} per request, got {len(items)}")
    return items


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_LEN)]
# strict: JSON true, 1.0 and "101" are not token ids (a lax int would run them as 1, 1 and 101)
TokenIds = list[Annotated[int, Field(ge=0, le=INT64_MAX, strict=True)]]
Name = Annotated[str, Field(max_length=MAX_NAME_LEN)]
BiasValue = Annotated[float, NotBool, Field(ge=-MAX_ABS_LOGIT_BIAS, le=MAX_ABS_LOGIT_BIAS)]
LogitBias = Annotated[dict[int, BiasValue], Field(max_length=MAX_LOGIT_BIAS)]


class OpenAIModel(BaseModel):
    # Unknown fields are accepted and logged as ignored (vLLM does the same); NaN and inf are rejected.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    # extra fields this model reads after all (SamplingRequest: vLLM's guided_* and its unhonoured-but-neutral ones)
    read_extra_fields: ClassVar[frozenset[str]] = frozenset()

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(set(self.model_extra or {}) - self.read_extra_fields)


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(OpenAIModel):
    """response_format's json_schema: OpenAI's shape (the schema itself is bounded by SamplingParams.validate)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = Field(None, max_length=MAX_NAME_LEN * 16)
    json_schema: dict[str, Any] = Field(alias="schema")  # `schema` would shadow a pydantic method
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is required with (and only with) type 'json_schema'")
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_schema":
            return StructuredOutputsParams(json=self.json_schema.json_schema)
        return StructuredOutputsParams(json_object=True) if self.type == "json_object" else None


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's extra field `structured_outputs`: exactly one of these (SamplingParams.validate checks the rest)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # `json` would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


NUMBER_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "n", "min_tokens", "max_tokens", "truncate_prompt_tokens", "prompt_logprobs",
)  # fmt: skip


class SamplingRequest(OpenAIModel):
    """Fields shared by completions and chat completions: vLLM's names, OpenAI's defaults."""

    model: Name | None = None
    # The bounds below repeat SamplingParams.validate's so the OpenAPI schema documents them; both read the
    # same constants.
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    # vLLM takes any positive value; below 0.01 float32 logits overflow, so the bound is a 400 instead of a NaN.
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    logit_bias: LogitBias | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # absent: up to max_model_len
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    # structured output: OpenAI's response_format, or vLLM's structured_outputs (json, regex, choice, grammar)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's: keep only this many prompt tokens, the last ones (-1: max_model_len of them)
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)
    # vLLM's: the prompt's own logprobs, this many best at each position (0: the prompt token's alone), in the
    # response's prompt_logprobs; not in a stream (beyond 0, vLLM refuses them there; at 0 it sends none)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: the id the response carries (f"cmpl-{request_id}"); the X-Request-Id header wins over it, as in vLLM
    request_id: Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_LEN)] | None = None
    # vLLM uses it with use_beam_search only (refused here) and ignores it otherwise, as this server does
    length_penalty: float = 1.0
    # chooses vLLM's grammar backend; this server has one (xgrammar, vLLM's default) and ignores it as vLLM's "auto"
    guided_decoding_backend: str | None = None
    unhonoured_fields: ClassVar[dict[str, object]] = UNHONOURED_VLLM_FIELDS
    read_extra_fields: ClassVar[frozenset[str]] = frozenset({*UNHONOURED_VLLM_FIELDS, *GUIDED_FIELDS})

    # numbers only: JSON true is not a count, a seed or a temperature
    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _numbers_only(cls, value):
        return not_bool(value)

    @field_validator("prompt_logprobs", mode="before")
    @classmethod
    def _whole_vocabulary(cls, value):
        if isinstance(value, int | float) and not isinstance(value, bool) and value == -1:
            # vLLM reads -1 as the whole vocabulary and refuses it too unless started with --max-logprobs -1
            raise ValueError(f"-1 (the whole vocabulary) is not supported by this server; prompt_logprobs is at "
                             f"most {MAX_LOGPROBS} (MAX_LOGPROBS)")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _check_prompt_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and info.data.get("stream", False):  # vLLM's rule (its message, plus what passes)
            raise ValueError("`prompt_logprobs` are not available when `stream=True` (only 0 or null there)")
        return value

    @property
    def returned_prompt_logprobs(self) -> int | None:
        """The prompt_logprobs the response carries: none in a stream, where vLLM sends none (it refuses more than
        0 there; the validator above does too)."""
        return None if self.stream else self.prompt_logprobs

    def check_unhonoured(self) -> None:
        """InvalidParam naming the first of vLLM's fields this server cannot honour that is set to a value that
        counts."""
        name = first_unhonoured(self.model_extra or {}, self.unhonoured_fields)
        if name is not None:
            only = json.dumps(self.unhonoured_fields[name])
            raise InvalidParam(name, f"{name} is not supported by this server (only {only} or absent)")

    def _guided(self) -> dict[str, Any]:
        extra = self.model_extra or {}
        return {key: extra[field] for field, key in GUIDED_FIELDS.items() if extra.get(field) is not None}

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, opts: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if opts is not None and not info.data.get("stream", False):
            raise ValueError("stream_options can only be set when stream is true")
        return opts

    @property
    def structured_field(self) -> str:
        """Which request field asked for structured output: "response_format", "structured_outputs" or "guided" (the
        guided_* fields); a structured-output error names what the client sent (serving._bad_request)."""
        if self._guided():
            return "guided"
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def structured_params(self) -> StructuredOutputsParams | None:
        formatted = self.response_format.structured_outputs() if self.response_format is not None else None
        guided = self._guided()
        if guided:  # vLLM <= 0.11's guided_json, guided_regex, guided_choice, guided_grammar
            if formatted is not None or self.structured_outputs is not None:
                raise InvalidParam(next(f for f in GUIDED_FIELDS if GUIDED_FIELDS[f] in guided),
                                   "set one of response_format, structured_outputs or guided_*, not several")
            return StructuredOutputsParams(**guided)  # (its errors renamed for the client by serving._bad_request)
        if self.structured_outputs is None:
            return formatted
        if formatted is not None:
            raise InvalidParam("structured_outputs", "set response_format or structured_outputs, not both")
        try:
            return StructuredOutputsParams(**self.structured_outputs.model_dump(exclude_none=True, by_alias=True))
        except TypeError:  # an unknown key (extra fields are allowed in the body)
            raise InvalidParam("structured_outputs", f"structured_outputs: unknown field(s) "
                               f"{', '.join(self.structured_outputs.ignored_fields)[:200]}") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this request; ValueError (naming the field) when a combination is out of range."""
        self.check_unhonoured()
        temperature = _or(self.temperature, 1.0)
        return SamplingParams(
            n=self.n,
            # As vLLM: a temperature this small is greedy (dividing logits by it overflows float32 to inf).
            temperature=0.0 if temperature < SAMPLING_EPS else temperature,
            # The sampler works in float32, where a top_p under ~1e-45 is 0 and would keep no token; any top_p
            # under 1/vocab_size keeps only the top token, so raising it to MIN_TOP_P changes no result.
            top_p=max(_or(self.top_p, 1.0), MIN_TOP_P),
            top_k=_or(self.top_k, 0),
            min_p=_or(self.min_p, 0.0),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.returned_prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=self.structured_params(),
        )


def _or(value, default):
    return default if value is None else value
