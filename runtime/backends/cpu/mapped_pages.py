"""A tensor's pages dropped from the process when it is a view of a file's mapping (madvise MADV_DONTNEED): the cpu
backend's packed rows once their panels are made (cpu_quant_linear.py), which nothing reads after. The pages stay
in the page cache, free for the kernel to reclaim, and a read faults them back in with the file's bytes. On
anonymous memory the same call would zero them, so it is made only where /proc/self/maps names a file mapping that
holds the whole tensor. Linux only; elsewhere nothing is dropped."""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

MADV_DONTNEED = 4  # Linux's value (mmap.MADV_DONTNEED where Python defines it)
NOT_FILES = ("/dev/zero",)  # a private mapping of it is anonymous memory


def file_mapping(start: int, end: int) -> str | None:
    """The file whose mapping in this process holds all of [start, end) (/proc/self/maps), or None: anonymous
    memory, a range across mappings, or no /proc."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= start < hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    file = path.startswith("/") and not path.startswith(NOT_FILES)
                    return path if file and end <= hi else None
    except OSError:
        pass
    return None


def drop_file_pages(t: torch.Tensor | None) -> bool:
    """Drop the whole pages inside t's bytes from this process if t lies in a file's mapping; True when they went."""
    if t is None or t.numel() == 0 or not sys.platform.startswith("linux"):
        return False
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page
    if last <= first or file_mapping(begin, end) is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(first, last - first, getattr(mmap, "MADV_DONTNEED", MADV_DONTNEED)) == 0
