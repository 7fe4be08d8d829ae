"""What every endpoint family shares: the served model's names, tokenizer, prompt checks and sampling params."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pllm.models.chat_template import max_prompt_chars
from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.engine.outputs import Logprob, RequestOutput
from pllm.runtime.engine.sampling_params import InvalidParam, SamplingParams, check_prompt_fits
from pllm.runtime.engine.structured_output import GrammarError
from pllm.runtime.server.async_engine import AsyncEngine
from pllm.runtime.server.limits import usable_request_id
from pllm.runtime.server.protocol_responses import PromptLogprob, PromptLogprobsBody
from pllm.runtime.server.protocol_sampling import LOGPROB_FLOOR, SamplingRequest
from pllm.runtime.server.request_stream import EngineError, EngineRequest
from pllm.runtime.server.sse import within_top

logger = logging.getLogger("pllm.server")


@dataclass(frozen=True)
class Prepared:
    """A generation request ready for the engine: one EngineRequest per prompt, plus what responses need."""

    requests: list[EngineRequest]
    prompt_texts: list[str]  # for echo ("" when not echoing)
    # the response's `id`: f"{prefix}-{X-Request-Id or the body's request_id}", as vLLM's, else the engine's own id
    response_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_base(self) -> dict[str, int]:
        n = self.requests[0].params.n
        return {r.request_id: i * n for i, r in enumerate(self.requests)}

    def model_name(self, base_model: str) -> str:
        """The `model` a response names: the LoRA adapter's when the requests run under one, else base_model."""
        lora = self.requests[0].lora if self.requests else None
        return lora.name if lora is not None else base_model


