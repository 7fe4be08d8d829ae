"""The build's compiled packed-weight linear (kernels/cpu_quant_linear.so): y = x W^T + b reading W packed (the
GEMV/GEMM over the codes, up to QUANT_GEMV_MAX_TOKENS rows), or W dequantised for the float GEMM (beyond)."""

from __future__ import annotations

import ctypes
import threading
from enum import IntEnum
from pathlib import Path

import torch

from pllm.models.quant import ACTIVATION_BLOCK, QuantizedWeight, QuantScheme, dequantize_activation, quantize_activation
from pllm.runtime.backends.cpu.huge_page_memory import PageArena
from pllm.runtime.backends.cpu.mapped_pages import drop_file_pages, held_once_note

# Packed weights: up to this many token rows the kernel reads the codes directly (one pass over W, each chunk of
# codes meeting 4 tokens at a time from registers; on x86-64 the activations quantised per block of 32 and
# multiplied as integers); above it, W is dequantised once for the float GEMM, whose cost then dominates. Measured
# by tools/bench_quant.py (README "Quantised weights"): the packed rows beat bf16's oneDNN GEMM through 64 rows.
QUANT_GEMV_MAX_TOKENS = 64
# the kernel's WIDE_FLOATS (compiler/kernels/cpu_quant_linear.py renders it; tests hold the two equal): fp16 scales
# are widened a few rows at a time into per-thread buffers of this many floats, so rows of more groups keep fp32
WIDE_FLOATS = 8192
# the integer rows' input chunk (templates/cpu_quant_vnni.cpp.inc, cpu_quant_avx2_int.cpp.inc): widths it does not
# divide take the float rows
INT_CHUNK = 64


def scales_fp16(weight: QuantizedWeight) -> int:
    """The kernel's scales_fp16 argument (its ScaleType): 1 for fp16 scales and mins, 0 for fp32."""
    return int(weight.scales.dtype == torch.float16)


def scales_fit(weight: QuantizedWeight) -> bool:
    """Whether the kernel reads this weight's scales: fp32 any size; fp16 in rows of at most WIDE_FLOATS groups."""
    return not scales_fp16(weight) or weight.shape[1] // weight.fmt.group_size <= WIDE_FLOATS


class CodeScheme(IntEnum):
    """The kernel's CodeScheme: how a weight's codes are kept (models.quant.QuantScheme)."""

    INT8 = 0
    INT4 = 1
    INT4_SYM = 2
    INT6 = 3  # rows read as INT8's; panels at 6 bits a code


CODE_SCHEMES = {QuantScheme.INT8: CodeScheme.INT8, QuantScheme.INT4: CodeScheme.INT4,
                QuantScheme.INT4_SYM: CodeScheme.INT4_SYM, QuantScheme.INT6: CodeScheme.INT6}


class QuantRows(IntEnum):
    """The kernel's row codes (its RowCode), each better than the one before where the CPU runs it: the float rows
    (codes widened to fp32; the AVX2 baseline's, or elsewhere the portable ones; AVX-512's) and the integer rows
    (the activations' int8 codes times the weights' codes; AVX2's vpmaddubsw, AVX512-VNNI's vpdpbusd). Both kinds
    compute the same meaning (models/quant.py's module docstring) in another order."""

    FLOAT_AVX2 = 0
    FLOAT_AVX512 = 1
    INT_AVX2 = 2
    INT_VNNI = 3


class PanelPrefetch(IntEnum):
    """Whether the panels request their codes ahead in software (cpu_quant_linear.cpp.jinja's panel_prefetch)."""

    BY_CPU = -1  # the default: ahead on Intel, as read on AMD
    AS_READ = 0  # each line requested as it is read
    AHEAD = 1


