"""Memory that asks for 2 MiB pages (runtime/backends/cpu/huge_page_memory.py): the arena starts on a huge page, the
request is made (VmFlags 'hg' in /proc/self/smaps, whether or not the kernel then grants the pages), and PageArena
hands out pieces that are aligned, never overlap, and stay valid as long as they are held."""

from __future__ import annotations

import platform
import threading
import time

import pytest
import torch
from proc_smaps import smaps_field, thp_offered, vm_flags

from pllm.runtime.backends.cpu import huge_page_memory
from pllm.runtime.backends.cpu.huge_page_memory import ALIGN, HUGE_PAGE, PageArena, collapse, huge_page_arena

THP = thp_offered()


def piece(arena: PageArena, nbytes: int) -> torch.Tensor:
    return torch.frombuffer(arena.take(nbytes), dtype=torch.uint8)


def test_the_arena_starts_on_a_huge_page():
    memory, start = huge_page_arena(3 * HUGE_PAGE + 5)
    whole = torch.frombuffer(memory, dtype=torch.uint8)
    assert whole[start:].numel() >= 3 * HUGE_PAGE + 5 and whole[start:].data_ptr() % HUGE_PAGE == 0


@pytest.mark.skipif(not THP, reason="a Linux kernel with transparent huge pages")
def test_the_arena_asks_for_huge_pages():
    memory, start = huge_page_arena(HUGE_PAGE)
    assert "hg" in vm_flags(torch.frombuffer(memory, dtype=torch.uint8)[start:].data_ptr())


def test_pieces_follow_each_other_on_cache_lines_without_overlapping():
    arena = PageArena(chunk=1 << 20)
    sizes = [1, 63, 64, 65, 4096, 100_000, 7]
    pieces = [piece(arena, n) for n in sizes]
    assert arena.mappings == 1  # all of them fit the first mapping
    assert pieces[0].data_ptr() % HUGE_PAGE == 0
    for p, n in zip(pieces, sizes, strict=True):
        assert p.numel() == n and p.data_ptr() % ALIGN == 0
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel()) for p in pieces)
    assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))
    for i, p in enumerate(pieces):
        p.fill_(i + 1)
    assert all(bool((p == i + 1).all()) for i, p in enumerate(pieces))  # no piece wrote over another


def test_a_piece_that_does_not_fit_starts_a_new_mapping_and_a_big_one_gets_its_own():
    arena = PageArena(chunk=1 << 20)
    first = piece(arena, (1 << 20) - 100)
    second = piece(arena, 200)  # past the first mapping's end
    assert arena.mappings == 2 and second.data_ptr() % HUGE_PAGE == 0
    big = piece(arena, 3 << 20)
    assert arena.mappings == 3 and big.numel() == 3 << 20 and big.data_ptr() % HUGE_PAGE == 0
    big[-1] = 5  # all of it is there
    after = piece(arena, 10)  # the second mapping goes on serving small pieces
    assert arena.mappings == 3
    assert after.data_ptr() == second.data_ptr() + 256  # 200 rounded up to a cache line
    assert len({first.data_ptr(), second.data_ptr(), big.data_ptr(), after.data_ptr()}) == 4


def test_a_piece_outlives_its_arena():
    arena = PageArena(chunk=1 << 20)
    kept = piece(arena, 1000)
    kept.fill_(3)
    del arena
    assert int(kept.sum()) == 3000
    kept.fill_(4)  # still mapped, still writable
    assert int(kept.sum()) == 4000


def test_a_held_piece_pins_its_mapping():
    arena = PageArena(chunk=1 << 20)
    view = arena.take(100)
    mapping = view.obj
    kept = torch.frombuffer(view, dtype=torch.uint8)
    del view
    with pytest.raises(BufferError):
        mapping.close()
    kept.fill_(1)
    assert int(kept.sum()) == 100


class SlowAlign(int):
    """huge_page_memory.ALIGN for the race test: rounding up to it sleeps (the GIL released) between take() reading
    where the next piece goes and recording it, so threads racing there without the lock would get the same piece."""

    def __rfloordiv__(self, other: int) -> int:
        time.sleep(0.002)
        return int(other) // int(self)


def test_threads_taking_pieces_at_once_get_disjoint_ones(monkeypatch):
    monkeypatch.setattr(huge_page_memory, "ALIGN", SlowAlign(ALIGN))
    arena = PageArena(chunk=1 << 16)
    got: list[tuple[int, int]] = []
    keep: list[torch.Tensor] = []
    start = threading.Barrier(4)

    def take() -> None:
        start.wait()
        for n in range(1, 20):
            p = piece(arena, 37 * n)
            got.append((p.data_ptr(), p.data_ptr() + p.numel()))  # list.append is atomic
            keep.append(p)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted(got)
    assert len(spans) == 4 * 19
    assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("nbytes", [0, -1])
def test_an_empty_or_negative_piece_is_refused(nbytes):
    with pytest.raises(ValueError, match="positive size"):
        PageArena().take(nbytes)


def test_a_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be positive"):
        PageArena(chunk=0)


def kernel_collapses() -> bool:
    """Linux 6.1 on (madvise(MADV_COLLAPSE)) with transparent huge pages offered."""
    major, minor = (int(part) if part.isdigit() else 0 for part in platform.release().split(".")[:2])
    return thp_offered() and (major, minor) >= (6, 1)


def test_collapse_moves_whole_huge_pages_of_memory_allocated_elsewhere_and_keeps_it():
    """torch's own allocation (ordinary pages, as oneDNN's packed copies): the 2 MiB pages inside it asked into huge
    pages, its contents and address unchanged."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (5 * HUGE_PAGE + 12345,), dtype=torch.uint8, generator=gen)
    t = values.clone()
    asked = collapse(t.data_ptr(), t.numel())
    assert asked % HUGE_PAGE == 0 and asked <= t.numel()
    assert torch.equal(t, values)
    if kernel_collapses():
        assert asked >= 4 * HUGE_PAGE  # all whole 2 MiB pages inside 5 of them and a bit, however it is aligned
        backed_kib = int(smaps_field(t.data_ptr() + t.numel() // 2, "AnonHugePages").split()[0])
        assert backed_kib * 1024 >= asked


def test_collapse_asks_nothing_of_a_range_without_a_whole_huge_page():
    t = torch.zeros(2 * HUGE_PAGE, dtype=torch.uint8)
    assert collapse(t.data_ptr() + 1, HUGE_PAGE - 2) == 0  # shorter than one: wherever it starts, none inside
    assert collapse(t.data_ptr(), 0) == 0