class OpenAIServing:
    """The served model as every endpoint family sees it (serving_completions.py, serving_chat.py,
    serving_embeddings.py turn their requests into engine work and engine outputs into OpenAI's JSON)."""

    def __init__(self, engine: AsyncEngine, served_model_names: list[str]):
        self.engine = engine
        self.model_names = served_model_names
        # the LoRA adapters the engine serves, by name: those loaded at start, then serving_lora.py's loads and unloads
        self.loras: dict[str, LoRARequest] = dict(engine.engine.loras.requests)
        clash = sorted(set(self.loras) & set(served_model_names))
        if clash:
            raise ValueError(f"LoRA adapter name(s) {clash} are also served model names; rename one")
        llm = engine.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.hidden_size = llm.spec.hidden_size
        self.default_pooling = llm.default_pooling  # the build's: an encoder's recipe, else "last"
        self._embedding_max_length = llm.embedding_max_length  # an encoder truncates as sentence-transformers
        self._check_generates = llm.check_generates
        # The longest token in characters bounds how many characters max_model_len tokens can hold, so the
        # check before tokenizing never rejects a prompt that would fit.
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, self.max_model_len)
        # One thread tokenizes, so neither the event loop nor the engine loop stalls on a long prompt.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="pllm-tokenizer")
        self._token_strs: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter `model` names, None for the base model's names (or none given); 404 for any other."""
        if model is None or model in self.model_names:
            return None
        lora = self.loras.get(model)
        if lora is None:
            raise EngineError(404, f"The model `{model[:256]}` does not exist.", param="model")
        return lora

    def under_lora(self, prep: Prepared, lora: LoRARequest | None) -> Prepared:
        """The prepared requests, each to run under the adapter (None: as they are, on the base model)."""
        if lora is None:
            return prep
        return dataclasses.replace(prep, requests=[dataclasses.replace(r, lora=lora) for r in prep.requests])

    def check_base_model(self, model: str | None) -> None:
        """A 400 for a LoRA adapter's name on an endpoint adapters do not serve (embeddings)."""
        if self.check_model(model) is not None:
            raise EngineError(400, f"The model `{model}` is a LoRA adapter; embeddings are served by the base model "
                              f"`{self.model_name}` only.", param="model")

    async def in_tokenizer_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    def check_chars(self, text: str, param: str = "prompt") -> None:
        """A 400 naming param (the request field the text came from) for an empty text or one too long to fit."""
        if not text:
            raise EngineError(400, "The prompt is empty; provide a non-empty prompt.", param=param)
        if len(text) > self.max_prompt_chars:
            raise EngineError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(text)} characters, more than {self.max_model_len} tokens can hold. "
                "Please reduce the length of the input prompt.",
                param=param,
            )

    def check_fits(self, ids: list[int], param: str, max_tokens: int | None, max_tokens_param: str) -> None:
        """A 400 naming param for a prompt that leaves no room for output (the engine refuses it too), and one naming
        max_tokens_param for an output limit the context cannot hold after the prompt, in vLLM's words (the offline
        engine cuts such an output at max_model_len instead; a server client asked for more than it can get)."""
        try:
            check_prompt_fits(len(ids), self.max_model_len)
        except ValueError as exc:
            raise EngineError(400, str(exc), param=param) from None
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise EngineError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
                f"length is {self.max_model_len} tokens and your request has {len(ids)} input tokens ({max_tokens} > "
                f"{self.max_model_len} - {len(ids)}).",
                param=max_tokens_param,
            )

    def truncate(self, ids: list[int], req: SamplingRequest) -> list[int]:
        """vLLM's truncate_prompt_tokens: the last k prompt tokens (k = -1: max_model_len); k > max_model_len: a 400."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        k = self.max_model_len if k == -1 else k
        if k > self.max_model_len:
            raise EngineError(400, f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                              f"({self.max_model_len}). Please select a smaller truncation size.",
                              param="truncate_prompt_tokens")
        return ids[-k:] if k else []

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """A 400 naming param for a token id outside the vocabulary (before the engine sees it)."""
        vocab = self.engine.engine.spec.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(400, f"{param} token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def encode_for_embedding(self, text: str) -> list[int]:
        if self._embedding_max_length is None:
            return self.encode(text)
        return self.tokenizer(text, truncation=True, max_length=self._embedding_max_length).input_ids

    def check_generates(self) -> None:
        """A 400 naming the model kind when this build cannot generate (an encoder serves /v1/embeddings only)."""
        try:
            self._check_generates()
        except ValueError as exc:
            raise EngineError(400, str(exc), param="model") from None

    def token_str(self, token_id: int) -> str:
        """A token alone as text, for a position with no Logprob (an echoed prompt's first token)."""
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return s

    def token_text(self, token_id: int, lp: Logprob) -> str:
        """A scored token as text: the output processor's decoded_token (the same decode of it alone, done once
        there), else decoded here, as vLLM's _get_decoded_token falls back."""
        return lp.decoded_token if lp.decoded_token is not None else self.token_str(token_id)

    def prompt_logprobs_body(self, out: RequestOutput, num_top: int) -> PromptLogprobsBody:
        """vLLM's prompt_logprobs of one prompt's output: null first, then each position's prompt token and its
        num_top best, logprobs floored at LOGPROB_FLOOR (JSON has no -inf; vLLM's clamp_prompt_logprobs)."""
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
        return [
            None if position is None else {
                t: PromptLogprob(logprob=max(lp.logprob, LOGPROB_FLOOR), rank=lp.rank,
                                 decoded_token=self.token_text(t, lp))
                for t, lp in within_top(position, num_top).items()
            }
            for position in out.prompt_logprobs
        ]

    def params(self, req: SamplingRequest, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as exc:  # SamplingParams.validate is where every limit is checked
            raise _bad_request(req, exc) from None

    async def check_grammar(self, req: SamplingRequest, params: SamplingParams) -> None:
        """Structured output: compile the grammar (or find it cached) before queueing, off the event loop and the
        engine loop, so a schema, regex or grammar the compiler refuses is a 400 now."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.wrap_future(self.engine.engine.grammars.compile(params.structured_outputs))
        except GrammarError as exc:
            raise _bad_request(req, exc) from None


def response_id(prefix: str, header_id: str | None, req: SamplingRequest, engine_id: str) -> str:
    """vLLM's response id: prefix and the X-Request-Id header's value, else the body's request_id; else the engine's
    own id for the request (engine_id, as its logs name it). The engine's ids stay unique whatever a client sends;
    this is only the id the client sees."""
    if header_id is not None and not usable_request_id(header_id):
        header_id = None  # the guard answered with a fresh id for it in X-Request-Id
    if header_id or req.request_id:
        return f"{prefix}-{header_id or req.request_id}"
    return engine_id


def _bad_request(req: SamplingRequest, exc: ValueError) -> EngineError:
    """A 400 naming the request field: a structured-output error points at the field the client used."""
    message, param = str(exc), exc.param if isinstance(exc, InvalidParam) else None
    if param is not None and param.startswith("structured_outputs") and req.structured_field == "response_format":
        message = message.replace("structured_outputs.json_object", "response_format").replace(
            "structured_outputs.json", "response_format.json_schema.schema")
        param = "response_format"
    elif param is not None and param.startswith("structured_outputs.") and req.structured_field == "guided":
        param = "guided_" + param.removeprefix("structured_outputs.").split(".")[0]  # guided_json, guided_regex, ...
        message = message.replace("structured_outputs.", "guided_")
    return EngineError(400, message, param=param)