class CpuQuantLinear:
    """kernels/cpu_quant_linear.so: the packed rows (`gemv`, any token count) and the dequantiser (`dequantize`)."""

    def __init__(self, library: Path):
        self.rows_dropped = 0  # bytes of rows whose pages were dropped so far (see _entry)
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib = ctypes.CDLL(str(library))  # after `import torch`: binds to torch's libgomp
        self._gemv = lib.pllm_quant_gemv
        self._gemv.argtypes = [ptr, i32, i64, i64, i64, ptr, i32, i64, ptr, ptr, i32, ptr, ptr, i32, ptr]
        self._dequantize = lib.pllm_dequantize
        self._dequantize.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32, ptr, i32, i32, ptr]
        self._set_isa = lib.pllm_quant_set_isa
        self._set_isa.argtypes = [i32]
        self._panel_bytes = lib.pllm_quant_panel_bytes
        self._panel_bytes.argtypes = [i32, i64, i64, i64, i32]
        self._panel_bytes.restype = i64
        self._make_panels = lib.pllm_quant_make_panels
        self._make_panels.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i32, ptr]
        for fn in (self._gemv, self._dequantize, self._set_isa, self._make_panels):
            fn.restype = ctypes.c_int
        self._set_panel_prefetch = getattr(lib, "pllm_quant_set_panel_prefetch", None)  # (older builds lack it)
        if self._set_panel_prefetch is not None:
            self._set_panel_prefetch.argtypes = [i32]
            self._set_panel_prefetch.restype = ctypes.c_int
        # (builds compiled before it lack it: round_activations then takes PyTorch's ops, the same bits)
        self._round = getattr(lib, "pllm_quant_round_activations", None)
        if self._round is not None:
            self._round.argtypes = [ptr, i32, i64, i64, ptr, i32]
            self._round.restype = None
        self._weights: dict[int, tuple] = {}  # id(weight) -> (weight, its kernel arguments, its panels), see _entry
        self._arena = PageArena()  # the panels' memory: 2 MiB pages where the kernel gives them (huge_page_memory.py)
        self._making = threading.Lock()  # one thread makes a weight's entry (_entry)

    def limit_isa(self, level: QuantRows) -> QuantRows:
        """Run the best row code this CPU has up to `level` (for tests and benchmarks; INT_VNNI, the default,
        leaves the choice to the CPU). Returns the one that now runs for widths the integer rows take."""
        return QuantRows(self._set_isa(int(QuantRows(level))))

    def set_panel_prefetch(self, mode: PanelPrefetch) -> bool:
        """Choose the panels' software prefetch (for tests and benchmarks; the sums are the same either way).
        Returns whether they now request codes ahead."""
        assert self._set_panel_prefetch is not None, "a library compiled before the choice existed"
        return bool(self._set_panel_prefetch(int(PanelPrefetch(mode))))

    @staticmethod
    def accepts(weight: QuantizedWeight) -> bool:
        """Whether the kernel reads this weight: groups of whole activation blocks (32 elements), contiguous; fp16
        scales for rows of at most WIDE_FLOATS groups (the kernel widens them a few rows at a time)."""
        return weight.fmt.group_size % ACTIVATION_BLOCK == 0 and scales_fit(weight) and all(
            t is None or (t.is_contiguous() and t.device.type == "cpu") for t in (weight.codes, weight.scales,
                                                                                   weight.mins))

    def _prepared(self, weight: QuantizedWeight) -> tuple | None:
        """The kernel's view of a weight, checked once: (n, k, codes, scheme, group, scales, mins, scales_fp16,
        panels) sizes and pointers, or None when it does not accept the weight. Kept with the weight itself (and its
        panels), so its id is never reused while the entry lives (a model's weights live as long as the model)."""
        return self._entry(weight)[1]

    def _entry(self, weight: QuantizedWeight) -> tuple:
        """(weight, its kernel arguments or None, its panels or None), made at the weight's first use, by one thread:
        another meeting the same weight at once waits for it (panels, once carved from the arena, are never given
        back). Kept with the weight itself, so its id is never reused while the entry lives. Where panels are made,
        every reader here (the GEMV, the dequantiser, the decode step) reads them and not the rows; where the rows lie
        in a read-only file mapping (the loader's, without huge pages) their pages are then dropped from the process
        (mapped_pages.py), so a packed model's weights are resident once, not twice (the rows stay readable, faulting
        back in if read)."""
        entry = self._weights.get(id(weight))
        if entry is not None:
            return entry
        with self._making:
            entry = self._weights.get(id(weight))
            if entry is None:
                args, panels = None, None
                if self.accepts(weight):
                    n, k = weight.shape
                    rows = (weight.codes.data_ptr(), int(CODE_SCHEMES[weight.fmt.scheme]), weight.fmt.group_size,
                            weight.scales.data_ptr(), None if weight.mins is None else weight.mins.data_ptr(),
                            scales_fp16(weight))
                    panels = self._repacked(n, k, *rows)
                    args = (n, k, *rows, None if panels is None else panels.data_ptr())
                entry = self._weights[id(weight)] = (weight, args, panels)
                if panels is not None:
                    self.rows_dropped += drop_file_pages(weight.codes, weight.scales, weight.mins)
        return entry

    def _repacked(self, n: int, k: int, codes: int, scheme: int, group: int, scales: int, mins: int | None,
                  fp16: int) -> torch.Tensor | None:
        """The codes repacked into panels of 16 rows (templates/cpu_quant_panels.cpp.inc), which the kernel's
        AVX512-VNNI code reads in place of the rows (INT4 at one token 1.3-1.5x as fast with the weights in L3,
        1.0-1.3x from memory: templates/cpu_quant_vnni_panels.cpp.inc); None where it would not read them (CPUs
        without AVX512-VNNI, rows or widths not in whole panels and chunks), the rows then read as they are. They
        lie one after another in memory that asks for 2 MiB pages, which a decode step streams faster (whole batch-1
        steps 1.03-1.13x on the dev VM, huge_page_memory.py)."""
        size = self._panel_bytes(scheme, k, n, group, fp16)
        if size == 0:
            return None
        panels = torch.frombuffer(self._arena.take(size), dtype=torch.uint8)  # pins its mapping
        status = self._make_panels(codes, scheme, k, n, group, scales, mins, fp16, panels.data_ptr())
        if status == 4:
            raise ValueError(f"an int6 weight [{n}, {k}] holds codes outside -32..31, which 6 bits cannot keep: the "
                             "build is damaged; rebuild it")
        assert status == 0, status  # the kernel sized them itself
        return panels

    def panels(self, weight: QuantizedWeight) -> torch.Tensor | None:
        """The panels the GEMV reads for this weight (made at its first use), or None where it reads the rows: for
        the compiled decode step, which must read what the per-op GEMV reads (the same sums, bit for bit)."""
        return self._entry(weight)[2]

    def memory_note(self) -> str | None:
        """What the panels made so far hold and what became of their rows, for the start-up log; None without
        panels."""
        made = sum(entry[2].numel() for entry in self._weights.values() if entry[2] is not None)
        return held_once_note("packed weights read from panels", made, self.rows_dropped)

    def runs(self, weight: QuantizedWeight) -> bool:
        """accepts(weight), remembered per weight: the per-call check of the cpu backend's linear."""
        return self._prepared(weight) is not None

    def gemv(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, K] fp32 or bf16 -> [T, N] in x's dtype: dequantize(W) times x's activations as quantised by
        models.quant.quantize_activation, accumulated in fp32 and rounded once."""
        entry = self._entry(weight)  # held to the end of the call: its panels stay alive while the kernel reads
        assert entry[1] is not None, f"the kernel does not read {weight.fmt}"
        n, k, codes, scheme, group, scales, mins, fp16, panels = entry[1]
        assert x.dim() == 2 and x.shape[1] == k and x.is_contiguous(), (x.shape, x.stride(), weight.shape)
        bf16 = x.dtype == torch.bfloat16
        assert bf16 or x.dtype == torch.float32, x.dtype
        bias32 = None if bias is None else bias.float().contiguous()
        assert bias32 is None or bias32.shape == (n,), bias32.shape
        out = torch.empty((x.shape[0], n), dtype=x.dtype)
        status = self._gemv(x.data_ptr(), bf16, x.shape[0], k, n, codes, scheme, group, scales, mins, fp16,
                            None if bias32 is None else bias32.data_ptr(), out.data_ptr(), torch.get_num_threads(),
                            panels)
        if status == 1:
            raise MemoryError("cpu quantised GEMV could not allocate its scratch buffer")
        if status != 0:  # 2: fp16 scales in rows longer than the kernel widens (runs() refuses those first)
            raise ValueError(f"cpu quantised GEMV refused {weight.fmt} {tuple(weight.shape)} with "
                             f"{weight.scales.dtype} scales (status {status})")
        return out

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] fp32 or bf16 (K a multiple of ACTIVATION_BLOCK) -> fp32 [T, K]: each element as the packed rows
        multiply it, models.quant.dequantize_activation(*quantize_activation(x)) bit for bit, in one parallel pass.
        For the fp32 GEMM that takes more rows than the packed rows, so a row means the same at every step size."""
        assert x.dim() == 2 and x.shape[1] % ACTIVATION_BLOCK == 0 and x.is_contiguous(), (x.shape, x.stride())
        assert x.dtype in (torch.float32, torch.bfloat16), x.dtype
        if self._round is None:
            return dequantize_activation(*quantize_activation(x))
        out = torch.empty(x.shape, dtype=torch.float32)
        self._round(x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], x.shape[1], out.data_ptr(),
                    torch.get_num_threads())
        return out

    def dequantize(self, weight: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """models.quant.dequantize(weight, dtype), bit for bit, in one parallel pass over the weight's panels where
        it has them, else its rows; into `out` when given (a buffer kept between calls: a fresh one of a large
        weight costs more in page faults than the pass itself)."""
        n, k = weight.shape
        assert dtype in (torch.float32, torch.bfloat16) and self.accepts(weight), (dtype, weight.fmt)
        entry = self._entry(weight)  # held to the end of the call, as gemv's: the panels, read where made
        if out is None:
            out = torch.empty((n, k), dtype=dtype)
        assert out.shape == (n, k) and out.dtype == dtype and out.is_contiguous(), (out.shape, out.dtype)
        status = self._dequantize(weight.codes.data_ptr(), int(CODE_SCHEMES[weight.fmt.scheme]), k, n,
                                  weight.fmt.group_size, weight.scales.data_ptr(),
                                  None if weight.mins is None else weight.mins.data_ptr(),
                                  scales_fp16(weight), out.data_ptr(), int(dtype == torch.bfloat16),
                                  torch.get_num_threads(), None if entry[2] is None else entry[2].data_ptr())
        if status != 0:  # 2, as gemv's: accepts() refuses those first; 3, panels it has none of: never made
            raise ValueError(f"cpu dequantiser refused {weight.fmt} {tuple(weight.shape)} with "
                             f"{weight.scales.dtype} scales (status {status})")
        return out
