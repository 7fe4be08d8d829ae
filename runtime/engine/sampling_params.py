"""SamplingParams: how one request picks its tokens and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

from pllm.runtime.engine.param_checks import InvalidParam, bad_param, clip_repr, is_unicode
from pllm.runtime.engine.structured_outputs_params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGIT_BIAS = 1024
MAX_TEMPERATURE = 2.0
MAX_ABS_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-MAX_ABS_PENALTY, MAX_ABS_PENALTY]
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range for one token's bias
SAMPLING_EPS = 1e-5  # temperatures below this are greedy: dividing logits by them overflows float32
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # beyond these, divided logits overflow float32
# torch.Generator.manual_seed takes [-2**63, 2**64); n > 1 seeds sequence i with seed + i, which stays inside.
MIN_SEED, MAX_SEED = -(2**63), 2**63
# a token id written as text, as JSON object keys are: ASCII digits only (int() also takes "٣", "1_0" and " 5 ")
_TOKEN_ID_KEY = re.compile(r"-?[0-9]+", re.ASCII)
# What one request's outputs may hold, in entries: each of n sequences keeps, per output token, the token and
# `logprobs` Logprob entries beside its own (n x max_tokens x (1 + logprobs)), and a prompt scored with prompt_logprobs
# as much per prompt token. An entry costs ~180 bytes (a Logprob, its float, its dict slot: measured with
# tracemalloc), so this bounds one request's outputs to ~750 MB before the response is built from them, where n=128,
# logprobs=20 and no max_tokens on an 8k context made 22M (~4 GB). It still admits n=1 with logprobs=20 and no
# max_tokens on any context up to 199,728 tokens, and n=128 without logprobs up to 32,768 tokens each. vLLM has no
# such bound (read in its source): SamplingParams._verify_args and Processor._validate_logprobs check each field alone.
MAX_OUTPUT_ENTRIES = 1 << 22


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0: only the chosen one)
    # number of top logprobs per prompt position (0: only the prompt token's); RequestOutput.prompt_logprobs
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # structured output: the grammar the output must follow (None: free text)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.normalize_and_validate()

    def normalize_and_validate(self) -> None:
        """Normalise the fields (stop_token_ids None -> [], logit_bias keys -> ints) and validate them all. Runs at
        construction, and again when a request is queued by LLM.generate: a vLLM user may set fields after
        construction (params.stop = [...]; params.temperature = 0), which must be checked and honoured."""
        # Types first, so a wrong type gets the same message naming the field as a wrong value.
        stop = self.stop
        if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)
        ):
            raise bad_param("stop", stop, "a string or a list of strings")
        ids = self.stop_token_ids
        if ids is not None and not (isinstance(ids, (list, tuple)) and all(_is_int(t) for t in ids)):
            raise bad_param("stop_token_ids", ids, "a list of non-negative integers")
        self.stop_token_ids = list(ids or [])
        if self.logit_bias is not None:
            self.logit_bias = _parse_logit_bias(self.logit_bias)
        self.validate()

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's SamplingParams.clone): changing it leaves this one as it is."""
        return copy.deepcopy(self)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """stop as a tuple of strings, derived from stop each time, so setting stop after construction counts."""
        stop = self.stop
        return (stop,) if isinstance(stop, str) else tuple(stop or ())

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self) -> None:
        """Raise ValueError naming the field and value for anything out of range."""

        bad = bad_param
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", self.n, f"an integer in [1, {MAX_N}]")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not _is_real(value):
                raise bad(name, value, "a finite number")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", self.temperature, f"in [0, {MAX_TEMPERATURE:g}]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", self.top_k, "-1, 0 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise bad(name, value, f"in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", self.repetition_penalty,
                      f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "a positive integer")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", self.logprobs, f"an integer in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", self.prompt_logprobs, f"an integer in [0, {MAX_LOGPROBS}]")
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise bad("stop", f"{len(self.stop_strings)} strings", f"at most {MAX_STOP_STRINGS} strings")
        for s in self.stop_strings:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_LEN:
                raise bad("stop", s, f"a non-empty string of at most {MAX_STOP_STRING_LEN} characters")
            if not is_unicode(s):  # decoded output never holds a lone surrogate: such a stop could never match
                raise bad("stop", s, "valid Unicode text (no lone surrogate such as '\\ud800')")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"{len(self.logit_bias)} entries", f"at most {MAX_LOGIT_BIAS} entries")
        if self.logit_bias and any(abs(v) > MAX_ABS_LOGIT_BIAS for v in self.logit_bias.values()):
            raise bad("logit_bias", self.logit_bias, f"values in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]")
        if self.seed is not None and (not _is_int(self.seed) or not MIN_SEED <= self.seed < MAX_SEED):
            raise bad("seed", self.seed, f"an integer in [{MIN_SEED}, {MAX_SEED})")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "true or false")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad("structured_outputs", clip_repr(self.structured_outputs), "a StructuredOutputsParams")
            self.structured_outputs.validate()

    def validate_vocab(self, vocab_size: int) -> None:
        """Token ids a request names must exist in the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias or {}))):
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise InvalidParam(name, f"{name}: token id {t} is outside the vocabulary [0, {vocab_size})")

    def check_output_size(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """InvalidParam when the outputs may pass MAX_OUTPUT_ENTRIES. max_tokens is the engine's, clamped to what the
        context leaves (so a large max_tokens the context cuts short passes); the prompt's part counts only with
        prompt_logprobs."""
        per_token = 1 + (self.logprobs or 0)
        prompt_entries = 0 if self.prompt_logprobs is None else num_prompt_tokens * (1 + self.prompt_logprobs)
        num_entries = self.n * max_tokens * per_token + prompt_entries
        terms = f"n x max_tokens x (1 + logprobs) = {self.n} x {max_tokens} x {per_token}"
        if self.prompt_logprobs is not None:
            terms += f" + prompt tokens x (1 + prompt_logprobs) = {num_prompt_tokens} x {1 + self.prompt_logprobs}"
        if num_entries > MAX_OUTPUT_ENTRIES:
            unset = "" if self.max_tokens is not None else f" (max_tokens unset: the {max_tokens} the context leaves)"
            # the scored prompt alone past the limit: no max_tokens, n or logprobs would bring it under
            field, lower = (("prompt_logprobs", "prompt_logprobs or the prompt") if prompt_entries > MAX_OUTPUT_ENTRIES
                            else ("max_tokens", "max_tokens, n or logprobs"))
            raise InvalidParam(field, f"This request's outputs could hold {num_entries} tokens and logprobs "
                               f"({terms}){unset}, more than the limit of {MAX_OUTPUT_ENTRIES}; lower {lower}")


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    """ValueError for a prompt that leaves no room for output: the engine's refusal, and the server's (which names
    the request field it came from) in the same words."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"contains {num_prompt_tokens} input tokens, which leaves no room for output tokens."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _parse_logit_bias(bias: object) -> dict[int, float]:
    """{token id: bias}; ids may be strings of digits (JSON object keys always are)."""
    if not isinstance(bias, dict):
        raise bad_param("logit_bias", bias, "a mapping of token ids to numbers")
    parsed = {}
    for key, value in bias.items():
        if _is_int(key):
            token_id = key
        elif isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key):
            token_id = int(key)
        else:
            raise bad_param("logit_bias", key, "keyed by integer token ids")
        if not _is_real(value):
            raise bad_param("logit_bias", value, f"finite numbers (the bias of token {token_id})")
        parsed[token_id] = float(value)
    return parsed
