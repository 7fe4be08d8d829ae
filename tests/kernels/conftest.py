"""Shared fixtures of the kernel tests: render a plan into a temp dir, load its kernels, build paged KV caches."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pllm.compiler.cpu_compile import compile_cpu_kernels
from pllm.compiler.kernel_modules import TritonModeError, ensure_triton_mode
from pllm.compiler.manifest import Language
from pllm.compiler.plan import KernelPlan, make_plan
from pllm.compiler.render import render_plan
from pllm.models.quant import QuantFormat, QuantScheme
from pllm.models.spec import ModelKind, ModelSpec
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear
from pllm.runtime.backends.triton.triton_ops import TritonOps

# One process runs Triton one way (see compiler/kernel_modules.py): fix it here, before any test imports triton, so the
# outcome never depends on test order. Without a GPU that is the interpreter; with one, compiled kernels (the
# interpret tests then skip, saying so; run them apart with CUDA_VISIBLE_DEVICES= to cover both).
try:
    ensure_triton_mode(interpret=not torch.cuda.is_available())
except TritonModeError:
    pass  # something imported Triton the other way first: the kernel_ops fixture skips, giving the reason


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n inside (the compiled cpu kernels run on as many), restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def tiny_spec(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 64,
    rms_norm_eps: float = 1e-5,
    **quirks: Any,
) -> ModelSpec:
    """A ModelSpec with only the fields the kernels read chosen by the test; the rest are fixed filler. `quirks`:
    the optional ModelSpec fields (hidden_act, norm_weight_offset, qk_norm, sliding_window, ...)."""
    return ModelSpec(
        model_type="llama",
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        vocab_size=128,
        rms_norm_eps=rms_norm_eps,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_ids=(2,),
        **quirks,
    )


@pytest.fixture(scope="session")
def kernel_ops(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TritonOps]:
    """Factory: (interpret, dtype, block_size, quant, **spec fields) -> TritonOps over freshly rendered kernels
    (quant: the build keeps packed weights of that format, so its plan carries the quantised kernels).

    Cached per shape: hypothesis draws the same shapes again and again, and each render + import costs ~0.1 s.
    A process runs Triton either interpreted or compiled (see compiler/kernel_modules.py); a test asking for the
    other mode is skipped with the reason.
    """
    cache: dict[tuple, TritonOps] = {}

    def make(*, interpret: bool, dtype: str, block_size: int = 16, quant: QuantFormat | None = None,
             **spec_fields: Any) -> TritonOps:
        key = (interpret, dtype, block_size, quant, tuple(sorted(spec_fields.items())))
        if key not in cache:
            plan = make_plan(tiny_spec(**spec_fields), dtype, block_size, quant)
            out_dir = tmp_path_factory.mktemp("kernels")
            render_plan(plan, out_dir)
            try:
                cache[key] = TritonOps(out_dir, interpret, plan.op_files(Language.TRITON))
            except TritonModeError as e:
                pytest.skip(str(e))
        return cache[key]

    return make


@dataclass(frozen=True)
class PagedKV:
    """Per-sequence dense K/V (the reference's view) scattered into paged caches (the kernels' view)."""

    keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim], fp32, rounded through dtype
    values: list[torch.Tensor]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    slot_ids: list[torch.Tensor]  # per sequence [seq_len] int64 slots


def make_paged_kv(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    device: str, generator: torch.Generator,
) -> PagedKV:
    """Random K/V for each sequence, stored in shuffled physical blocks of caches whose other slots are NaN.

    NaN in every unused slot (and in the tail of each last block) proves the kernels never read past a
    sequence's length: one stray NaN would poison the output.
    """
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks stay NaN
    order = torch.randperm(num_blocks, generator=generator)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_tables = torch.zeros((len(seq_lens), max(blocks_per_seq)), dtype=torch.int32)
    keys, values, slot_ids = [], [], []
    next_block = 0
    for i, (seq_len, num_seq_blocks) in enumerate(zip(seq_lens, blocks_per_seq)):
        physical = order[next_block : next_block + num_seq_blocks]
        next_block += num_seq_blocks
        block_tables[i, :num_seq_blocks] = physical.to(torch.int32)
        positions = torch.arange(seq_len)
        slots = physical[positions // block_size] * block_size + positions % block_size  # [seq_len]
        k = torch.randn((seq_len, num_kv_heads, head_dim), generator=generator).to(dtype)
        v = torch.randn((seq_len, num_kv_heads, head_dim), generator=generator).to(dtype)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = k
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = v
        keys.append(k.float())
        values.append(v.float())
        slot_ids.append(slots)
    return PagedKV(keys, values, k_cache.to(device), v_cache.to(device), block_tables.to(device), slot_ids)


def reference_attention(
    q: torch.Tensor,  # [query_len, num_heads, head_dim]
    k: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    v: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [query_len, num_heads, head_dim] float64
    """Causal attention of the last query_len positions of one sequence, in fp64; with a window, only keys after
    query - window (transformers' sliding-window mask); with a soft-cap, scores -> softcap * tanh(scores / softcap)."""
    query_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # [num_heads, query_len, seq_len]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    query_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
    hidden = torch.arange(seq_len)[None, :] > query_pos
    if window is not None:
        hidden |= torch.arange(seq_len)[None, :] <= query_pos - window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


@pytest.fixture(scope="session")
def paged_kv() -> Callable[..., PagedKV]:
    return make_paged_kv


@pytest.fixture(scope="session")
def attention_reference() -> Callable[..., torch.Tensor]:
    return reference_attention


@pytest.fixture(scope="session")
def cuda_device() -> str:
    """For the tests marked gpu: the CUDA device, or a skip that says why."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    return "cuda"


def compile_cpu_kernel(out_dir: Path, plan: KernelPlan, name: str) -> Path:
    """Render and compile only the plan's cpu kernel `name` into out_dir (not its siblings); returns the library."""
    alone = dataclasses.replace(plan, kernels=(plan.kernel(name),))
    render_plan(alone, out_dir)
    entry = compile_cpu_kernels(out_dir, alone)
    assert "error" not in entry, entry["error"]
    return out_dir / entry["libraries"][name]


@pytest.fixture(scope="session")
def encoder_kernel_ops(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., TritonOps]:
    """Factory: (interpret, dtype, layer_norm_eps=1e-12, **spec fields) -> TritonOps over an encoder plan's freshly
    rendered kernels (layer_norm, encoder_attention); cached per shape, skipped in the other Triton mode."""
    cache: dict[tuple, TritonOps] = {}

    def make(*, interpret: bool, dtype: str, layer_norm_eps: float = 1e-12, **spec_fields: int) -> TritonOps:
        key = (interpret, dtype, layer_norm_eps, tuple(sorted(spec_fields.items())))
        if key not in cache:
            spec = dataclasses.replace(tiny_spec(**spec_fields), kind=ModelKind.ENCODER, layer_norm_eps=layer_norm_eps)
            plan = make_plan(spec, dtype, 16)
            out_dir = tmp_path_factory.mktemp("encoder-kernels")
            render_plan(plan, out_dir)
            try:
                cache[key] = TritonOps(out_dir, interpret, plan.op_files(Language.TRITON))
            except TritonModeError as e:
                pytest.skip(str(e))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def quant_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cpu_quant_linear.so, compiled once for the packed-weight kernel tests."""
    plan = make_plan(tiny_spec(), "bfloat16", 16, quant=QuantFormat(QuantScheme.INT4, 32))
    return compile_cpu_kernel(tmp_path_factory.mktemp("cpu_quant_linear"), plan, "cpu_quant_linear")


@pytest.fixture(scope="session")
def compiled_quant(quant_library: Path) -> CpuQuantLinear:
    return CpuQuantLinear(quant_library)
