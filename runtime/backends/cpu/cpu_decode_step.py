"""The build's compiled decode step (kernels/cpu_decode_step.so): every layer of a one-token-per-sequence step in
one call, and the DecodeStack the llama wiring runs it through."""

from __future__ import annotations

import ctypes
import enum
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pllm.models.ops import AttentionMetadata
from pllm.models.quant import ACTIVATION_BLOCK, QuantizedWeight, QuantScheme
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.cpu_quant_linear import WIDE_FLOATS, scales_fit, scales_fp16

logger = logging.getLogger("pllm")

# The kernel's LayerWeights in int64 words: input_norm, post_norm, qkv_bias (0 without one), q_norm and k_norm (0
# without q/k norm), then per linear (qkv, o, gate_up, down) its LinearWeight: kind, data, scales, mins, group,
# scale type, panels (0 without)
NORMS = ("input_norm", "post_norm", "qkv_bias", "q_norm", "k_norm")
LINEARS = ("qkv", "o", "gate_up", "down")
WORDS_PER_LINEAR = 7
WEIGHT_WORDS_PER_LAYER = len(NORMS) + WORDS_PER_LINEAR * len(LINEARS)
# The packed rows' vector (cpu_quant_linear's, as cpu_kernels.QUANT_LANES): groups of whole vectors of codes
PACKED_LANES = 16


class WeightKind(enum.IntEnum):
    """The kernel's WeightKind: how the build keeps one linear's weight."""

    FLOAT = 0
    INT8 = 1
    INT4 = 2
    INT4_SYM = 3


PACKED_KINDS = {QuantScheme.INT8: WeightKind.INT8, QuantScheme.INT4: WeightKind.INT4,
                QuantScheme.INT4_SYM: WeightKind.INT4_SYM}


class GemvIsa(enum.IntEnum):
    """The best GEMV code the step may choose (pllm_decode_step_limit_isa's levels): the best this CPU runs (a bf16
    build's AMX tiles where present, else as AVX512), AVX-512 where present, the x86-64 baseline (AVX2 + FMA tiles;
    the generic code on other machines), the generic vector code. A level the CPU lacks runs the next below it."""

    BEST = 3
    AVX512 = 2
    BASELINE = 1
    GENERIC = 0
# The most sequences a step runs compiled where the per-op path's GEMM is F.linear (fp32; bf16 on a CPU where
# oneDNN has no bf16 GEMM, widened to fp32): the kernel's own limit. SmolLM2 on the AVX2-only EPYC
# (tools/bench_decode_step.py, README): fp32 1.39x faster compiled at 32 sequences, 1.07x at 64; bf16 1.32x and
# 1.11x (medians 1.53x, 1.36x); on the AVX-512 BF16 VM fp32 1.67x at 16, the most measured there.
MAX_COMPILED_BATCH = 64
# ... and where oneDNN's packed bf16 GEMM is the per-op path's: 1.18x faster compiled at 16 sequences on the AVX-512
# BF16 VM once the GEMV tiles kept their sums in registers (0.71x before), not measured past 16
COMPILED_BATCH_BEFORE_ONEDNN = 16
# ... and where the step's GEMV runs AMX tiles (bf16 on a CPU with AMX-BF16; oneDNN's GEMM uses them too): SmolLM2's
# whole step on a 2-core Sapphire Rapids VM 1.75x faster compiled at 16 sequences, 1.46x at 32, level at 64
# (tools/bench_decode_step.py)
COMPILED_BATCH_BEFORE_ONEDNN_AMX = 32
# With packed weights (any linear of the model): the step runs the per-op path's packed GEMV, which reads the codes
# once per step whatever the batch; compiled it only saves the crossings, so up to the kernel's limit (measured:
# README, tools/bench_decode_step.py; on the AVX2-only EPYC, bf16 builds of SmolLM2, int8 1.14x faster compiled at
# 32 sequences and 1.13x at 64, the Q4_1 file kept (gguf) 1.17x and 1.08x)
MAX_COMPILED_BATCH_PACKED = 64

