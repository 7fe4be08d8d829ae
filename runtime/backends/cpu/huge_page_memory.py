"""2 MiB pages for what a decode step streams every token: anonymous memory that asks for them, holding the weights
read with huge_pages (runtime/worker/huge_pages.py) and the panels the cpu backend repacks packed weights into at
load (cpu_quant_linear.py); and, with huge_pages, oneDNN's bf16 copies moved into them in place (collapse,
cpu_linear.py). No torch here, so the server's build-opening thread can use it beside its imports.

Streaming memory in 4 KiB pages costs a TLB entry per page, and in a virtual machine each miss walks two page tables
(the guest's and the hypervisor's). On the dev VM (2-core Xeon, 2026-12-06) the INT4 panel GEMV alone read a 1B
model's gate_up copies at 22.6 GB/s in ordinary pages and 28.8 GB/s in 2 MiB ones (a load-only pass over the same
layout: 25.7 against 33.0); whole batch-1 steps ran 1.03-1.05x faster with the panels here on the 1.17B model's
int4_sym build and 1.13x on SmolLM2's (README, "Weights in huge pages"). The cost is at load: 2 MiB pages can be
slower to fault in than 4 KiB ones (where the hypervisor has not backed them yet, as on the dev VM, or where the
kernel compacts memory to find them). Where the kernel hands huge pages out only on request (`enabled` =
madvise, a common default) the request is `madvise(MADV_HUGEPAGE)` before the memory is first written; where it has
none (or `enabled` is never: the system's opt-out), this is ordinary anonymous memory and everything works the
same.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
import threading

HUGE_PAGE = 2 << 20
ALIGN = 64  # each piece starts on a cache line
CHUNK = 64 << 20  # PageArena's mappings: a piece bigger than this gets one of its own size
MADV_COLLAPSE = 25  # Linux 6.1 on (include/uapi/asm-generic/mman-common.h); Python's mmap module lacks the name


def huge_page_arena(nbytes: int) -> tuple[mmap.mmap, int]:
    """(anonymous memory of nbytes past a 2 MiB boundary, that boundary's offset in it), huge pages requested."""
    return anonymous_arena(nbytes, huge_pages=True)


def anonymous_arena(nbytes: int, huge_pages: bool) -> tuple[mmap.mmap, int]:
    """huge_page_arena's mapping asking for 2 MiB pages (MADV_HUGEPAGE) or for ordinary ones (MADV_NOHUGEPAGE: the
    benchmarks' control, which not even a kernel whose huge pages are `always` backs with them), before anything is
    written; where the platform or kernel knows no such request, ordinary pages either way."""
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:  # Linux
        try:
            memory.madvise(advice)
        except OSError:  # a kernel built without transparent huge pages
            pass
    first = ctypes.c_char.from_buffer(memory)
    address = ctypes.addressof(first)
    del first  # an exported buffer would pin the mapping
    return memory, -address % HUGE_PAGE


def collapse(address: int, nbytes: int) -> int:
    """Ask the kernel to move the whole 2 MiB pages inside [address, address + nbytes) of memory someone else
    allocated in ordinary pages (oneDNN's packed bf16 copies) into huge pages now, in place: madvise(MADV_COLLAPSE),
    which copies each into a fresh 2 MiB page, the contents and addresses unchanged. Returns the bytes asked for: 0
    where the range holds no whole 2 MiB page, or the kernel refuses (before Linux 6.1, no transparent huge pages,
    a platform without madvise). Synchronous: about 3 s a GB on the dev VM, whose hypervisor backs fresh pages
    slowly; for a caller who asked to pay at load (huge_pages)."""
    lo = -(-address // HUGE_PAGE) * HUGE_PAGE
    hi = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    lib = libc()
    if hi <= lo or lib is None:
        return 0
    return hi - lo if lib.madvise(lo, hi - lo, MADV_COLLAPSE) == 0 else 0


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library's madvise and mprotect (Linux; None elsewhere): this module's and mapped_pages.py's."""
    if not sys.platform.startswith("linux"):
        return None
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.madvise.restype = lib.mprotect.restype = ctypes.c_int
    return lib


class PageArena:
    """Pieces of huge-page memory handed out one after another from mappings of `chunk` bytes, for things made once and
    kept as long as the model (no piece is ever returned). A piece bigger than a chunk gets a mapping of its own, and
    the current chunk goes on serving the smaller ones. Each piece is a memoryview, which pins its mapping: the mapping
    stays mapped while anything made from the view (e.g. torch.frombuffer's tensor) lives, and cannot be closed under
    it. Pages no piece reaches are never touched, so never backed (with huge pages granted, the 2 MiB page a piece
    ends in is backed whole). Safe to call from several threads."""

    def __init__(self, chunk: int = CHUNK):
        if chunk <= 0:
            raise ValueError(f"PageArena chunk must be positive, got {chunk}")
        self.chunk = chunk
        self._lock = threading.Lock()
        self._memory: mmap.mmap | None = None  # the current chunk
        self._next = 0  # its first free byte
        self._end = 0  # the end of its usable part
        self.mappings = 0  # how many mappings were made so far

    def take(self, nbytes: int) -> memoryview:
        """A piece of nbytes (> 0), starting on a cache line (the first piece of a mapping on a 2 MiB boundary)."""
        if nbytes <= 0:
            raise ValueError(f"PageArena pieces must have a positive size, got {nbytes}")
        with self._lock:
            if nbytes > self.chunk:  # a mapping of its own; the current chunk goes on serving smaller pieces
                memory, start = self._map(nbytes)
                return memoryview(memory)[start:start + nbytes]
            start = -(-self._next // ALIGN) * ALIGN
            if self._memory is None or start + nbytes > self._end:
                self._memory, start = self._map(self.chunk)
                self._end = start + self.chunk
            self._next = start + nbytes
            return memoryview(self._memory)[start:start + nbytes]

    def _map(self, nbytes: int) -> tuple[mmap.mmap, int]:
        self.mappings += 1
        return huge_page_arena(nbytes)
