"""The build's compiled decode step (kernels/cpu_decode_step.so): every layer of a one-token-per-sequence step in
one call; the library, its limits and its GEMV. Bound to a model's weights in cpu_decode_stack.py."""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pllm.models.quant import QuantScheme
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.onednn import Panels

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
# ... and up to this many where the GEMV reads the weight in oneDNN's own panels (the bytes oneDNN's GEMM reads): on
# the Zen 4 EPYC VM (AVX-512 BF16, no AMX) the LM heads of SmolLM2 and a 1B llama streamed through the panels at
# 1.19-1.35x oneDNN's GEMM at 8 rows, 1.03-1.16x at 16, level at 32 and 64 (tools/bench_gemv_bandwidth.py)
GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS = 16
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
    return (f"not compiled for {spec.model_type} in {dtype}: the step takes llama, mistral, qwen2 and qwen3 in "
            "float32 or bfloat16, with SiLU, a head size that is a multiple of 16 and hidden and intermediate sizes "
            f"that are multiples of 8 (this model: {spec.hidden_act}, head {spec.head_dim}, hidden "
            f"{spec.hidden_size}, intermediate {spec.intermediate_size}; compiler/kernels/cpu_decode_step.py)")


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
        # bf16 steps: the GEMV over weights in oneDNN's panels, and the check of a weight's panels against its rows
        self._gemv_panels = getattr(lib, "pllm_gemv_panels", None)
        if self._gemv_panels is not None:
            self._gemv_panels.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
            self._gemv_panels.restype = ctypes.c_int
        self._panels_match = getattr(lib, "pllm_panels_match", None)
        if self._panels_match is not None:
            self._panels_match.argtypes = [ptr, i64, i64, ptr, i64, ctypes.c_int]
            self._panels_match.restype = ctypes.c_int
        self._silu_simd = getattr(lib, "pllm_decode_step_silu_simd", None)  # libraries of this pllm
        if self._silu_simd is not None:
            self._silu_simd.argtypes = [ctypes.c_int]
            self._silu_simd.restype = ctypes.c_int
        self._panel_prefetch = getattr(lib, "pllm_decode_step_panel_prefetch", None)  # bf16 steps of this pllm
        if self._panel_prefetch is not None:
            self._panel_prefetch.argtypes = [ctypes.c_int]
            self._panel_prefetch.restype = ctypes.c_int
        self._silu_mul = getattr(lib, "pllm_silu_mul", None)  # bf16 steps of this pllm: the prefill MLP's activation
        if self._silu_mul is not None:
            self._silu_mul.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
            self._silu_mul.restype = None
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

    def set_panel_prefetch(self, ahead: bool) -> bool:
        """Whether the AVX-512 panel code requests panels ahead in software (for tests and benchmarks; the default is
        the CPU maker's: reset_panel_prefetch). The sums are the same either way. Returns the choice now in force."""
        assert self._panel_prefetch is not None, "a bf16 library of this pllm"
        return bool(self._panel_prefetch(int(ahead)))

    def reset_panel_prefetch(self) -> bool:
        """Back to the CPU maker's choice (ahead but on AMD). Returns it."""
        assert self._panel_prefetch is not None, "a bf16 library of this pllm"
        return bool(self._panel_prefetch(-1))

    def use_silu_simd(self, on: bool) -> bool:
        """Whether the SiLU-and-multiply passes (silu_mul, the step's gate_up epilogue) run 16 elements at a time, as
        the library chose where the CPU has AVX-512 (on), or the scalar code (off): the same bits either way (for
        tests; limit_isa chooses again). Returns whether they now do."""
        assert self._silu_simd is not None, "a library of this pllm"
        return bool(self._silu_simd(int(on)))

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

    @property
    def reads_panels(self) -> bool:
        """Whether the step reads bf16 weights in oneDNN's panels (a bf16 library of this pllm)."""
        return self._gemv_panels is not None and self._panels_match is not None

    def gemv(self, weight: torch.Tensor, x: torch.Tensor, panels: Panels | None = None) -> torch.Tensor:
        """x [B, in] @ weight [out, in].T -> [B, out] float32, through the step's GEMV: over the weight's rows, or its
        panels where given (reads_panels; the weight's rows then untouched)."""
        assert weight.dtype == x.dtype == self.dtype and weight.is_contiguous() and x.is_contiguous()
        assert weight.dim() == x.dim() == 2 and weight.shape[1] == x.shape[1], (weight.shape, x.shape)
        y = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
        if panels is not None:
            assert self.reads_panels
            address = ctypes.c_void_p(panels.address)
            status = self._gemv_panels(ctypes.addressof(address), 1, panels.rows, weight.shape[0], weight.shape[1],
                                       x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
        else:
            status = self._gemv(weight.data_ptr(), weight.shape[0], weight.shape[1], x.data_ptr(), x.shape[0],
                                y.data_ptr(), torch.get_num_threads())
        _check_gemv(status, x, weight)
        return y

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up for gate_up [..., 2 I] (the gate half first), in one pass with the step's SiLU table: the
        bits F.silu(gate) * up gives in bf16. None where the library has no such pass (fp32, or an older build)."""
        if self._silu_mul is None or gate_up.dtype != torch.bfloat16 or not gate_up.is_contiguous():
            return None
        inter = gate_up.shape[-1] // 2
        act = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * inter), inter, act.data_ptr(),
                       torch.get_num_threads())
        return act

    def panels_match(self, weight: torch.Tensor, panels: Panels) -> bool:
        """Whether panels hold weight's elements where the step's panel code looks for them (each, compared)."""
        assert self.reads_panels and weight.dtype == self.dtype and weight.is_contiguous() and weight.dim() == 2
        status = self._panels_match(weight.data_ptr(), weight.shape[0], weight.shape[1], panels.address, panels.rows,
                                    torch.get_num_threads())
        return status == 1

    def gemv_stream(self, weights: Sequence[torch.Tensor], x: torch.Tensor,
                    panels: Sequence[Panels] | None = None) -> Callable[[], torch.Tensor]:
        """A call that runs the step's GEMV of x over each of these same-shaped matrices in turn (over their panels
        where given), in one parallel region as the step runs its linears (benchmarks: the weights' streaming rate
        without a call per matrix). Returns the last product, [B, out] float32."""
        first = weights[0]
        for w in weights:
            assert w.dtype == x.dtype == self.dtype and w.is_contiguous() and w.shape == first.shape, w.shape
        assert x.dim() == first.dim() == 2 and x.is_contiguous() and first.shape[1] == x.shape[1], x.shape
        addresses = [w.data_ptr() for w in weights] if panels is None else [p.address for p in panels]
        table = torch.tensor(addresses, dtype=torch.int64)
        y = torch.empty((x.shape[0], first.shape[0]), dtype=torch.float32)
        args = (table.data_ptr(), len(weights), first.shape[0], first.shape[1], x.data_ptr(), x.shape[0], y.data_ptr())
        keep = (table, list(weights), x, panels)

        def run() -> torch.Tensor:
            assert keep
            if panels is None:
                _check_gemv(self._gemv_many(*args, torch.get_num_threads()), x, first)
            else:
                assert len(panels) == len(weights) and self.reads_panels
                status = self._gemv_panels(args[0], args[1], panels[0].rows, *args[2:], torch.get_num_threads())
                _check_gemv(status, x, first)
            return y

        return run