# The step's GEMV reads rows of whole vectors of this many elements (the plan's LANES)
GEMV_LANES = 8
# Ops.linear runs the step's GEMV up to this many rows of x where the float GEMM past it is F.linear (fp32; bf16 on a
# CPU where oneDNN cannot pack bf16): on the AVX2-only EPYC the LM head of SmolLM2 (49152 x 576) in fp32 streamed
# at 24.3 against F.linear's 10.1 GB/s at batch 1, 19.6 against 4.5 at 4, 13.5 against 4.5 at 8, and SmolLM2's
# layer shapes 7-10 against 6 GB/s at 16 (tools/bench_gemv_bandwidth.py); torch's bf16 GEMM there is slower still.
# Past 16 rows, the same VM, weights streamed: the LM head 3.1x faster than F.linear at 16 rows, 2.3x at 32, 1.8x at
# 64 (fp32), 8.4x to 2.9x than the widened bf16 GEMM; a 3072 x 576 layer 1.9x to 1.2x (fp32), 1.8x to level (bf16).
# So up to the kernel's limit (MAX_COMPILED_BATCH, which the library confirms).
GEMV_LINEAR_MAX_ROWS = 64
# ... and up to this many where oneDNN's packed bf16 GEMM is the alternative: the same LM head streamed at 49
# against 40 GB/s at batch 1, 40 against 30 at batch 4 on the AVX-512 BF16 VM
GEMV_BEFORE_ONEDNN_MAX_ROWS = 4
# ... and where the GEMV runs AMX tiles: the LM head at 16.9 against 13.3 GB/s at 16 rows, 9.9 against 8.6 at 32,
# 5.3 against 9.6 at 64 on the Sapphire Rapids VM (tools/bench_gemv_bandwidth.py)
GEMV_BEFORE_ONEDNN_MAX_ROWS_AMX = 32
AMX_ISA = "amx_bf16"  # CpuDecodeStep.isa where the GEMV runs AMX tiles

# What keeps a model off the compiled step, as the start-up log says it (the compiler's cpu_decode_step.supported
# decides what the build carries; these name the reason)
NOT_COMPILED: tuple[tuple[str, Callable[[ModelSpec], bool]], ...] = (
    ("sliding-window layers", lambda spec: bool(spec.sliding_layers)),
    ("mixture of experts", lambda spec: spec.moe is not None),
    ("gemma's norm", lambda spec: bool(spec.norm_weight_offset)),
    ("attention soft-cap", lambda spec: spec.attn_logit_softcapping is not None),
    ("partial rotary", lambda spec: spec.rotary_dim != spec.head_dim),
)


def compiled_batch_limit(dtype: torch.dtype, packed: bool, floats: bool, amx: bool = False) -> int:
    """The most sequences a step runs compiled (before the kernel's own limit): past it the per-op path is as fast
    or faster. By what that path runs for the step's linears, packed (some are) and float (some are; a GGUF build
    mixes them): packed ones their GEMV (MAX_COMPILED_BATCH_PACKED), float ones F.linear (MAX_COMPILED_BATCH) or for
    bf16 oneDNN's packed GEMM where the CPU has it (COMPILED_BATCH_BEFORE_ONEDNN, or with the step's float GEMV on
    AMX tiles, amx, COMPILED_BATCH_BEFORE_ONEDNN_AMX); the least of those that apply."""
    limits = [MAX_COMPILED_BATCH]
    if packed:
        limits.append(MAX_COMPILED_BATCH_PACKED)
    if floats and dtype == torch.bfloat16 and onednn.onednn_packs_bf16():
        limits.append(COMPILED_BATCH_BEFORE_ONEDNN_AMX if amx else COMPILED_BATCH_BEFORE_ONEDNN)
    return min(limits)


def why_no_decode_step(spec: ModelSpec, dtype: str) -> str:
    """Why a build carries no compiled decode step, for the start-up log."""
    features = [label for label, has in NOT_COMPILED if has(spec)]
    if features:
        return ", ".join(features)
    return f"not compiled for {spec.model_type} in {dtype} (llama, mistral, qwen2, qwen3 in float32/bfloat16 only)"


