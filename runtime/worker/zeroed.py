"""Zero-filled tensors that cost nothing until written: the KV-cache pool on the cpu."""

from __future__ import annotations

import math
import mmap

import torch


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), without writing the zeros on the cpu.

    Fresh anonymous memory from the OS reads as zeros by definition (mmap MAP_ANONYMOUS), and each page is only
    materialised when first written, as blocks fill. torch.zeros writes every byte up front: for the default 2 GiB
    pool that was most of the engine's start-up, and it made the whole pool resident before a request came. The
    contents are the same, so a padding row a kernel masks out still never holds a NaN that 0 * NaN would spread
    (torch.empty gives no such promise). The tensor keeps the mapping alive. On a GPU, zeroing is one fast memset.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)
