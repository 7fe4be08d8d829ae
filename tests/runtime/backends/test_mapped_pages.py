"""Weights mapped from their file (runtime/backends/cpu/mapped_pages.py): the mapping made read-only, and a tensor's
pages dropped from the process only where a read-only file mapping holds it, its values read back after."""

from __future__ import annotations

import sys

import pytest
import torch
from proc_smaps import resident_bytes
from safetensors.torch import load_file, save_file

from pllm.runtime.backends.cpu.mapped_pages import drop_file_pages, make_read_only, mapping_of
from pllm.runtime.worker.huge_pages import read_weight_file
from pllm.runtime.worker.loader import tensors_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's madvise and /proc/self/maps")
MIB = 1 << 20


def mapped(tmp_path, values: torch.Tensor) -> torch.Tensor:
    save_file({"codes": values}, tmp_path / "w.safetensors")
    return load_file(tmp_path / "w.safetensors")["codes"]


def test_a_read_only_mapped_tensor_leaves_the_process_and_reads_back(tmp_path):
    values = torch.randint(-128, 128, (1024, 4096), dtype=torch.int8)  # 4 MiB: whole pages inside it
    t = mapped(tmp_path, values)
    found = mapping_of(t.data_ptr(), t.data_ptr() + t.numel())
    assert found.is_file and found.path == str(tmp_path / "w.safetensors")
    assert not drop_file_pages(t)  # safetensors maps it writable: a page written since would be reverted
    assert make_read_only(t)
    assert "w" not in mapping_of(t.data_ptr(), t.data_ptr() + 1).perms
    assert torch.equal(t, values)  # every page read in
    before = resident_bytes(t.data_ptr())
    assert drop_file_pages(t)
    assert resident_bytes(t.data_ptr()) <= before - 4 * MIB + 2 * 4096
    assert torch.equal(t, values)  # back from the page cache or the file


def test_anonymous_memory_is_never_dropped_nor_protected(tmp_path):
    """The heap, an mmap'd allocation, and the huge-page arena the loader reads weights into: all anonymous, where
    dropping would zero them."""
    big = torch.randint(-128, 128, (1024, 4096), dtype=torch.int8)  # malloc maps it anonymously
    small = torch.arange(3000, dtype=torch.int32)
    save_file({"codes": big}, tmp_path / "w.safetensors")
    arena = tensors_of(read_weight_file(tmp_path / "w.safetensors"))["codes"]
    for t in (big, small, arena):
        kept = t.clone()
        assert not make_read_only(t) and not drop_file_pages(t)
        assert torch.equal(t, kept)
        t.view(-1)[0] = 1  # still writable
    assert not drop_file_pages(None) and not drop_file_pages(torch.empty(0))
