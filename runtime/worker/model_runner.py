"""StepBatch -> input tensors + attention metadata -> model forward -> logits. Owns the device and KV cache."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pllm.compiler.manifest import BuildManifest
from pllm.models.kv_groups import kv_groups, layer_groups
from pllm.models.lora import LoraAdapter, check_lora_family, fits_stacks, stack_adapters, write_slot
from pllm.models.ops import AttentionMetadata, Ops
from pllm.models.registry import family_of
from pllm.models.spec import ModelKind
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.worker.cuda_graphs import Capture, DecodeGraphs, cuda_capture, default_capture_sizes
from pllm.runtime.worker.huge_pages import ResidentWeights
from pllm.runtime.worker.kv_budget import (
    GroupBudget,
    SchedulingLimits,
    max_tokens_held,
    split_budget,
    useful_bytes,
)
from pllm.runtime.worker.loader import load_weights
from pllm.runtime.worker.logprobs import prompt_logprobs_of
from pllm.runtime.worker.startup_timing import Stage, mark
from pllm.runtime.worker.step import Pooling, StepBatch, StepOutput, TokenLogprobs
from pllm.runtime.worker.step_inputs import StepInputs, prepare_step
from pllm.runtime.worker.zeroed import zeroed

if TYPE_CHECKING:
    from pllm.runtime.worker.parallel.group import RankShard

logger = logging.getLogger("pllm")

GRAPH_BACKENDS = ("cuda", "interpret")  # the backends whose steps can be captured (interpret: replayed eagerly)
CPU_KV_CACHE_CAP = 2 << 30  # bytes: the cpu backend shares RAM with everything else, so default to a modest pool


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""


def select_backend(name: str, build: BuildManifest, huge_pages: bool = False) -> tuple[Ops, torch.device, str]:
    """The one place that maps a backend name to ops and a device; `auto` resolves to cuda or cpu. huge_pages
    (EngineConfig's, cpu only): what the decode step streams kept in 2 MiB pages."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        from pllm.runtime.backends.cpu.cpu_kernels import choose_cpu_kernels
        from pllm.runtime.backends.cpu.cpu_ops import TorchOps

        choice = choose_cpu_kernels(build)
        (logger.warning if choice.op_by_op else logger.info)("pllm cpu backend: %s", choice.reason)
        ops = TorchOps(choice.attention, choice.rms_norm, choice.rope_kv_write, quant_kernel=choice.quant_linear,
                       decode_step=choice.decode_step, huge_pages=huge_pages,
                       prefill_attention=choice.prefill_attention)
        return ops, torch.device("cpu"), name
    if name == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("backend 'cuda' needs a CUDA GPU and a CUDA build of torch; none found")
    from pllm.runtime.backends.triton.triton_ops import TritonOps

    if name == "interpret":
        return TritonOps.from_build(build, interpret=True), torch.device("cpu"), name
    return TritonOps.from_build(build, interpret=False), torch.device("cuda"), name


class ModelRunner:
    def __init__(self, build: BuildManifest, config: EngineConfig, max_model_len: int,
                 shard: RankShard | None = None, resident: ResidentWeights | None = None):
        """shard: this runner is one rank of a tensor-parallel engine (runtime/worker/parallel/): its spec is the
        rank's share of the heads and MLP (the build's kernels were rendered for it), its weights that rank's
        file, its device that rank's, its model's collectives go through shard.comm. resident: the weights file
        already read into memory (loader.load_weights uses it on the cpu)."""
        self.shard = shard
        self._threads_before: int | None = None  # torch's thread count before config.num_threads set it (close)
        self.spec = build.rank_spec  # the whole model's, or one rank's share of a split build
        self.block_size = build.block_size
        self.ops, self.device, self.backend = select_backend(config.backend, build, config.huge_pages)
        if shard is not None:
            self.device = shard.device
        mark(Stage.KERNELS)
        if self.device.type == "cpu" and config.num_threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(config.num_threads)
        self.dtype = getattr(torch, build.dtype)
        if config.huge_pages and self.device.type != "cpu":
            logger.warning("pllm: huge_pages applies to weights in host memory; the %s backend ignores it",
                           self.backend)
        weights = load_weights(build, self.device, 0 if shard is None else shard.rank, config.huge_pages, resident)
        mark(Stage.WEIGHTS)
        family = family_of(self.spec.model_type, str(build.path))
        self.decode_graphs: DecodeGraphs | None = None
        self.num_lora_adapters = 0
        if self.spec.kind is ModelKind.ENCODER:
            self._init_encoder(config, max_model_len)
            self.model = family.model(self.spec, weights, self.ops, self.max_model_len)
            return
        self.kv_groups = kv_groups(self.spec)
        self.layer_group = layer_groups(self.kv_groups, self.spec.num_hidden_layers)  # [num_layers] group index
        limits = SchedulingLimits(config.max_num_seqs, config.max_num_batched_tokens, max_model_len)
        self.kv_budgets = self._plan_budgets(config, limits)
        if shard is not None:
            self.kv_budgets = shard.agree_budgets(self.kv_budgets)
        self.num_blocks = sum(b.num_blocks for b in self.kv_budgets)
        # Sized only now, so nothing below (rotary table, graph buffers) grows with a limit the cache cannot hold.
        self.max_model_len = self._fit_max_model_len(config, max_model_len)
        self.model = family.model(self.spec, weights, self.ops, self.max_model_len)
        if shard is not None:
            self.model.comm = shard.comm
        mark(Stage.MODEL)
        spec = self.spec
        # Per group one block more than its allocator hands out: the padding rows of captured decode steps write
        # there, and the table entries of blocks a window returned point there.
        self.pad_blocks = tuple(b.num_blocks for b in self.kv_budgets)
        # zeroed, so padding rows a kernel masks out never hold NaNs that 0 * NaN would spread; on the cpu the zeros
        # are the OS's untouched pages, so the pool costs nothing until blocks fill
        self.kv_cache = tuple(
            zeroed((len(b.group.layers), 2, b.num_blocks + 1, self.block_size, spec.num_key_value_heads,
                    spec.head_dim), self.dtype, self.device)
            for b in self.kv_budgets
        )
        per_layer = {layer: (cache[j, 0], cache[j, 1])
                     for cache, b in zip(self.kv_cache, self.kv_budgets, strict=True)
                     for j, layer in enumerate(b.group.layers)}
        self.kv_caches = [per_layer[i] for i in range(spec.num_hidden_layers)]  # per layer (k, v) of its group's pool
        mark(Stage.KV_POOL)
        # a split step runs eagerly: its collectives stay out of captured graphs
        if self.device.type == "cuda" and not config.enforce_eager and shard is None:
            sizes = config.cuda_graph_sizes or default_capture_sizes(config.max_num_seqs)
            self.decode_graphs = self._capture_or_eager(sizes)

    def _init_encoder(self, config: EngineConfig, max_model_len: int) -> None:
        """An encoder keeps no KV cache: each sequence is computed whole in one step and its K and V die with the
        step. The scheduler still admits by blocks, so it gets bookkeeping blocks, which cost no memory: enough
        for max_num_seqs sequences of max_model_len tokens, so admission is bounded by the sequence cap and the
        token budget alone and nothing is ever preempted."""
        if config.kv_cache_memory is not None:
            logger.warning("pllm: kv_cache_memory=%d is not used: an encoder keeps no KV cache", config.kv_cache_memory)
        self.kv_groups = kv_groups(self.spec)
        self.layer_group = layer_groups(self.kv_groups, self.spec.num_hidden_layers)
        self.num_blocks = config.max_num_seqs * -(-max_model_len // self.block_size)
        self.kv_budgets = (GroupBudget(self.kv_groups[0], self.num_blocks, 0),)
        self.max_model_len = max_model_len
        self.pad_blocks = (self.num_blocks,)
        self.kv_cache = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_lora_adapters(self, adapters: Sequence[LoraAdapter | None]) -> None:
        """Stack the adapters for the model (adapter i serves SeqStep.lora_slot i + 1; None an empty slot); replaces
        the earlier set."""
        check_lora_family(self.spec)
        if self.shard is not None and adapters:
            raise ValueError("LoRA adapters are not supported with tensor_parallel_size > 1 (adapters are not split)")
        self.model.lora_layers = stack_adapters(adapters, self.spec, self.dtype, self.device) if adapters else None
        self.num_lora_adapters = len(adapters)  # after the stacks: a failed restack leaves both as they were

    def set_lora_slot(self, slot: int, adapter: LoraAdapter, slots: Sequence[LoraAdapter | None]) -> None:
        """Put the adapter in `slot` (slots: the adapters held now, by slot): written over that slot's rows of the
        stacks in place when it fits them (its rank within theirs, its targets stacked), else all restacked.
        Between steps: the other slots keep serving unchanged."""
        layers = self.model.lora_layers
        if layers is not None and slot <= self.num_lora_adapters and fits_stacks(layers, slot - 1, adapter):
            write_slot(layers, slot - 1, adapter, self.spec)
            return
        held = list(slots) + [None] * (slot - len(slots))
        held[slot - 1] = adapter
        self.set_lora_adapters(held)

    def capture_decode_graphs(self, sizes: Sequence[int], capture: Capture = cuda_capture) -> DecodeGraphs:
        """Capture the decode forward for each batch size (on cuda; eager_capture replays without a GPU)."""
        # TritonOps read step data only from device tensors (host ints pick a kernel and its grid), so a captured
        # step replays correctly on new inputs copied into the same tensors; the cpu backend reads host copies.
        if self.backend not in GRAPH_BACKENDS:
            raise ValueError(f"backend {self.backend!r}: its ops read step data on the host, so cannot be captured")

        def forward(input_ids: torch.Tensor, metas: tuple[AttentionMetadata, ...]) -> torch.Tensor:
            return self.model.forward(input_ids, self._layer_metas(metas), self.kv_caches)

        with torch.inference_mode():
            return DecodeGraphs(forward, sizes, self.device, self.max_model_len, self.block_size, self.pad_blocks,
                                capture)

    def _layer_metas(self, metas: tuple[AttentionMetadata, ...]) -> tuple[AttentionMetadata, ...]:
        if len(metas) == 1:
            return metas * self.spec.num_hidden_layers
        return tuple(metas[g] for g in self.layer_group)

    def _capture_or_eager(self, sizes: Sequence[int]) -> DecodeGraphs | None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        try:
            graphs = self.capture_decode_graphs(sizes)
        except Exception as e:  # a model or driver the capture does not support: serve, slower, and say why
            logger.warning("pllm: CUDA graph capture failed (%s: %s); decode steps run eagerly", type(e).__name__, e)
            return None
        used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        logger.info("pllm: captured %d decode CUDA graphs (batch sizes %s) in %.1f s, %.0f MiB",
                    len(graphs.sizes), _ranges(graphs.sizes), time.perf_counter() - start, used)
        return graphs

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of one block of K and V in every layer (each group's block holds its own layers' share)."""
        spec = self.spec
        if spec.kind is ModelKind.ENCODER:
            return 0  # bookkeeping blocks only
        return spec.num_hidden_layers * self._layer_block_bytes

    @property
    def _layer_block_bytes(self) -> int:
        return 2 * self.block_size * self.spec.kv_size * self.dtype.itemsize

    def _plan_budgets(self, config: EngineConfig, limits: SchedulingLimits) -> tuple[GroupBudget, ...]:
        available = self._free_memory()
        if self.shard is not None and self.device.type == "cpu":
            available //= self.shard.size  # the ranks of a cpu run share one machine's RAM
        layer_bytes = self._layer_block_bytes
        if config.kv_cache_memory is not None:
            budget, source = config.kv_cache_memory, f"engine setting kv_cache_memory={config.kv_cache_memory}"
            if budget > available:  # refused here rather than by the allocator, or the OOM killer on a cpu
                raise ValueError(f"{source}: more than the {available} bytes of free {self.device.type} memory")
        else:
            budget = int(available * config.kv_cache_fraction)
            if self.device.type == "cpu":
                # capped, and never more than max_num_seqs full-length sequences could use: small models need less
                max_useful = useful_bytes(self.kv_groups, layer_bytes, limits, self.block_size)
                budget = min(budget, CPU_KV_CACHE_CAP, max_useful)
            source = (f"the KV-cache budget ({budget} bytes from kv_cache_fraction={config.kv_cache_fraction} of free "
                      f"{self.device.type} memory)")
        budgets = split_budget(self.kv_groups, layer_bytes, budget, limits, self.block_size)
        if min(b.num_blocks for b in budgets) < 2:
            raise ValueError(
                f"{source}: too small, it must hold 3 KV blocks of {self.kv_bytes_per_block} bytes; set "
                "kv_cache_memory"
            )
        return budgets

    def _free_memory(self) -> int:
        """Bytes the KV cache may take: free device memory, or on a cpu the RAM Linux can hand out without
        swapping (MemAvailable counts reclaimable page cache, which free pages alone do not)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def _fit_max_model_len(self, config: EngineConfig, max_model_len: int) -> int:
        """A sequence of max_model_len tokens must fit the cache: refuse an explicit limit that does not (as vLLM
        does); lower the model's default to what fits, and say so."""
        # the padding block holds no sequence's tokens; a windowed group holds only a window of a sequence
        capacity = max_tokens_held(self.kv_budgets, config.max_num_batched_tokens, self.block_size, max_model_len)
        if max_model_len <= capacity:
            return max_model_len
        if config.max_model_len is not None:
            raise ValueError(
                f"engine setting max_model_len={max_model_len}: larger than the maximum number of tokens that can "
                f"be stored in the KV cache ({capacity}); raise kv_cache_memory or lower max_model_len"
            )
        logger.warning(
            "pllm: max_model_len lowered from the model's %d to %d, the tokens the KV cache holds; set "
            "kv_cache_memory higher for longer sequences", max_model_len, capacity
        )
        return capacity

    def prepare(self, batch: StepBatch) -> StepInputs:
        return prepare_step(batch, self.block_size, self.pad_blocks, self.device, self.num_lora_adapters)

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> StepOutput:
        """Run one step: logits of the sequences that sample, pooled hidden states of those that pool."""
        return self.run(batch, self.prepare(batch))

    @torch.inference_mode()
    def run(self, batch: StepBatch, inputs: StepInputs) -> StepOutput:
        """execute's work once the step's tensors are made (a tensor-parallel rank 0 sends them out in between)."""
        hidden = None
        if inputs.lora is not None:  # adapters' steps run eagerly: the graphs hold the base model's decode
            hidden = self.model.forward(inputs.input_ids, self._layer_metas(inputs.metas), self.kv_caches, inputs.lora)
        elif self.decode_graphs is not None and inputs.meta.is_decode_only:
            hidden = self.decode_graphs.run(inputs.input_ids, inputs.metas)  # None: larger than any graph
        if hidden is None:
            hidden = self.model.forward(inputs.input_ids, self._layer_metas(inputs.metas), self.kv_caches)
        logits = self.model.logits(hidden[inputs.sample_indices])
        pooled = {}
        for i, start, end in inputs.pool_rows:
            seq = batch.seqs[i]
            if seq.pooling is Pooling.MEAN:
                rows = hidden[start:end].float()  # [num_new_tokens, hidden]
                whole = seq.completes and seq.start_position == 0
                pooled[seq.request_id] = rows.mean(0) if whole else rows.sum(0)
            elif seq.pooling is Pooling.CLS:  # the pooler keeps the first chunk's
                pooled[seq.request_id] = hidden[start].float()
            elif seq.completes:
                pooled[seq.request_id] = hidden[end - 1].float()
        return StepOutput(logits, pooled, self._prompt_logprobs(batch, hidden, inputs.prompt_logprob_rows))

    def _prompt_logprobs(
        self, batch: StepBatch, hidden: torch.Tensor, rows: torch.Tensor | None
    ) -> dict[str, list[TokenLogprobs]]:
        """Prompt logprobs of the chunks that ask, from their rows only: the LM head never sees the others."""
        if rows is None:
            return {}
        seqs = [s for s in batch.seqs if s.prompt_logprobs is not None]
        scored = prompt_logprobs_of(hidden[rows], self.model.logits, [s.prompt_logprobs for s in seqs])
        return {s.request_id: entries for s, entries in zip(seqs, scored, strict=True)}


    def close(self) -> None:
        """Give the process back torch's thread count as it was before num_threads set it (torch's setting is the
        process's: an engine started later, say one rank instead of two, would otherwise inherit this one's share).
        Nothing else to stop for a single process (a tensor-parallel runner stops its workers)."""
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def check(self) -> None:
        """Nothing can have died beside a single process (a tensor-parallel runner checks its workers)."""


def _ranges(sizes: Sequence[int]) -> str:
    """(1, 2, 4, 8, 16, 24) -> "1, 2, 4, 8..24"; the log line stays short with 35 sizes."""
    head = [n for n in sizes if n < 8]
    tail = [n for n in sizes if n >= 8]
    return ", ".join([*map(str, head), *([f"{tail[0]}..{tail[-1]}"] if len(tail) > 1 else map(str, tail))])
