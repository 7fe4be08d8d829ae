"""tools/bench_huge_pages.py's control for --panels: the other engine's panels lie in a mapping like the huge-page
arena's (the same size, the same 2 MiB-aligned start) that asks for ordinary pages, so the request is the one thing
that differs between the two engines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from proc_smaps import thp_offered, vm_flags

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_huge_pages  # noqa: E402

from pllm.runtime.backends.cpu.huge_page_memory import HUGE_PAGE, huge_page_arena  # noqa: E402


@pytest.mark.skipif(not thp_offered(), reason="a Linux kernel with transparent huge pages")
def test_the_ordinary_arena_differs_from_the_huge_one_only_in_its_request():
    huge, huge_start = huge_page_arena(3 * HUGE_PAGE)
    plain, plain_start = bench_huge_pages.ordinary_arena(3 * HUGE_PAGE)
    assert len(plain) == len(huge)
    huge_at = torch.frombuffer(huge, dtype=torch.uint8)[huge_start:].data_ptr()
    plain_at = torch.frombuffer(plain, dtype=torch.uint8)[plain_start:].data_ptr()
    assert huge_at % HUGE_PAGE == 0 and plain_at % HUGE_PAGE == 0
    assert "hg" in vm_flags(huge_at) and "nh" not in vm_flags(huge_at)
    assert "nh" in vm_flags(plain_at) and "hg" not in vm_flags(plain_at)
