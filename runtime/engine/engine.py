"""LLMEngine: add_request / step / abort over scheduler -> model runner -> sampler -> output processor."""

from __future__ import annotations

import dataclasses
import logging
import time

from pllm.models.lora import serves_lora
from pllm.models.spec import ModelKind
from pllm.runtime.engine.engine_setup import LoadedEngine
from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.engine.outputs import EmbeddingRequestOutput, EngineSnapshot, LoraSnapshot, RequestOutput
from pllm.runtime.engine.request import FinishReason, Request, RequestStatus, ScheduledBatch
from pllm.runtime.engine.sampling_params import SamplingParams, check_prompt_fits
from pllm.runtime.engine.structured_output import SequenceGrammar
from pllm.runtime.engine.vllm_args import check_prompt_keys
from pllm.runtime.worker.verify import sample_step

logger = logging.getLogger("pllm")


class LLMEngine(LoadedEngine):
    """The engine a caller drives: requests in (add_request, add_embedding_request, abort_request), step() runs one
    iteration and returns the outputs that changed. Its parts are loaded by LoadedEngine (engine_setup.py)."""

    # -- requests ---------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def tokenize(self, prompt: str | list[int] | dict, max_length: int | None = None,
                 tokenizes_empty_text: bool = False) -> tuple[str | None, list[int]]:
        """A text, a list of token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."} -> (text, ids); a text
        is truncated to max_length tokens when one is given (token ids are taken as they are).
        tokenizes_empty_text: an empty text is tokenized rather than refused, for an embedding: an encoder's tokenizer
        makes it [CLS] [SEP], which sentence-transformers embeds; what comes out with no tokens is still refused."""
        if isinstance(prompt, dict):
            check_prompt_keys(prompt, "prompt")
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt and not tokenizes_empty_text:
                raise ValueError("prompt is empty")
            ids = self.encode(prompt, "prompt", max_length=max_length)
            if not ids:
                raise ValueError("prompt is empty: the text has no tokens")
            vocab = self.spec.vocab_size
            if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:  # a tokenizer with more ids
                raise ValueError(f"prompt encodes to token id {bad} ({self.tokenizer.convert_ids_to_tokens(bad)!r}), "
                                 f"outside the model's vocabulary [0, {vocab}): the tokenizer holds tokens the model "
                                 "has no embedding for")
            return prompt, ids
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.spec.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is outside the vocabulary [0, {vocab})")
        return None, ids

    def encode(self, text: str, what: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Text -> token ids; ValueError naming `what` for text that is not valid Unicode (a lone surrogate)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{what} is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at character {e.start}"
            ) from None
        if max_length is not None:  # as sentence-transformers: the text's tokens cut, the special tokens kept
            return self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                                  max_length=max_length).input_ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def check_generates(self) -> None:
        """ValueError, naming the model kind, when this build cannot generate (an encoder only embeds)."""
        if self.spec.kind is not ModelKind.DECODER:
            raise ValueError(
                f"This model is an {self.spec.kind.value} (model_type {self.spec.model_type!r}): it serves "
                "embeddings only (LLM.embed, /v1/embeddings), not completions or chat"
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request, under a LoRA adapter when lora_request names one (loaded now if new); ValueError
        (naming what is wrong) for anything that can never run."""
        self.check_generates()
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if request_id in self.processor or request_id in self.pooler:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        params.validate_vocab(self.spec.vocab_size)
        check_prompt_fits(len(ids), self.max_model_len)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        params.check_output_size(len(ids), max_tokens)
        grammar = None
        if params.structured_outputs is not None:
            # compiled off this thread: until it is ready the request waits in the queue, not the batch
            grammar = self.grammars.compile(params.structured_outputs)
            if grammar.done() and grammar.exception() is not None:
                raise grammar.exception()
        lora_slot = self.add_lora(lora_request) if lora_request is not None else 0
        now = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:  # distinct but reproducible samples per sequence
                child_params = dataclasses.replace(params, seed=params.seed + index)
            if index > 0 and params.prompt_logprobs is not None:  # the prompt is shared: the first scores it
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(child_id, list(ids), child_params, now, max_tokens, lora_slot=lora_slot,
                              lora_name=lora_request.name if lora_request is not None else None,
                              lora_load=self.loras.load_number(lora_slot) if lora_slot else 0)
            if grammar is not None:
                request.grammar = SequenceGrammar(grammar, self.spec.vocab_size)  # each sequence its own matcher
            children.append(request)
        queued: list[Request] = []
        try:  # all or none: a later child can be refused too (its id "rid#i" taken by another request)
            for request in children:
                self.scheduler.add_request(request)
                queued.append(request)
        except ValueError:
            for request in queued:  # no output would ever reach them: they must not run
                self.scheduler.abort_request(request.request_id)
            raise
        self.processor.add(request_id, text, children, now)

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its sequences) and free its blocks at once; unknown ids are ignored."""
        if self.pooler.forget(request_id):
            self.scheduler.abort_request(request_id)
            return
        for rid in self.processor.abort(request_id):
            self.scheduler.abort_request(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_unfinished_requests(self) -> bool:
        """vLLM's LLMEngine name for has_unfinished (its offline loop: add_request, then step while this holds)."""
        return self.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        """vLLM's LLMEngine name for num_unfinished_requests."""
        return self.num_unfinished_requests()

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) counted in requests, not sequences: n > 1 is one request, running while any of its
        sequences is in the batch."""
        running = {self._group_id(r) for r in self.scheduler.running}
        waiting = {self._group_id(r) for r in self.scheduler.waiting} - running
        return len(running), len(waiting)

    def get_tokenizer(self):
        """The tokenizer requests are encoded and decoded with (vLLM's LLMEngine.get_tokenizer)."""
        return self.tokenizer

    def running_request_ids(self) -> set[str]:
        """Ids of the user requests with a sequence in the running batch, and, after a step that raised, those that
        step ran (what it was running): one may have finished in the scheduler before the step raised, and then
        would never get an output, however long its caller waits."""
        stepped = {rid for rid in self._step_request_ids if rid in self.processor or rid in self.pooler}
        return {self._group_id(r) for r in self.scheduler.running} | stepped

    def snapshot(self) -> EngineSnapshot:
        """The engine's counters and gauges now, for metrics and admission control."""
        num_running, num_waiting = self.num_requests()
        return EngineSnapshot(
            num_running=num_running,
            num_waiting=num_waiting,
            num_running_seqs=self.scheduler.num_running,
            max_num_seqs=self.scheduler.max_num_seqs,
            kv_cache_usage=self.kv.usage,
            num_generation_tokens=self.stats.num_generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache=self.kv.prefix_cache_stats,
            spec_decode_num_drafts=self.scheduler.spec_stats.num_drafts,
            spec_decode_num_draft_tokens=self.scheduler.spec_stats.num_draft_tokens,
            spec_decode_num_accepted_tokens=self.scheduler.spec_stats.num_accepted_tokens,
            lora=self._lora_snapshot(),
        )

    def _lora_snapshot(self) -> LoraSnapshot | None:
        if not serves_lora(self.spec) or self.config.tensor_parallel_size > 1:
            return None  # no adapter can be served (a family models/lora.py does not read; adapters are not split)

        def names(requests) -> tuple[str, ...]:
            return tuple(sorted({r.lora_name for r in requests if r.lora_name is not None}))

        running, waiting = names(self.scheduler.running), names(self.scheduler.waiting)
        if not (self.loras.requests or running or waiting):
            return None  # no adapter loaded, none draining: a request can name none (vLLM: LoRA off)
        return LoraSnapshot(self.loras.max_loras, running, waiting)

    def _group_id(self, request: Request) -> str:
        return request.request_id if request.pooling is not None else self.processor.group_id(request)

    # -- the step ---------------------------------------------------------------------------------
    # The user requests of the step in progress; left set only by a step that raised (running_request_ids).
    _step_request_ids: frozenset[str] = frozenset()

    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """One engine iteration: schedule, run the model, sample, update; returns outputs that changed."""
        self._step_request_ids = frozenset()
        refused = self._refuse_failed_grammars()
        self._step_request_ids = frozenset(self._group_id(r) for r in refused)
        batch = self.scheduler.schedule()
        self._step_request_ids |= {self._group_id(s.request) for s in batch.seqs}
        outputs = self._run(refused, batch)
        self._step_request_ids = frozenset()
        return outputs

    def _run(self, refused: list[Request], batch: ScheduledBatch) -> list[RequestOutput | EmbeddingRequestOutput]:
        for request in batch.preempted:
            if request.pooling is not None:
                self.pooler.restart(request)
        if batch.is_empty:
            return self.processor.process(refused, [None] * len(refused)) if refused else []
        step = batch.snapshot(self.stop)
        step_out = self.runner.execute(step)
        sampling = [s.request for s in batch.seqs if s.samples]
        out = sample_step(self.sampler, step_out.logits, step)  # drafts verified here
        lengths = {r.request_id: r.num_tokens for r in sampling}
        self.scheduler.update(batch, {r.request_id: o.token_ids for r, o in zip(sampling, out)})
        self.stats.num_steps += 1
        self.stats.num_prompt_tokens += sum(
            s.num_new_tokens for s in batch.seqs if s.request.num_computed_tokens <= s.request.num_prompt_tokens
        )
        self.stats.num_generation_tokens += sum(r.num_tokens - lengths[r.request_id] for r in sampling)
        now = time.monotonic()
        pooled = self.pooler.fold(step_out.pooled, now) if step_out.pooled else []
        return self.processor.process(
            refused + sampling, [None] * len(refused) + [o.logprobs for o in out], now, step_out.prompt_logprobs
        ) + pooled

    def _refuse_failed_grammars(self) -> list[Request]:
        """Finish (abort) the waiting requests whose grammar failed to compile. Callers that check the grammar
        before queueing (the server, LLM.generate) never queue one; an output still tells anyone who did."""
        failed = [r for r in self.scheduler.waiting if r.grammar is not None and r.grammar.error() is not None]
        for request in failed:
            # the error can quote the client's regex or schema: escaped, it stays one log line with no control codes
            error = str(request.grammar.error()).encode("unicode_escape").decode("ascii")
            logger.warning("request %s: %s", ascii(request.request_id), error)
            self.scheduler.finish_request(request.request_id, FinishReason.ABORT)
        return failed

    # -- embeddings -------------------------------------------------------------------------------
    def add_embedding_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        pooling: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue an embedding request: prefill only, scheduled with the rest, one vector when done. pooling None:
        the build's (an encoder's recipe; "last" for decoders). An encoder's texts are truncated as
        sentence-transformers truncates them."""
        if request_id in self.processor or request_id in self.pooler:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.tokenize(prompt, self.embedding_max_length, tokenizes_empty_text=True)[1]
        request = self.pooler.new_request(request_id, ids, pooling or self.default_pooling, arrival_time)
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your input "
                f"contains {len(ids)} tokens."
            )
        self.scheduler.add_request(request)
        self.pooler.track(request)

    @property
    def embedding_max_length(self) -> int | None:
        """Tokens a text to embed is truncated to (an encoder's max_seq_length); None: never truncated."""
        return self.build.pooling.max_seq_length if self.build.pooling else None

    # -- introspection ----------------------------------------------------------------------------
    def num_unfinished_requests(self) -> int:
        return len(self.processor) + len(self.pooler)

    def request_status(self, request_id: str) -> RequestStatus | None:
        request = self.processor.request(request_id)
        return request.status if request else None

