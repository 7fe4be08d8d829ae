"""LLMEngine: add_request / step / abort over scheduler -> model runner -> sampler, with detokenisation."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from pllm.compiler.manifest import open_build
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from pllm.runtime.engine.kv_cache import KVCacheManager
from pllm.runtime.engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from pllm.runtime.engine.pooler import Pooler
from pllm.runtime.engine.request import FinishReason, Request, RequestStatus
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.scheduler import Scheduler
from pllm.runtime.worker.loader import load_generation_config, load_tokenizer
from pllm.runtime.worker.model_runner import ModelRunner
from pllm.runtime.worker.sampler import Sampler

logger = logging.getLogger("pllm")


def _default_logging() -> None:
    """Start-up facts (backend, KV-cache size) reach the user unless the application configured logging itself."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclass
class _SeqState:
    """Engine-side state of one sequence: its text so far and how it is being built."""

    request: Request
    group_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    text: str = ""
    num_processed: int = 0  # output tokens already turned into text
    stop_reason: str | int | None = None
    logprobs: list | None = None
    cumulative_logprob: float = 0.0


@dataclass
class _Group:
    """One user request: n sequences sharing a prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_SeqState]
    metrics: dict = field(default_factory=dict)


@dataclass
class EngineStats:
    num_prompt_tokens: int = 0  # computed (not cache-hit) prompt tokens, cumulative
    num_generation_tokens: int = 0
    num_steps: int = 0


class LLMEngine:
    def __init__(self, build_dir: str, config: EngineConfig):
        _default_logging()
        self.config = config
        self.build = open_build(build_dir)
        spec = self.build.spec
        self.spec = spec
        self.tokenizer = load_tokenizer(self.build)
        self.generation_config = load_generation_config(self.build)
        self.runner = ModelRunner(self.build, config, self._resolve_max_model_len(config))
        self.max_model_len = self.runner.max_model_len  # lowered to what the KV cache holds when not set
        self.kv = KVCacheManager(self.runner.num_blocks, self.build.block_size, config.enable_prefix_caching)
        self.eos_token_ids = self._eos_token_ids()
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, self.eos_token_ids
        )
        self.sampler = Sampler(spec.vocab_size, self.eos_token_ids, seed=config.seed)
        self.groups: dict[str, _Group] = {}
        self.seq_states: dict[str, _SeqState] = {}
        self.pooler = Pooler()  # unfinished embedding requests
        self.stats = EngineStats()
        self._next_id = 0
        logger.info(
            "pllm engine: backend=%s dtype=%s KV cache %d blocks x %d tokens = %d tokens (%.1f MiB), max_model_len=%d",
            self.runner.backend,
            self.build.dtype,
            self.runner.num_blocks,
            self.build.block_size,
            self.runner.num_blocks * self.build.block_size,
            self.runner.num_blocks * self.runner.kv_bytes_per_block / 2**20,
            self.max_model_len,
        )

    # -- set-up -----------------------------------------------------------------------------------
    def _resolve_max_model_len(self, config: EngineConfig) -> int:
        limit = self.spec.max_position_embeddings
        if config.max_model_len is None:
            return limit
        if config.max_model_len > limit:
            raise ValueError(
                f"engine setting max_model_len={config.max_model_len}: exceeds the model's limit "
                f"max_position_embeddings={limit}"
            )
        return config.max_model_len

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.spec.eos_token_ids)
        gen_eos = self.generation_config.get("eos_token_id")
        for t in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(ids)

    # -- requests ---------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def tokenize(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """A text, a list of token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."} -> (text, ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.encode(prompt, "prompt")
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.spec.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is outside the vocabulary [0, {vocab})")
        return None, ids

    def encode(self, text: str, what: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids; ValueError naming `what` for text that is not valid Unicode (a lone surrogate)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{what} is not valid Unicode: {e.reason} {text[e.start:e.end]!r} at character {e.start}"
            ) from None
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def add_request(
        self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        """Queue a request; ValueError (naming what is wrong) for anything that can never run."""
        if request_id in self.groups or request_id in self.pooler:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        params.validate_vocab(self.spec.vocab_size)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"contains {len(ids)} input tokens, which leaves no room for output tokens."
            )
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        now = time.monotonic() if arrival_time is None else arrival_time
        group = _Group(request_id, text, ids, [], {"arrival_time": now})
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:  # distinct but reproducible samples per sequence
                child_params = dataclasses.replace(params, seed=params.seed + index)
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            req = Request(child_id, list(ids), child_params, now, max_tokens)
            state = _SeqState(
                req,
                request_id,
                index,
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                StopStringMatcher(params.stop_strings, params.include_stop_str_in_output),
                logprobs=[] if params.logprobs is not None else None,
            )
            children.append(state)
        for state in children:  # all-or-nothing: validate every child before queueing any
            self.scheduler.add_request(state.request)
            group.seqs.append(state)
            self.seq_states[state.request.request_id] = state
        self.groups[request_id] = group

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its sequences) and free its blocks at once; unknown ids are ignored."""
        if self.pooler.forget(request_id):
            self.scheduler.abort_request(request_id)
            return
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for state in group.seqs:
            rid = state.request.request_id
            self.scheduler.abort_request(rid)
            self.sampler.free(rid)
            self.seq_states.pop(rid, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) counted in requests, not sequences: n > 1 is one request, running while any of its
        sequences is in the batch."""
        running = {self._group_id(r) for r in self.scheduler.running}
        waiting = {self._group_id(r) for r in self.scheduler.waiting} - running
        return len(running), len(waiting)

    def _group_id(self, request: Request) -> str:
        return request.request_id if request.pooling is not None else self.seq_states[request.request_id].group_id

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """One engine iteration: schedule, run the model, sample, update; returns outputs that changed."""
        batch = self.scheduler.schedule()
        for request in batch.preempted:
            if request.pooling is not None:
                self.pooler.restart(request)
        if batch.is_empty:
            return []
        step_out = self.runner.execute(batch)
        sampling = [s.request for s in batch.seqs if s.samples]
        out = self.sampler.sample(step_out.logits, sampling)
        sampled = {r.request_id: t for r, t in zip(sampling, out.token_ids)}
        self.scheduler.update(batch, sampled)
        self.stats.num_steps += 1
        self.stats.num_prompt_tokens += sum(
            s.num_new_tokens for s in batch.seqs if s.request.num_computed_tokens <= s.request.num_prompt_tokens
        )
        self.stats.num_generation_tokens += len(sampling)
        now = time.monotonic()
        pooled = self.pooler.fold(step_out.pooled, now) if step_out.pooled else []
        changed: dict[str, _Group] = {}
        for req, logprobs in zip(sampling, out.logprobs):
            state = self.seq_states.get(req.request_id)
            if state is None:
                continue
            self._process_tokens(state, logprobs)
            group = self.groups[state.group_id]
            group.metrics.setdefault("first_token_time", now)
            changed[group.request_id] = group
        return [self._output(g, now) for g in changed.values()] + pooled

    def _process_tokens(self, state: _SeqState, logprobs) -> None:
        req = state.request
        new_ids = req.output_token_ids[state.num_processed :]
        state.num_processed = len(req.output_token_ids)
        if state.logprobs is not None and logprobs is not None and new_ids:
            state.logprobs.append(logprobs)
            state.cumulative_logprob += logprobs.logprob
        stop_ids = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        for pos, token_id in enumerate(new_ids, start=len(req.output_token_ids) - len(new_ids)):
            if state.stop_reason is not None:
                break
            is_final_stop = (
                req.finish_reason is FinishReason.STOP
                and pos == len(req.output_token_ids) - 1
                and token_id in stop_ids
            )
            if is_final_stop and not req.params.include_stop_str_in_output:
                continue  # like vLLM: the stop token's own text is not part of the output
            emit, hit = state.matcher.feed(state.detokenizer.add(token_id))
            state.text += emit
            if hit:
                state.stop_reason = state.matcher.stop_string
                if not req.is_finished:
                    self.scheduler.finish_request(req.request_id, FinishReason.STOP)
        if req.is_finished and state.stop_reason is None:
            emit, hit = state.matcher.feed(state.detokenizer.flush())
            state.text += emit
            if hit:
                state.stop_reason = state.matcher.stop_string
            else:
                state.text += state.matcher.flush()
                last = req.output_token_ids[-1] if req.output_token_ids else None
                if req.finish_reason is FinishReason.STOP and last in req.params.stop_token_ids:
                    state.stop_reason = last

    def _output(self, group: _Group, now: float) -> RequestOutput:
        finished = all(s.request.is_finished for s in group.seqs)
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.request.output_token_ids),
                finish_reason=s.request.finish_reason.value if s.request.finish_reason else None,
                stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for s in group.seqs
        ]
        if finished:
            group.metrics["finished_time"] = now
            del self.groups[group.request_id]
            for s in group.seqs:
                self.sampler.free(s.request.request_id)
                self.seq_states.pop(s.request.request_id, None)
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outputs,
            finished,
            group.seqs[0].request.num_cached_tokens,
            dict(group.metrics),
        )

    # -- embeddings -------------------------------------------------------------------------------
    def add_embedding_request(
        self, request_id: str, prompt: str | list[int] | dict, pooling: str = "last", arrival_time: float | None = None
    ) -> None:
        """Queue an embedding request: prefill only, scheduled with the rest, one L2-normalised vector when done."""
        if request_id in self.groups or request_id in self.pooler:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.tokenize(prompt)[1]
        request = self.pooler.new_request(request_id, ids, pooling, arrival_time)
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your input "
                f"contains {len(ids)} tokens."
            )
        self.scheduler.add_request(request)
        self.pooler.track(request)

    # -- introspection ----------------------------------------------------------------------------
    def num_unfinished_requests(self) -> int:
        return len(self.groups) + len(self.pooler)

    def request_status(self, request_id: str) -> RequestStatus | None:
        state = self.seq_states.get(request_id)
        return state.request.status if state else None

