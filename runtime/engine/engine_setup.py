"""The engine's parts, loaded from a build and checked before anything is served: tokenizer (beside the build's
hashing), model runner and KV cache, LoRA adapters, KV coordinator, scheduler, sampler, output processing. LLMEngine
(engine.py) adds requests and the step on top."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pllm.models.lora import LoraAdapter
from pllm.models.rotary import max_context_len, recompute_length
from pllm.models.spec import ModelKind
from pllm.runtime.engine.build_open import BuildOpening, open_verified
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.kv_coordinator import KvCoordinator
from pllm.runtime.engine.lora import LoraRegistry, LoRARequest
from pllm.runtime.engine.output_processor import OutputProcessor
from pllm.runtime.engine.pooler import Pooler
from pllm.runtime.engine.request import FinishReason, StopChecker
from pllm.runtime.engine.scheduler import Scheduler
from pllm.runtime.engine.structured_output import GrammarCache
from pllm.runtime.worker.kv_budget import describe_budget
from pllm.runtime.worker.parallel.runner import make_runner
from pllm.runtime.worker.sampler import Sampler
from pllm.runtime.worker.startup_timing import Stage, mark
from pllm.runtime.worker.text_loader import load_generation_config
from pllm.runtime.worker.warm_up import warm_up

logger = logging.getLogger("pllm")


def _default_logging() -> None:
    """Start-up facts (backend, KV-cache size) reach the user unless the application configured logging itself."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@dataclass
class EngineStats:
    """Cumulative counters the engine keeps as it steps."""

    num_prompt_tokens: int = 0  # computed (not cache-hit) prompt tokens, cumulative
    num_generation_tokens: int = 0
    num_steps: int = 0


