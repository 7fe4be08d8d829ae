"""Weights that are views of a file's mapping: the mapping made read-only once loaded (a weight written in place
would be a bug; this makes it a fault, not a silent private copy), and a tensor's pages dropped from the process
(madvise MADV_DONTNEED): the cpu backend's packed rows once their panels are made (cpu_quant_linear.py), which
nothing reads after. Dropped pages stay in the page cache, free for the kernel to reclaim, and a read faults them
back in with the file's bytes. On anonymous memory, or on pages written since they were mapped, the same call would
zero or revert them, so it is made only where /proc/self/maps names a read-only mapping of a file holding the whole
tensor. Linux only; elsewhere nothing is changed."""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass

import torch

from pllm.runtime.backends.cpu.huge_page_memory import libc  # called only past /proc/self/maps: Linux, not None

MADV_DONTNEED = 4  # Linux's value (mmap.MADV_DONTNEED where Python defines it)
PROT_READ = 1
# mappings named like files that are anonymous memory (private mappings of /dev/zero, MAP_HUGETLB, memfd)
NOT_FILES = ("/dev/zero", "/anon_hugepage", "/memfd:")


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/maps: [start, end), its permissions ('r--p', 'rw-p', ...) and its path or name."""

    start: int
    end: int
    perms: str
    path: str

    @property
    def is_file(self) -> bool:
        return self.path.startswith("/") and not self.path.startswith(NOT_FILES)


def read_maps() -> list[Mapping]:
    """This process's mappings (/proc/self/maps), or none where there is no /proc."""
    if not sys.platform.startswith("linux"):
        return []
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                found.append(Mapping(lo, hi, fields[1], fields[5].strip() if len(fields) == 6 else ""))
    except OSError:
        return []
    return found


def mapping_of(begin: int, end: int, maps: list[Mapping] | None = None) -> Mapping | None:
    """The mapping that holds all of [begin, end) (in `maps`, else read now), or None (a range across mappings, no
    /proc)."""
    for m in read_maps() if maps is None else maps:
        if m.start <= begin < m.end:
            return m if end <= m.end else None
    return None


def held_once_note(held: str, held_bytes: int, dropped_bytes: int) -> str | None:
    """The start-up log's line for weights read from a copy of their own (`held`: what it is, held_bytes of it) and
    their rows: dropped_bytes of them dropped, or none (rows not in a read-only file mapping: huge pages); None when
    no weight has such a copy."""
    if held_bytes == 0:
        return None
    note = f"{held} ({held_bytes / 1e6:.0f} MB)"
    if dropped_bytes:
        return f"{note}; their rows' pages dropped from the process ({dropped_bytes / 1e6:.0f} MB)"
    return f"{note} beside their rows, which stay resident (not in a read-only file mapping: huge pages)"


def _extent(t: torch.Tensor) -> tuple[int, int]:
    assert t.is_contiguous(), t.stride()
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def make_read_only(t: torch.Tensor) -> bool:
    """Make the file mapping holding t read-only (all of it: the loader's mapping of one weights file); True when
    done. Anonymous memory is left as it is."""
    if t.numel() == 0:
        return False
    found = mapping_of(*_extent(t))
    if found is None or not found.is_file:
        return False
    return libc().mprotect(found.start, found.end - found.start, PROT_READ) == 0


def drop_file_pages(*tensors: torch.Tensor | None) -> int:
    """Drop the whole pages inside each tensor's bytes from this process where a read-only file mapping holds it
    (the mappings read once for all of them); the bytes of the tensors whose pages went."""
    maps = None
    dropped = 0
    page = mmap.PAGESIZE
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        begin, end = _extent(t)
        first, last = -(-begin // page) * page, end // page * page
        if last <= first:
            continue
        maps = read_maps() if maps is None else maps
        found = mapping_of(begin, end, maps)
        if found is None or not found.is_file or "w" in found.perms:
            continue
        if libc().madvise(first, last - first, getattr(mmap, "MADV_DONTNEED", MADV_DONTNEED)) == 0:
            dropped += end - begin
    return dropped
