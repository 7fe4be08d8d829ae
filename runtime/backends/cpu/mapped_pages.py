"""Weights that are views of a file's mapping: the mapping made read-only once loaded (a weight written in place
would be a bug; this makes it a fault, not a silent private copy), and a tensor's pages dropped from the process
(madvise MADV_DONTNEED): the cpu backend's packed rows once their panels are made (cpu_quant_linear.py), which
nothing reads after. Dropped pages stay in the page cache, free for the kernel to reclaim, and a read faults them
back in with the file's bytes. On anonymous memory, or on pages written since they were mapped, the same call would
zero or revert them, so it is made only where /proc/self/maps names a read-only mapping of a file holding the whole
tensor. Linux only; elsewhere nothing is changed."""

from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass

import torch

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


def mapping_of(begin: int, end: int) -> Mapping | None:
    """The mapping in this process that holds all of [begin, end), or None (a range across mappings, no /proc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= begin < hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return Mapping(lo, hi, fields[1], path) if end <= hi else None
    except OSError:
        pass
    return None


def _extent(t: torch.Tensor) -> tuple[int, int]:
    assert t.is_contiguous(), t.stride()
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def make_read_only(t: torch.Tensor) -> bool:
    """Make the file mapping holding t read-only (all of it: the loader's mapping of one weights file); True when
    done. Anonymous memory is left as it is."""
    if t.numel() == 0:
        return False
    found = mapping_of(*_extent(t))
    if found is None or not found.is_file:
        return False
    return _libc().mprotect(found.start, found.end - found.start, PROT_READ) == 0


def drop_file_pages(t: torch.Tensor | None) -> bool:
    """Drop the whole pages inside t's bytes from this process if a read-only file mapping holds t; True when they
    went."""
    if t is None or t.numel() == 0:
        return False
    begin, end = _extent(t)
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page
    found = mapping_of(begin, end)
    if last <= first or found is None or not found.is_file or "w" in found.perms:
        return False
    return _libc().madvise(first, last - first, getattr(mmap, "MADV_DONTNEED", MADV_DONTNEED)) == 0