class LoadedEngine:
    """An engine's parts over one build, loaded and checked; no request yet (LLMEngine adds them)."""

    def __init__(self, build_dir: str, config: EngineConfig, opening: BuildOpening | None = None):
        """opening: the build already being opened (pllm-serve starts that before its imports); else opened here."""
        _default_logging()
        self.config = config
        opened = open_verified(build_dir) if opening is None else opening.result()
        mark(Stage.TOKENIZER)
        self.build = opened.build
        spec = self.build.spec
        self.spec = spec
        self.tokenizer = opened.tokenizer
        self.generation_config = load_generation_config(self.build)
        # this process alone, or rank 0 of config.tensor_parallel_size (runtime/worker/parallel/)
        self.runner = make_runner(self.build, config, self._resolve_max_model_len(config), opened.weights)
        self.max_model_len = self.runner.max_model_len  # lowered to what the KV cache holds when not set
        self.loras = LoraRegistry(spec, config.max_loras)
        self._load_start_loras(config)
        recompute_past_len = recompute_length(spec)
        prefix_caching = config.enable_prefix_caching and recompute_past_len is None
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("pllm: prefix caching off: this model's K/V at every position depends on the sequence "
                        "length (longrope past %d tokens), not on the tokens alone", recompute_past_len)
        # an encoder's blocks are bookkeeping only (no cache behind them), and embeddings never read prefix hits
        prefix_caching = prefix_caching and spec.kind is ModelKind.DECODER
        self.kv = KvCoordinator.from_budgets(self.runner.kv_budgets, self.build.block_size, prefix_caching)
        if prefix_caching and not self.kv.enable_prefix_caching:
            logger.info("pllm: prefix caching off: windowed layers return the blocks that leave their window, so a "
                        "cached prefix would have holes where a later request's window still reads")
        self.eos_token_ids = self._eos_token_ids()
        speculative = config.speculative_config
        if speculative is not None and spec.kind is not ModelKind.DECODER:
            raise ValueError(f"speculative_config: model_type {spec.model_type!r} is an {spec.kind.value}, it does "
                             "not generate")
        if speculative is not None and recompute_past_len is not None:
            raise ValueError(
                f"speculative_config: not supported for this model: its K/V at every position depends on the "
                f"sequence length (longrope past {recompute_past_len} tokens), so a guessed token's K/V would be "
                "computed for a length the sequence may never reach")
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, self.eos_token_ids,
            recompute_past_len,
            chunk_prompts=spec.kind is ModelKind.DECODER,  # an encoder attends over its whole input at once
            speculative=speculative,
        )
        self.sampler = Sampler(spec.vocab_size, seed=config.seed)
        self.stop = StopChecker(frozenset(self.eos_token_ids))
        self.processor = OutputProcessor(
            self.tokenizer,
            self.stop,
            finish=lambda request_id: self.scheduler.finish_request(request_id, FinishReason.STOP),
        )
        pooling = self.build.pooling  # an encoder's recipe; decoders pool "last" and normalise by default
        self.pooler = Pooler(normalize=pooling.normalize if pooling else True)  # unfinished embedding requests
        self.default_pooling = pooling.pooling.value if pooling else "last"
        self.grammars = GrammarCache(self.tokenizer, spec.vocab_size, self.eos_token_ids)  # structured output
        self.stats = EngineStats()
        self._next_id = 0
        mark(Stage.ENGINE)
        if warm_up(self.runner):  # the first forward's one-time costs, before the first request
            mark(Stage.WARM_UP)
        if pooling is not None:
            logger.info(
                "pllm engine: backend=%s dtype=%s encoder, no KV cache; embeddings: %s pooling%s, inputs truncated "
                "to %d tokens (from %s), max_model_len=%d", self.runner.backend, self.build.dtype,
                pooling.pooling.value, ", L2-normalised" if pooling.normalize else "", pooling.max_seq_length,
                pooling.source, self.max_model_len,
            )
            return
        logger.info(
            "pllm engine: backend=%s dtype=%s KV cache %d blocks x %d tokens (%.1f MiB), max_model_len=%d",
            self.runner.backend,
            self.build.dtype,
            self.runner.num_blocks,
            self.build.block_size,
            sum(b.num_bytes for b in self.runner.kv_budgets) / 2**20,
            self.max_model_len,
        )
        logger.info("pllm engine: KV budget per layer group: %s",
                    describe_budget(self.runner.kv_budgets, self.build.block_size))
        if speculative is not None:
            logger.info("pllm engine: speculative decoding: n-gram lookup (n %d..%d), up to %d tokens a step",
                        speculative.prompt_lookup_min, speculative.prompt_lookup_max,
                        speculative.num_speculative_tokens)

    def close(self) -> None:
        """Stop what the engine started beyond this thread: a tensor-parallel engine's worker processes, the grammar
        process."""
        self.runner.close()
        self.grammars.shutdown()

    def check_workers(self) -> None:
        """Raise WorkerDied if a tensor-parallel worker process has exited (a no-op on one process)."""
        self.runner.check()

    # -- set-up -----------------------------------------------------------------------------------
    def _load_start_loras(self, config: EngineConfig) -> None:
        """The build's packed adapters, then config.lora_modules, read and checked before anything is served."""
        packed = [(name, str(self.build.path / folder)) for name, folder in self.build.loras]
        self.loras.load_starting(packed, list(config.lora_modules))
        if not self.loras.adapters:
            return
        self.runner.set_lora_adapters(self.loras.slots)
        logger.info("pllm engine: LoRA adapters %s (max rank %d)", ", ".join(self.loras.names()),
                    max(a.rank for a in self.loras.adapters))

    def add_lora(self, request: LoRARequest) -> int:
        """The slot of the request's adapter, loading it first when it is new; LoraError (a ValueError) names
        what is wrong. Call between steps (the runner restacks the adapters)."""
        slot = self.loras.slot_of(request)
        if slot is not None:
            return slot
        return self.install_lora(request, self.loras.load(request, self.busy_lora_slots()))

    def install_lora(self, request: LoRARequest, adapter: LoraAdapter) -> int:
        """Serve an adapter read and checked already (read_adapter, off this thread) under request.name: it takes
        a free slot, in place in the runner's stacks when it fits them; LoraError (the engine unchanged) when the
        name is loaded or no slot is free. Call between steps."""
        slot = self.loras.check_new(request, self.busy_lora_slots())
        self.runner.set_lora_slot(slot, adapter, self.loras.slots)
        return self.loras.add(request, adapter, slot)

    def remove_lora(self, name: str) -> int:
        """No new request may name the adapter; those running under it finish on its weights, and its slot is
        free once they are done. -> its slot; LoraError for a name not loaded."""
        return self.loras.remove(name)

    def busy_lora_slots(self) -> frozenset[int]:
        """The slots unfinished requests run under (running, waiting or preempted)."""
        return frozenset(r.lora_slot for r in (*self.scheduler.running, *self.scheduler.waiting) if r.lora_slot)

    def _resolve_max_model_len(self, config: EngineConfig) -> int:
        limit = max_context_len(self.spec)
        if config.max_model_len is None:
            return limit
        if config.max_model_len > limit:
            what = "max_position_embeddings" if limit == self.spec.max_position_embeddings else \
                "yarn's original_max_position_embeddings * factor"
            raise ValueError(
                f"engine setting max_model_len={config.max_model_len}: exceeds the model's limit {what}={limit}"
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