def _check_gemv(status: int, x: torch.Tensor, weight: torch.Tensor) -> None:
    """pllm_gemv(_many)'s status as an error naming the shapes: -1 no memory for the prepared input, -2 a batch past
    the kernel's limit or rows not whole vectors."""
    if status == -1:
        raise MemoryError(f"gemv of {tuple(x.shape)} x {tuple(weight.shape)}: no memory for its prepared input")
    if status != 0:
        raise ValueError(f"gemv of {tuple(x.shape)} x {tuple(weight.shape)}: batch past the kernel's limit or rows "
                         "not whole vectors")


class CpuDecodeStep:
    """kernels/cpu_decode_step.so, specialised to one model, dtype and block size."""

    def __init__(self, library: Path, spec: ModelSpec, dtype: torch.dtype, block_size: int):
        self.spec, self.dtype, self.block_size = spec, dtype, block_size
        self.library = library
        lib = ctypes.CDLL(str(library))  # after `import torch`: binds to torch's libgomp
        # the weight table's layout: a library from before it had this function (AttributeError) or with another
        # width reads the table this runtime builds as something else, so neither is run (the loader says why)
        words = int(lib.pllm_decode_step_weight_words())
        if words != WEIGHT_WORDS_PER_LAYER:
            raise OSError(f"{library}: its decode step reads {words}-word layer tables, this pllm writes "
                          f"{WEIGHT_WORDS_PER_LAYER}")
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        self._step = lib.pllm_decode_step
        self._step.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i32, ptr, ptr, ctypes.c_float,
                               ctypes.c_int]
        self._step.restype = ctypes.c_int
        self._gemv = lib.pllm_gemv
        self._gemv.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        self._gemv.restype = ctypes.c_int
        self._gemv_many = lib.pllm_gemv_many
        self._gemv_many.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
        self._gemv_many.restype = ctypes.c_int
        self._isa = lib.pllm_decode_step_isa
        self._isa.restype = ctypes.c_char_p
        self._limit_isa = lib.pllm_decode_step_limit_isa
        self._limit_isa.argtypes = [ctypes.c_int]
        self._tiles_k = lib.pllm_decode_step_tiles_k
        self.packed = bool(lib.pllm_decode_step_packed())  # rendered for a build with packed weights: reads them
        self.amx_compiled = bool(lib.pllm_decode_step_amx_compiled())  # built with AMX tiles (bf16, new toolchain)
        self.kernel_max_batch = int(lib.pllm_decode_step_max_batch())  # the most rows of x one call takes
        self.tiles_k = int(self._tiles_k())  # the library's choice, read again by limit_isa: see tiles_for

    @property
    def isa(self) -> str:
        """The GEMV code this CPU runs: "amx_bf16" (a bf16 build on a CPU with AMX-BF16 that Linux lets this
        process use), "avx512_bf16" or "avx512f" (by the dtype), "avx2" (an AVX2-only x86-64 CPU), or "generic"
        (LANES-wide vector code: other machines)."""
        return self._isa().decode()

    def limit_isa(self, level: GemvIsa) -> None:
        """The best GEMV inner loop the step may choose (for tests and benchmarks; a process-wide choice of the
        library)."""
        self._limit_isa(int(level))
        self.tiles_k = int(self._tiles_k())

    def batch_limit(self, packed: bool, floats: bool) -> int:
        """The most sequences a step over linears of these kinds runs compiled: compiled_batch_limit, within the
        kernel's own limit."""
        return min(self.kernel_max_batch, compiled_batch_limit(self.dtype, packed, floats, self.tiles_for_all()))

    def tiles_for(self, in_features: int) -> bool:
        """Whether a float GEMV of this input width runs AMX tiles (from AMX_MIN_BATCH rows): the library chose them
        (tiles_k, the input elements per tile step, is not 0) and the width is whole tile steps. Read on every
        Ops.linear, so no call into the library."""
        return self.tiles_k > 0 and in_features % self.tiles_k == 0

    def tiles_for_all(self) -> bool:
        """Whether every float linear of the step's model runs AMX tiles (input widths hidden, q, intermediate)."""
        spec = self.spec
        return all(self.tiles_for(width) for width in (spec.hidden_size, spec.q_size, spec.intermediate_size))

    @property
    def max_batch(self) -> int:
        """batch_limit for linears of every kind the build may hold (bound to its weights, a stack of packed linears
        only may take more: CompiledDecodeStack.max_batch)."""
        return self.batch_limit(self.packed, floats=True)

    def gemv_runs(self, weight: torch.Tensor, x: torch.Tensor, max_rows: int) -> bool:
        """Whether Ops.linear should hand x @ weight.T to gemv: the build's dtype, 1 to max_rows rows of x (at most
        the kernel's limit), rows of whole vectors."""
        rows = min(max_rows, self.kernel_max_batch)
        return (weight.dtype == x.dtype == self.dtype and weight.dim() == 2 and weight.is_contiguous()
                and weight.device.type == "cpu" and x.shape[-1] == weight.shape[1] and weight.shape[1] % GEMV_LANES == 0
                and 0 < x.numel() <= rows * weight.shape[1])

    def gemv(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [B, in] @ weight [out, in].T -> [B, out] float32, through the step's GEMV (tests and benchmarks)."""
        assert weight.dtype == x.dtype == self.dtype and weight.is_contiguous() and x.is_contiguous()
        assert weight.dim() == x.dim() == 2 and weight.shape[1] == x.shape[1], (weight.shape, x.shape)
        y = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
        status = self._gemv(weight.data_ptr(), weight.shape[0], weight.shape[1], x.data_ptr(), x.shape[0],
                            y.data_ptr(), torch.get_num_threads())
        _check_gemv(status, x, weight)
        return y

    def gemv_stream(self, weights: Sequence[torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A call that runs the step's GEMV of x over each of these same-shaped matrices in turn, in one parallel
        region as the step runs its linears (benchmarks: the weights' streaming rate without a call per matrix).
        Returns the last product, [B, out] float32."""
        first = weights[0]
        for w in weights:
            assert w.dtype == x.dtype == self.dtype and w.is_contiguous() and w.shape == first.shape, w.shape
        assert x.dim() == first.dim() == 2 and x.is_contiguous() and first.shape[1] == x.shape[1], x.shape
        table = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64)
        y = torch.empty((x.shape[0], first.shape[0]), dtype=torch.float32)
        args = (table.data_ptr(), len(weights), first.shape[0], first.shape[1], x.data_ptr(), x.shape[0], y.data_ptr())
        keep = (table, list(weights), x)

        def run() -> torch.Tensor:
            assert keep
            _check_gemv(self._gemv_many(*args, torch.get_num_threads()), x, first)
            return y

        return run

    def bind(self, layers: Sequence, final_norm: torch.Tensor, scale: float, rope_tables: Callable,
             panels: Callable[[QuantizedWeight], torch.Tensor | None] | None = None) -> CompiledDecodeStack | str:
        """The stack over these weights, or why it cannot run them (a foreign weight, or a packed one the kernel
        does not read). panels: the packed GEMV's repacked copy of a weight, which the step then reads too (so a
        row sums the same in the step as op by op); None: every packed weight read as its rows."""
        spec = self.spec
        if len(layers) != spec.num_hidden_layers:
            return f"{len(layers)} layers, the kernel was rendered for {spec.num_hidden_layers}"
        qkv_rows = spec.q_size + 2 * spec.kv_size
        norms = {"input_norm": (spec.hidden_size,), "post_norm": (spec.hidden_size,), "qkv_bias": (qkv_rows,),
                 "q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,)}
        absent = {"qkv_bias": not spec.attention_bias, "q_norm": not spec.qk_norm, "k_norm": not spec.qk_norm}
        linears = {"qkv": (qkv_rows, spec.hidden_size), "o": (spec.hidden_size, spec.q_size),
                   "gate_up": (2 * spec.intermediate_size, spec.hidden_size),
                   "down": (spec.hidden_size, spec.intermediate_size)}
        table: list[int] = []
        keep: list[torch.Tensor] = []
        kinds: Counter[str] = Counter()  # what the start-up log says the linears are
        for i, layer in enumerate(layers):
            for name, shape in norms.items():
                w = getattr(layer, name, None)
                if w is None and absent.get(name, False):
                    table.append(0)
                    continue
                why = self._why_not_float(w, shape)
                if why is not None:
                    return f"layer {i} {name}: {why}"
                table.append(w.data_ptr())
                keep.append(w)
            for name, shape in linears.items():
                w = getattr(layer, name, None)
                words = self._linear_words(w, shape)
                if isinstance(words, str):
                    return f"layer {i} {name}: {words}"
                repacked = panels(w) if panels is not None and isinstance(w, QuantizedWeight) else None
                table.extend([*words, 0 if repacked is None else repacked.data_ptr()])
                keep.extend(t for t in (*_tensors(w), repacked) if t is not None)
                kinds[_kind_label(w) + ("" if repacked is None else " in panels")] += 1
        why = self._why_not_float(final_norm, (spec.hidden_size,))
        if why is not None:
            return f"final norm: {why}"
        weights = torch.tensor(table, dtype=torch.int64)  # [layers * WEIGHT_WORDS_PER_LAYER]: the LayerWeights
        assert weights.numel() == len(layers) * WEIGHT_WORDS_PER_LAYER
        packed = [isinstance(getattr(layer, name), QuantizedWeight) for layer in layers for name in linears]
        return CompiledDecodeStack(self, weights, [*keep, final_norm], final_norm, scale, rope_tables, kinds,
                                   any(packed), not all(packed))

    def _why_not_float(self, w: object, shape: tuple[int, ...]) -> str | None:
        if not isinstance(w, torch.Tensor):
            return f"{type(w).__name__}, not a {self.dtype} tensor"
        if w.dtype != self.dtype or tuple(w.shape) != shape or not w.is_contiguous() or w.device.type != "cpu":
            return f"{w.dtype} {tuple(w.shape)}, the kernel reads contiguous {shape} in {self.dtype}"
        return None

    def _linear_words(self, w: object, shape: tuple[int, int]) -> list[int] | str:
        """The kernel's LinearWeight for one linear but its panels (kind, data, scales, mins, group, scale type), or
        why it cannot read it."""
        if not isinstance(w, QuantizedWeight):
            why = self._why_not_float(w, shape)
            return why if why is not None else [WeightKind.FLOAT, w.data_ptr(), 0, 0, 0, 0]  # type: ignore[union-attr]
        if not self.packed:
            return "packed, and the build's decode step was rendered for float weights only"
        kind, group = PACKED_KINDS[w.fmt.scheme], w.fmt.group_size
        vector = 2 * PACKED_LANES if w.fmt.scheme.nibbles else PACKED_LANES
        if tuple(w.shape) != shape:
            return f"packed {tuple(w.shape)}, the kernel reads {shape}"
        if group % vector:
            return f"{w.fmt.scheme.value} groups of {group}, the kernel reads groups of whole {vector}-weight vectors"
        if group % ACTIVATION_BLOCK:  # the packed rows quantise their input in whole blocks (models/quant.py)
            return (f"{w.fmt.scheme.value} groups of {group}, the packed rows read groups of whole "
                    f"{ACTIVATION_BLOCK}-element activation blocks")
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in _tensors(w) if t is not None):
            return "packed tensors not contiguous on the cpu"
        if not scales_fit(w):
            return f"fp16 scales in rows of {w.shape[1] // group} groups, the kernel widens at most {WIDE_FLOATS}"
        mins = w.mins.data_ptr() if w.mins is not None else 0
        return [kind, w.codes.data_ptr(), w.scales.data_ptr(), mins, group, scales_fp16(w)]


def _tensors(w: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor | None, ...]:
    return (w.codes, w.scales, w.mins) if isinstance(w, QuantizedWeight) else (w,)


def _kind_label(w: torch.Tensor | QuantizedWeight) -> str:
    if isinstance(w, QuantizedWeight):
        return f"{w.fmt.scheme.value} group {w.fmt.group_size}"
    return str(w.dtype).removeprefix("torch.")


class CompiledDecodeStack:
    """models.ops.DecodeStack over the compiled step: decode-only steps of up to max_batch sequences."""

    def __init__(self, kernel: CpuDecodeStep, weights: torch.Tensor, keep: list[torch.Tensor],
                 final_norm: torch.Tensor, scale: float, rope_tables: Callable, kinds: Counter[str], packed: bool,
                 floats: bool):
        self.kernel, self.weights, self._keep, self.final_norm = kernel, weights, keep, final_norm
        self.kinds = kinds  # "int8 group 32", "bfloat16", ... -> how many linears are kept so (the start-up log)
        self.packed = packed  # some linear is packed (and some float, where `floats`)
        self.max_batch = kernel.batch_limit(packed, floats)
        self.scale = scale
        self._rope_tables = rope_tables  # (positions, cos_sin_cache, dtype) -> cos, signed_sin [T, 1, D]
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the KV caches the pointers are of
        self._cache_ptrs: tuple[torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]
        self._num_slots = 0

    def accepts(self, metas: Sequence[AttentionMetadata]) -> bool:
        meta = metas[0]
        return (meta.is_decode_only and meta.num_seqs <= self.max_batch
                and all(m is meta for m in metas))  # one KV group: every layer reads the same tables

    def _cache_pointers(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer pointers to the K and V caches, checked and built when the runner's cache list is first seen."""
        if self._caches is not kv_caches:
            spec, k = self.kernel.spec, kv_caches[0][0]
            for kc, vc in kv_caches:
                for c in (kc, vc):
                    assert c.dtype == self.kernel.dtype and c.is_contiguous() and c.shape == k.shape, c.shape
                    assert c.shape[1:] == (self.kernel.block_size, spec.num_key_value_heads, spec.head_dim), c.shape
            assert len(kv_caches) == spec.num_hidden_layers, len(kv_caches)
            self._cache_ptrs = (torch.tensor([kc.data_ptr() for kc, _ in kv_caches], dtype=torch.int64),
                                torch.tensor([vc.data_ptr() for _, vc in kv_caches], dtype=torch.int64))
            self._caches, self._num_slots = kv_caches, k.shape[0] * k.shape[1]
        return self._cache_ptrs

    def __call__(
        self,
        x: torch.Tensor,  # [B, hidden], the step's embeddings: overwritten with the result
        rows: torch.Tensor,  # [B] int64, each token's row of cos_sin_cache
        cos_sin_cache: torch.Tensor,  # [num_rows, head_dim] float32
        metas: Sequence[AttentionMetadata],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:  # [B, hidden] after the final norm
        meta, kernel = metas[0], self.kernel
        num_seqs = meta.num_seqs
        assert self.accepts(metas) and x.shape == (num_seqs, kernel.spec.hidden_size) and x.is_contiguous()
        assert x.dtype == kernel.dtype
        k_ptrs, v_ptrs = self._cache_pointers(kv_caches)
        cos, signed_sin = self._rope_tables(rows, cos_sin_cache, kernel.dtype)  # [B, 1, D] each
        tables, lens, slots = meta.block_tables, meta.seq_lens, meta.slot_mapping
        assert tables.dtype == lens.dtype == torch.int32 and slots.dtype == torch.int64
        assert tables.is_contiguous() and lens.is_contiguous() and slots.is_contiguous()
        assert tables.shape[0] >= num_seqs and tables.shape[1] * kernel.block_size >= meta.max_seq_len
        # the indices the kernel trusts are in range (one out of range would corrupt memory)
        assert 1 <= min(meta.seq_lens_host) and max(meta.seq_lens_host) <= meta.max_seq_len
        assert 0 <= int(slots.min()) and int(slots.max()) < self._num_slots, "slot_mapping outside the KV cache"
        status = kernel._step(
            self.weights.data_ptr(), self.final_norm.data_ptr(), x.data_ptr(), num_seqs, cos.data_ptr(),
            signed_sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
            meta.max_seq_len, k_ptrs.data_ptr(), v_ptrs.data_ptr(), self.scale, torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"cpu decode step: status {status} (-1: no scratch memory, -2: batch {num_seqs}, "
                              "-3: packed weights in a step for float ones)")
        return x
