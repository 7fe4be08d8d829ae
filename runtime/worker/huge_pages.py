"""A safetensors file read straight into memory backed by 2 MiB pages: the cpu backend's weights with huge_pages. No
torch here, so `pllm-serve --backend cpu --huge-pages` reads them on the thread that opens the build, beside its
imports (runtime/engine/build_open.py); loader.py makes the tensors.

A decode step streams every weight once per token. `safetensors.torch.load_file` maps the file, so the weights sit
in the page cache's 4 KiB pages: one TLB entry per 4 KiB, up to ~65,000 page walks a token for SmolLM2's 270 MB
and ~570,000 for a 1B model, and the hardware prefetcher stops at every page boundary. Transparent huge pages cut
that 512-fold. Where the kernel hands them out only on request (`enabled` = madvise, a common default), the request
is `madvise(MADV_HUGEPAGE)` on the arena before it is written. Whole batch-1 engine steps ran 1.03x faster on
SmolLM2 and 1.07x on a 1B model on the dev VM (tools/bench_huge_pages.py). Where the kernel or platform has no
huge pages the arena is ordinary anonymous memory, and the weights are the same bytes either way. The cost: the
weights are a private copy, read once at load, where the mapping shared the page cache with every process serving
the same build; and fresh memory to touch (on the dev VM ~0.3 s for SmolLM2 when the hypervisor had to back it).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and [begin, end) byte range in the data section that follows, then the data. Each
tensor is read once, from the file into its place in the arena (64-byte aligned, a cache line), with no copy between.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from pllm.runtime.backends.cpu.huge_page_memory import ALIGN, huge_page_arena  # each tensor on a cache line

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


class WeightFileError(ValueError):
    """The file is not a safetensors file this reader can place (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class TensorPlace:
    name: str
    dtype: str  # the safetensors name, a key of DTYPE_SIZES
    shape: tuple[int, ...]
    offset: int  # bytes from the arena's start
    nbytes: int


@dataclass(frozen=True)
class ResidentWeights:
    """A weights file's tensors, in memory: `memory` holds them from byte `start` on (a 2 MiB boundary)."""

    path: Path
    memory: mmap.mmap
    start: int
    tensors: tuple[TensorPlace, ...]


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header names it: its bytes are [begin, end) of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _count(value: object) -> bool:
    """A JSON non-negative integer (not a bool, a float or a string)."""
    return type(value) is int and value >= 0


def read_exactly(f, n: int, path: Path, what: str) -> bytes:
    """n bytes from f (one read() may return fewer)."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            raise WeightFileError(f"{path}: ends inside {what}")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def read_header(f, path: Path, file_size: int) -> tuple[list[HeaderEntry], int]:
    """(the tensors in data order, the data section's offset in the file). As safetensors itself checks: each
    tensor's byte range fits its dtype and shape, and the ranges tile the data section, gap-free from its start to
    the end of the file."""
    if file_size < 8:
        raise WeightFileError(f"{path}: too short for a safetensors header ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", read_exactly(f, 8, path, "the header length"))
    if header_len > min(file_size - 8, MAX_HEADER_BYTES):
        raise WeightFileError(f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes) "
                              f"or past safetensors' limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(read_exactly(f, header_len, path, "the header"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(f"{path}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: the safetensors header is not a JSON object")
    data_len = file_size - 8 - header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if not (isinstance(info, dict) and info.get("dtype") in DTYPE_SIZES and isinstance(shape, list)
                and all(_count(d) for d in shape) and isinstance(offsets, list) and len(offsets) == 2
                and all(_count(o) for o in offsets)):
            raise WeightFileError(f"{path}: tensor '{name}': unreadable entry {info!r} (a known dtype, a shape of "
                                  "non-negative integers and two non-negative integer data_offsets expected)")
        dtype, (begin, end) = info["dtype"], offsets
        numel = 1
        for d in shape:
            numel *= d
        if not begin <= end <= data_len or end - begin != numel * DTYPE_SIZES[dtype]:
            raise WeightFileError(f"{path}: tensor '{name}' ({dtype} {shape}): bytes [{begin}, {end}) "
                                  f"do not fit it or the {data_len}-byte data section")
        entries.append(HeaderEntry(name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    at = 0
    for e in entries:
        if e.begin != at:
            raise WeightFileError(f"{path}: tensor '{e.name}' starts at byte {e.begin} of the data section, where "
                                  f"the tensors before it end at {at} (a gap or an overlap)")
        at = e.end
    if at != data_len:
        raise WeightFileError(f"{path}: the tensors end at byte {at} of the {data_len}-byte data section")
    return entries, 8 + header_len


def read_weight_file(path: Path) -> ResidentWeights:
    """Every tensor of the safetensors file at `path`, read into one huge-page arena."""
    file_size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        entries, data_start = read_header(f, path, file_size)
        places, total = [], 0
        for e in entries:
            places.append(TensorPlace(e.name, e.dtype, e.shape, total, e.end - e.begin))
            total += -(-(e.end - e.begin) // ALIGN) * ALIGN
        memory, start = huge_page_arena(max(total, 1))
        with memoryview(memory) as view:
            for e, place in zip(entries, places, strict=True):
                f.seek(data_start + e.begin)
                with view[start + place.offset:start + place.offset + place.nbytes] as into:
                    done = 0
                    while done < place.nbytes:  # read() may return less than asked
                        n = f.readinto(into[done:])
                        if not n:
                            raise WeightFileError(f"{path}: ends inside tensor '{e.name}'")
                        done += n
    return ResidentWeights(path, memory, start, tuple(places))
