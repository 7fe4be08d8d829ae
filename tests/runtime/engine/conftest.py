"""Fixtures the engine tests share: the tiny llama build, and a plain engine over it."""

import pytest

from pllm import LLM


@pytest.fixture(scope="module")
def build(tiny_build):
    """The tiny llama build (fp32), compiled once per session by tiny_build."""
    return str(tiny_build("llama"))


@pytest.fixture(scope="module")
def plain(build):
    """An engine over it with room to spare and no speculation: the reference the batched and speculative runs
    must match."""
    return LLM(build, backend="cpu", kv_cache_memory=1 << 24)
