"""SamplingParams: how one request picks its tokens and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import ClassVar

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
# structured output: what a client may ask the grammar compiler to do, bounded so one request cannot make
# compilation (run off the engine loop, but on a shared thread) or the grammar cache arbitrarily large
MAX_STRUCTURED_CHARS = 64 * 1024  # a JSON schema (as compact JSON), a regex or a grammar
MAX_SCHEMA_DEPTH = 32  # nesting of objects and lists in a JSON schema
MAX_CHOICES = 256
MAX_CHOICE_LEN = 1024
# What one request's outputs may hold, in entries: each of n sequences keeps, per output token, the token and
# `logprobs` Logprob entries beside its own (n x max_tokens x (1 + logprobs)), and a prompt scored with prompt_logprobs
# as much per prompt token. An entry costs ~180 bytes (a Logprob, its float, its dict slot: measured with
# tracemalloc), so this bounds one request's outputs to ~750 MB before the response is built from them, where n=128,
# logprobs=20 and no max_tokens on an 8k context made 22M (~4 GB). It still admits n=1 with logprobs=20 and no
# max_tokens on any context up to 199,728 tokens, and n=128 without logprobs up to 32,768 tokens each. vLLM has no
# such bound (read in its source): SamplingParams._verify_args and Processor._validate_logprobs check each field alone.
MAX_OUTPUT_ENTRIES = 1 << 22


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's names): set exactly one of json (a JSON schema, as a dict or JSON
    text), regex, choice (the output is one of these strings), grammar (EBNF/GBNF), or json_object (any JSON
    object). Compiled once per distinct spec by the engine's grammar cache."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # a client's spec; a subclass may allow more where something else bounds the spec (a forced tool call's schema)
    max_chars: ClassVar[int] = MAX_STRUCTURED_CHARS

    def __post_init__(self) -> None:
        if isinstance(self.json, str):  # JSON text: parsed here, so a bad document is an error naming the field
            if len(self.json) > MAX_STRUCTURED_CHARS:
                raise _bad("structured_outputs.json", f"{len(self.json)} characters",
                           f"at most {MAX_STRUCTURED_CHARS} characters")
            try:
                self.json = json.loads(self.json)
            except (ValueError, RecursionError) as exc:
                raise InvalidParam(
                    "structured_outputs.json", f"structured_outputs.json is not valid JSON: {exc}"
                ) from None
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self.validate()

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A canonical form: equal for specs that compile to the same grammar. Keys of a schema's objects are
        sorted, except under "properties", whose order is the order the output writes them in."""
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(_canonical(self.json), separators=(",", ":"), ensure_ascii=False)
        if kind == "choice":
            return kind, json.dumps(self.choice, ensure_ascii=False)
        return kind, "" if kind == "json_object" else getattr(self, kind)

    def validate(self) -> None:
        named = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(named) != 1:
            raise InvalidParam(
                "structured_outputs",
                f"structured_outputs must set exactly one of {', '.join(_STRUCTURED_KINDS)}; got "
                f"{', '.join(named) or 'none'}",
            )
        field_name = f"structured_outputs.{named[0]}"
        if self.json is not None:
            if not isinstance(self.json, dict):
                raise _bad(field_name, self.json, "a JSON schema: an object, or its JSON text")
            if _depth(self.json) > MAX_SCHEMA_DEPTH:
                raise _bad(field_name, "a schema", f"nested at most {MAX_SCHEMA_DEPTH} levels deep")
            try:
                size = len(self.key()[1])
            except (TypeError, ValueError) as exc:  # from Python: a value JSON cannot hold
                raise _bad(field_name, "a schema", f"JSON data ({exc})") from None
            if size > self.max_chars:
                raise _bad(field_name, f"{size} characters", f"at most {self.max_chars} characters as JSON")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_STRUCTURED_CHARS):
                raise _bad(field_name, _clip(value), f"a non-empty string of at most {MAX_STRUCTURED_CHARS} characters")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not 0 < len(self.choice) <= MAX_CHOICES:
                raise _bad(field_name, _clip(self.choice), f"a list of 1 to {MAX_CHOICES} strings")
            for c in self.choice:
                if not isinstance(c, str) or not 0 < len(c) <= MAX_CHOICE_LEN or not _is_unicode(c):
                    raise _bad(field_name, _clip(c), f"non-empty strings of at most {MAX_CHOICE_LEN} characters")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise _bad(field_name, self.json_object, "true or false")


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _depth(value: object) -> int:
    """Nesting depth of dicts and lists, without recursion (a hostile schema could be deeper than the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_SCHEMA_DEPTH:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _canonical(value: object, ordered: bool = False) -> object:
    """A schema with its objects' keys sorted, but for the property lists ("properties" values); depth is bounded
    by MAX_SCHEMA_DEPTH before this runs."""
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if not isinstance(value, dict):
        return value
    keys = list(value) if ordered else sorted(value, key=str)
    return {k: _canonical(value[k], ordered=k == "properties" and not ordered) for k in keys}


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
            raise _bad("stop", stop, "a string or a list of strings")
        ids = self.stop_token_ids
        if ids is not None and not (isinstance(ids, (list, tuple)) and all(_is_int(t) for t in ids)):
            raise _bad("stop_token_ids", ids, "a list of non-negative integers")
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

        bad = _bad
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
            if not _is_unicode(s):  # decoded output never holds a lone surrogate: such a stop could never match
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
                raise bad("structured_outputs", _clip(self.structured_outputs), "a StructuredOutputsParams")
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


class InvalidParam(ValueError):
    """A sampling parameter out of range; param names the field, so the HTTP layer can point at it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    """ValueError for a prompt that leaves no room for output: the engine's refusal, and the server's (which names
    the request field it came from) in the same words."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"contains {num_prompt_tokens} input tokens, which leaves no room for output tokens."
        )


def _bad(name: str, value: object, what: str) -> InvalidParam:
    return InvalidParam(name, f"{name} must be {what}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_logit_bias(bias: object) -> dict[int, float]:
    """{token id: bias}; ids may be strings of digits (JSON object keys always are)."""
    if not isinstance(bias, dict):
        raise _bad("logit_bias", bias, "a mapping of token ids to numbers")
    parsed = {}
    for key, value in bias.items():
        if _is_int(key):
            token_id = key
        elif isinstance(key, str) and _TOKEN_ID_KEY.fullmatch(key):
            token_id = int(key)
        else:
            raise _bad("logit_bias", key, "keyed by integer token ids")
        if not _is_real(value):
            raise _bad("logit_bias", value, f"finite numbers (the bias of token {token_id})")
        parsed[token_id] = float(value)
    return parsed
