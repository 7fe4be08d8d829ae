"""The cpu backend's linear layers: which GEMV or GEMM multiplies x by a weight, float or packed.

Float weights: up to a few rows without a bias (a decode step's LM head, a model's linears op by op) the compiled
step's GEMV; else bf16 weights packed once for oneDNN's bf16 GEMM where the CPU has it; else F.linear, for bf16
without oneDNN's bf16 GEMM (AVX2-only CPUs) widened to fp32 and rounded once from WIDEN_MIN_ROWS rows. Where
oneDNN's packed copy is in panels the step reads (AVX-512 BF16 and AMX CPUs: onednn.panel_rows), the step's GEMV reads
that copy too and the weight's mapped rows leave the process, so a bf16 weight is held once (CpuLinear.packed). Packed
weights (models/quant.py): the compiled packed rows up to QUANT_GEMV_MAX_TOKENS rows, else the weight dequantised
for the float GEMM. TorchOps (cpu_ops.py) runs every linear of the Ops contract through one CpuLinear.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pllm.models.quant import ACTIVATION_BLOCK, QuantizedWeight, dequantize, dequantize_activation, quantize_activation
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.cpu_decode_step import (
    GEMV_BEFORE_ONEDNN_MAX_ROWS,
    GEMV_BEFORE_ONEDNN_MAX_ROWS_AMX,
    GEMV_LINEAR_MAX_ROWS,
    GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS,
    CpuDecodeStep,
)
from pllm.runtime.backends.cpu.cpu_quant_linear import QUANT_GEMV_MAX_TOKENS, CpuQuantLinear
from pllm.runtime.backends.cpu.huge_page_memory import collapse
from pllm.runtime.backends.cpu.mapped_pages import drop_file_pages, held_once_note
from pllm.runtime.backends.cpu.onednn import Panels

logger = logging.getLogger("pllm")


# A widened GEMM (TorchOps.gemm_dtype) widens at most this many weight elements at a time: a big LM head (Llama 3's
# 128256 x 4096) would otherwise take a 2 GB fp32 copy on every call
WIDEN_ELEMENTS = 1 << 24
# ... and only for this many rows of x or more: fewer, torch's bf16 GEMV reads the weight once where widening reads
# it, writes it in fp32 and reads that again (bf16 F.linear against widened, AVX2-only EPYC, 576-2048 wide weights:
# 1 row 1.9-2.6x faster, 4 rows 1.0-1.85x, 8 rows 0.7-1.0x, 16 rows 0.43-0.46x)
WIDEN_MIN_ROWS = 8


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   gemm: torch.dtype) -> torch.Tensor:
    """F.linear of x, weight and bias widened to `gemm`, rounded once to x's dtype; the weight widened
    WIDEN_ELEMENTS at a time (blocks of its output rows), each block's outputs its own GEMM's."""
    xg = x.to(gemm)
    rows = max(1, WIDEN_ELEMENTS // max(1, weight.shape[1]))
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype)
    for r in range(0, weight.shape[0], rows):
        block = F.linear(xg, weight[r : r + rows].to(gemm), None if bias is None else bias[r : r + rows].to(gemm))
        out[..., r : r + rows] = block  # rounded to x's dtype as .to() rounds
    return out


@dataclasses.dataclass(frozen=True)
class PackedFloat:
    """What CpuLinear keeps of one float weight: oneDNN's packed copy where it packs the dtype, and where the compiled
    step reads that copy too, as panels."""

    weight: torch.Tensor  # kept alive, so no other tensor reuses its address (the key)
    packed: torch.Tensor | None  # oneDNN's copy; None: not packed (fp32, or no bf16 GEMM in oneDNN)
    panels: Panels | None  # packed, as the step's GEMV reads it: every route reads it, none the weight's rows


def _key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)


class CpuLinear:
    """The build's linear routes, with what they keep between calls: oneDNN's packed copies of bf16 weights and the
    prefill path's dequantised-weight buffers."""

    def __init__(self, quant_kernel: CpuQuantLinear | None = None, decode_step: CpuDecodeStep | None = None,
                 huge_pages: bool = False) -> None:
        self.quant_kernel = quant_kernel  # builds with packed weights
        self.decode_step = decode_step  # the build's compiled step, whose GEMV takes a few rows
        # huge_pages (EngineConfig): the panels the step reads moved into 2 MiB pages as they are made (packed)
        self.huge_pages = huge_pages
        self.collapsed = 0  # bytes of panels asked into 2 MiB pages so far
        self._packed: dict[tuple, PackedFloat] = {}  # (data_ptr, shape, stride, dtype) -> what is kept of it
        self.rows_dropped = 0  # bytes of float weights' rows dropped from the process once nothing reads them
        self._mismatch_said = False
        self._dequantized: dict[tuple, torch.Tensor] = {}  # (out, in, dtype) -> the prefill path's weight buffer

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias) in x's dtype, by the route this weight and row count take (the module docstring)."""
        if isinstance(weight, QuantizedWeight):
            return self._quant_linear(x, weight, bias)
        step, panels = self.decode_step, self.panels(weight)
        if bias is None and step is not None and step.gemv_runs(weight, x, self._gemv_max_rows(weight, step, panels)):
            # a few rows (a decode step's LM head; a model's linears op by op): the compiled step's GEMV streams the
            # weights faster than oneDNN's GEMM or F.linear there; its fp32 sums rounded once to the dtype, as
            # F.linear's are
            y = step.gemv(weight, x.reshape(-1, x.shape[-1]).contiguous(), panels).to(x.dtype)
            return y.reshape(*x.shape[:-1], weight.shape[0])
        packed = self.packed(weight).packed
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return self.float_gemm(x, weight, bias)

    def float_gemm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The float GEMM without a packed copy of the weight: F.linear, or for bf16 where gemm_dtype widens, from
        WIDEN_MIN_ROWS rows, F.linear widened to fp32 and rounded once (a MoE's experts take it whole: packing every
        expert for oneDNN would double their memory)."""
        gemm = self.gemm_dtype(weight.dtype)
        if gemm != weight.dtype and x.dtype == weight.dtype and x.numel() >= WIDEN_MIN_ROWS * weight.shape[1]:
            return widened_linear(x, weight, bias, gemm)  # bf16 without oneDNN's bf16 GEMM: widened, rounded once
        return F.linear(x, weight, bias)

    def gemm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the float GEMM (more rows than the GEMV takes: prefill, big batches; at least WIDEN_MIN_ROWS
        for float weights) multiplies in for weights, or a packed linear's activations, of `dtype`: their own, but
        fp32 for bf16 where oneDNN has no bf16 GEMM
        (AVX2-only CPUs: torch's bf16 GEMM there ran 4.7-7x slower than widening to fp32 and its GEMM at 512 rows,
        3.4x at 64, README "On an AVX2-only CPU"); the result is rounded back to bf16."""
        return torch.float32 if dtype == torch.bfloat16 and not onednn.onednn_packs_bf16() else dtype

    def _quant_linear(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """Up to QUANT_GEMV_MAX_TOKENS rows: the packed rows, whose activations are quantised per block
        (models.quant.quantize_activation; without a compiled kernel, the same meaning in PyTorch ops). More
        (prefill, verify steps, large batches): W dequantised (compiled, or models.quant.dequantize) and the float
        GEMM, both in gemm_dtype, rounded to x's dtype. An fp32 GEMM takes x's activations rounded as the packed rows
        round them: the same meaning, so a token's logits differ between step sizes only by the order of the sums
        (fp32 greedy output does not hang on how a sequence's steps were cut: speculation, prefix hits). A bf16 GEMM
        takes x as it is: rounding x to bf16 for it is an error of the size of that rounding either way, and skipping
        it keeps the prefill's pass over x out (about a sixth of a 512-token prefill of SmolLM2 int8 in bf16)."""
        kernel = self.quant_kernel
        x2 = x.reshape(-1, x.shape[-1])
        usable = kernel is not None and x.dtype in (torch.float32, torch.bfloat16) and kernel.runs(weight)
        packed_rows = x2.shape[0] <= QUANT_GEMV_MAX_TOKENS
        gemm = self.gemm_dtype(x.dtype)
        rounds = x2.shape[1] % ACTIVATION_BLOCK == 0  # always, for weights packed in whole blocks
        exact = rounds and gemm == torch.float32
        if usable and packed_rows:
            y = kernel.gemv(x2.contiguous(), weight, bias)
        elif packed_rows and rounds:
            xq = dequantize_activation(*quantize_activation(x2))
            y = F.linear(xq, dequantize(weight), None if bias is None else bias.float()).to(x.dtype)
        elif usable:  # into one buffer per shape, reused: the result is consumed before the next call
            key = (*weight.shape, gemm)
            if key not in self._dequantized:
                self._dequantized[key] = torch.empty(weight.shape, dtype=gemm)
            w = kernel.dequantize(weight, gemm, out=self._dequantized[key])
            xr = kernel.round_activations(x2.contiguous()) if exact else x2.to(gemm)
            y = F.linear(xr, w, None if bias is None else bias.to(gemm)).to(x.dtype)
        else:
            xr = dequantize_activation(*quantize_activation(x2)) if exact else x2.to(gemm)
            y = F.linear(xr, dequantize(weight, gemm), None if bias is None else bias.to(gemm)).to(x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _gemv_max_rows(weight: torch.Tensor, step: CpuDecodeStep, panels: Panels | None) -> int:
        """The most rows of x the compiled step's GEMV takes for this weight (panels: what it reads of it, if not
        its rows): fewer where oneDNN's packed bf16 GEMM is the alternative than where F.linear is (more of them
        where the GEMV runs AMX tiles, or reads the weight in oneDNN's panels)."""
        if weight.dtype == torch.bfloat16 and onednn.onednn_packs_bf16():
            if step.tiles_for(weight.shape[1]):
                return GEMV_BEFORE_ONEDNN_MAX_ROWS_AMX
            if panels is not None:
                return GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS
            return GEMV_BEFORE_ONEDNN_MAX_ROWS
        return GEMV_LINEAR_MAX_ROWS

    def packed(self, weight: torch.Tensor) -> PackedFloat:
        """What is kept of a float weight, made at its first use by any route: bf16 weights packed once into
        oneDNN's blocked layout (the same results as F.linear, bit for bit, without a reorder on every call: about
        2x faster for decode-sized batches; fp32 packing rounds differently from F.linear, so fp32 keeps F.linear).
        Where this CPU's layout is panels the compiled step reads (onednn.panel_rows) and this weight's panels hold
        its elements, element by element, the step's GEMV reads them too (the rows then unread by any route here;
        drop_rows lets them go once the step is bound); with huge_pages, in 2 MiB pages (huge_page_memory.collapse:
        oneDNN allocates them in ordinary ones)."""
        key = _key(weight)
        entry = self._packed.get(key)
        if entry is None:
            packed = panels = None
            if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and onednn.onednn_packs_bf16():
                packed = onednn.pack(weight)
                panels = self._checked_panels(weight, packed)
                if panels is not None and self.huge_pages:  # what the step streams, as huge_pages promises
                    self.collapsed += collapse(panels.address, panels.nbytes)
            entry = self._packed[key] = PackedFloat(weight, packed, panels)
        return entry

    def drop_rows(self, weights: Sequence[torch.Tensor]) -> None:
        """Drop from the process the rows' pages of these weights, each read only in its panels from now on (the
        caller knows no other reader: the compiled step bound to the panels, an LM head not tied to the embedding),
        with one read of the process's mappings (~1 ms each beside torch's hundreds of libraries). mapped_pages
        acts only on a read-only file mapping: pages the file gives back if anything reads them again."""
        held = [w for w in weights if w.is_contiguous() and self.packed(w).panels is not None]
        if held:
            self.rows_dropped += drop_file_pages(*held)

    @property
    def reads_panels(self) -> bool:
        """Whether the compiled step reads bf16 weights in oneDNN's panels here: a step that reads them, on a CPU
        where oneDNN packs bf16 in that layout."""
        step = self.decode_step
        return step is not None and step.reads_panels and onednn.panel_rows() is not None

    def panels(self, weight: torch.Tensor) -> Panels | None:
        """The panels the compiled step reads for this weight (packed at its first use), or None: its rows (also,
        without packing it, where the step reads no panels: oneDNN's copy is then made at the first GEMM)."""
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.bfloat16 or not self.reads_panels:
            return None
        return self.packed(weight).panels

    def _checked_panels(self, weight: torch.Tensor, packed: torch.Tensor) -> Panels | None:
        step = self.decode_step
        if step is None or not step.reads_panels or weight.dtype != step.dtype or not weight.is_contiguous():
            return None
        panels = onednn.panels_of(weight, packed)
        if panels is None:
            return None
        if not step.panels_match(weight, panels):  # a layout other than the probe's for this shape: never misread
            if not self._mismatch_said:
                logger.warning("pllm cpu backend: oneDNN packed a %s weight in another layout than its probe's; "
                               "the compiled step reads such weights' rows", tuple(weight.shape))
                self._mismatch_said = True
            return None
        return panels

    def memory_note(self) -> str | None:
        """What the panels made so far hold and what became of their rows, for the start-up log; None without
        panels."""
        held = sum(e.panels.nbytes for e in self._packed.values() if e.panels is not None)
        note = held_once_note("bf16 weights read by the compiled step in oneDNN's packed copy", held,
                              self.rows_dropped)
        if note is not None and self.huge_pages:
            note += f"; {self.collapsed / 1e6:.0f} MB of it moved into 2 MiB pages (huge_pages)"
        return note
