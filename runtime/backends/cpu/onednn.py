"""What oneDNN offers the cpu backend on this CPU: whether it packs bf16 linear weights for its bf16 GEMM, and whether
its packed copy is in panels the compiled step's GEMV reads too (so a bf16 weight is held once)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging

import torch

logger = logging.getLogger("pllm")

HAS_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


@functools.cache
def onednn_packs_bf16() -> bool:
    """Whether oneDNN packs bf16 linear weights on this CPU: its bf16 path needs AVX512 (BW, VL, DQ) or
    AVX-NE-CONVERT, and says so only by raising (an AVX2-only CPU, e.g. AMD Zen 3, has neither). Asked once, on a
    small weight. Without it the cpu backend's bf16 float GEMMs run F.linear widened to fp32 (cpu_linear.py), and
    the compiled decode step takes bigger batches (cpu_decode_step.compiled_batch_limit)."""
    if not HAS_ONEDNN_LINEAR:
        return False
    try:
        pack(torch.zeros(64, 64, dtype=torch.bfloat16))
    except RuntimeError as e:
        logger.info("cpu backend: bf16 linears use F.linear, not oneDNN's packed weights (%s)", e)
        return False
    return True


# oneDNN's packed buffer as bytes at an address (torch's mkldnn ops; the step reads bf16 weights there: Panels)
HAS_PACKED_POINTERS = hasattr(torch.ops.mkldnn, "data_ptr") and hasattr(torch.ops.mkldnn, "_nbytes")
# The rows per panel the compiled step reads (cpu_decode_step_panels.cpp.inc): oneDNN's AMX layout, its AVX-512 BF16 one
PANEL_ROWS = (32, 64)
# The step reads panels of weights whose input width is a multiple of this
PANEL_IN_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Panels:
    """A bf16 weight [out, in] as oneDNN packed it, in panels of `rows` output rows: element (n, k) at
    (n // rows) * in * rows + (k // 2) * 2 * rows + (n % rows) * 2 + k % 2 of the buffer at `address`, the last
    panel padded with zero rows. oneDNN's GEMM reads `packed`; the compiled step's GEMV reads the same bytes."""

    packed: torch.Tensor  # the mkldnn tensor that owns the buffer
    rows: int
    address: int
    nbytes: int


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] bf16 packed for oneDNN's GEMM (batch hint 64; torch.ops.mkldnn._linear_pointwise reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 64)


def panels_bytes(out_features: int, in_features: int, rows: int) -> int:
    """The bytes of a bf16 weight in panels of `rows` rows (the last padded to whole rows)."""
    return -(-out_features // rows) * rows * in_features * 2


@functools.cache
def panel_rows() -> int | None:
    """The rows per panel where oneDNN packs bf16 weights on this CPU as Panels: a probe weight of distinct bit
    patterns packed and found, element by element, where one of PANEL_ROWS puts it; None where oneDNN packs no bf16,
    torch does not expose the packed buffer, or the layout is another (the step then reads the weights' rows and
    oneDNN its own copy). Each weight is checked again before the step reads it (CpuLinear)."""
    if not onednn_packs_bf16() or not HAS_PACKED_POINTERS:
        return None
    # 128 x 128: two panels of 64 rows, four of 32, and inputs past a 64-element block (a layout blocked on the
    # input first would agree with panels on a narrower probe); bit patterns 0x80 on: every value a normal number
    out_features, in_features = 128, 128
    bits = torch.arange(0x80, 0x80 + out_features * in_features, dtype=torch.int32).to(torch.int16)
    weight = bits.view(torch.bfloat16).reshape(out_features, in_features)
    packed = pack(weight)
    nbytes = int(torch.ops.mkldnn._nbytes(packed))
    raw = (ctypes.c_int16 * (nbytes // 2)).from_address(int(torch.ops.mkldnn.data_ptr(packed)))
    got = torch.frombuffer(bytearray(raw), dtype=torch.int16)
    n = torch.arange(out_features).view(-1, 1)
    k = torch.arange(in_features).view(1, -1)
    for rows in PANEL_ROWS:
        if nbytes != panels_bytes(out_features, in_features, rows):
            continue
        at = (n // rows) * in_features * rows + (k // 2) * 2 * rows + (n % rows) * 2 + k % 2
        if torch.equal(got[at], bits.reshape(out_features, in_features)):
            return rows
    logger.info("pllm cpu backend: oneDNN packs bf16 weights in a layout the compiled step does not read; "
                "it reads their rows, and oneDNN keeps its own copy")
    return None


def panels_of(weight: torch.Tensor, packed: torch.Tensor) -> Panels | None:
    """packed (pack(weight)) as Panels where this CPU's layout is panels and the shape one the step reads in them
    (in a multiple of PANEL_IN_MULTIPLE, the buffer the size the layout gives); the caller checks the elements."""
    rows = panel_rows()
    out_features, in_features = weight.shape
    if rows is None or in_features % PANEL_IN_MULTIPLE:
        return None
    nbytes = int(torch.ops.mkldnn._nbytes(packed))
    if nbytes != panels_bytes(out_features, in_features, rows):
        return None
    return Panels(packed, rows, int(torch.ops.mkldnn.data_ptr(packed)), nbytes)
