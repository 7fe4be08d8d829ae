"""The cpu KV pool's zero-filled memory: zeros without writing them, independent, writable, and kept alive."""

import gc

import pytest
import torch

from pllm import LLM
from pllm.runtime.worker.zeroed import zeroed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zeroed_is_zeros_of_the_shape_and_dtype(dtype):
    shape = (3, 2, 5, 16, 2, 8)
    a, b = zeroed(shape, dtype, torch.device("cpu")), zeroed(shape, dtype, torch.device("cpu"))
    gc.collect()  # the tensor alone keeps its mapping alive
    assert a.shape == shape and a.dtype == dtype and a.is_contiguous()
    assert torch.equal(a, torch.zeros(shape, dtype=dtype))
    a[1, 0, 2] = float("nan")
    a.view(-1)[-1] = 7.0
    assert torch.equal(b, torch.zeros(shape, dtype=dtype))  # separate memory
    assert a.view(-1)[-1].item() == 7.0 and a[1, 0, 2].isnan().all() and a[1, 0, 1].eq(0).all()
    assert zeroed((0, 4), dtype, torch.device("cpu")).shape == (0, 4)


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="Linux /proc only")
def test_zeroed_memory_is_not_resident_until_written():
    before = _resident_bytes()
    pool = zeroed((1 << 28,), torch.float32, torch.device("cpu"))  # 1 GiB
    assert _resident_bytes() - before < 64 << 20
    pool[: 1 << 20] = 1.0  # 4 MiB written: those pages, not the rest
    assert _resident_bytes() - before < 64 << 20


def test_the_runner_pool_is_zeros(tiny_build):
    llm = LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24)
    runner = llm.engine.runner
    pools = runner.kv_cache  # one pool per KV layer group
    assert pools and all(kv[:, :, :pad].count_nonzero().item() == 0 for kv, pad in zip(pools, runner.pad_blocks))
    # the padding block alone holds the start-up warm-up's K/V (runtime/worker/warm_up.py): finite, never NaN
    assert all(torch.isfinite(kv[:, :, pad]).all() for kv, pad in zip(pools, runner.pad_blocks))
