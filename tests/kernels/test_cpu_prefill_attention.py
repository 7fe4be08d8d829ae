"""cpu_prefill_attention (the cpu backend's compiled causal attention of prompt chunks) vs an fp64 reference."""

from __future__ import annotations

import platform

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.dtype_choice import host_cpu_flags
from pllm.compiler.kernels.cpu_prefill_attention import supported
from pllm.compiler.plan import make_plan
from pllm.models.ops import AttentionMetadata
from pllm.runtime.backends.cpu.cpu_ops import TorchOps
from pllm.runtime.backends.cpu.cpu_prefill_attention import CpuPrefillAttention

from .conftest import compile_cpu_kernel, tiny_spec, torch_threads

HAS_AVX512_BF16 = platform.machine() == "x86_64" and {"avx512_bf16", "avx512bw", "avx512vl"} <= host_cpu_flags()
SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")
needs_bf16 = pytest.mark.skipif(not HAS_AVX512_BF16, reason="the kernel runs only on CPUs with AVX-512 BF16")


def bound(values: list[torch.Tensor]) -> dict[str, float]:
    """The error the kernel's rounding allows, from its arithmetic, per sequence:
    - probabilities rounded to bf16 (relative 2**-9 each) before the product with V, their sum kept in fp32: the
      output moves by at most 2**-9 * sum(p |v|) / sum(p) <= 2**-9 * max |v| (absolute);
    - the output rounded once to bf16: 2**-9 of |o| (relative; rtol 2**-8 leaves the margin torch's check needs);
    - fp32 sums of exact bf16 products over <= 128 dims and a few hundred keys, and an exp to ~1 ulp: ~1e-6 of the
      scores' and output's size, under 1e-4 absolute here."""
    v_max = max(float(v.abs().max()) for v in values)
    return {"atol": 2**-9 * v_max + 1e-4, "rtol": 2**-8}


@pytest.fixture(scope="module")
def prefill_attention(tmp_path_factory: pytest.TempPathFactory):
    """Factory: (block_size, **spec fields) -> the compiled kernel, cached per shape."""
    cache: dict[tuple, CpuPrefillAttention] = {}

    def make(*, block_size: int, **spec_fields: int) -> CpuPrefillAttention:
        key = (block_size, tuple(sorted(spec_fields.items())))
        if key not in cache:
            plan = make_plan(tiny_spec(**spec_fields), "bfloat16", block_size)
            library = compile_cpu_kernel(tmp_path_factory.mktemp("cpu_kernels"), plan, "cpu_prefill_attention")
            c = plan.kernel("cpu_prefill_attention").constants
            cache[key] = CpuPrefillAttention(library, block_size, c["NUM_HEADS"], c["NUM_KV_HEADS"], c["HEAD_DIM"])
        return cache[key]

    return make


def metadata(query_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor) -> AttentionMetadata:
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(query_lens, seq_lens)])
    return AttentionMetadata(
        positions=positions, slot_mapping=torch.zeros_like(positions), query_start_loc=starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables.contiguous(),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )


def check(prefill_attention, paged_kv, attention_reference, *, head_dim: int, num_kv_heads: int, group_size: int,
          block_size: int, query_lens: list[int], seq_lens: list[int], seed: int, one_token_elsewhere: bool = False,
          threads: int | None = None, window: int | None = None) -> None:
    num_heads = num_kv_heads * group_size
    kernel = prefill_attention(block_size=block_size, head_dim=head_dim, num_attention_heads=num_heads,
                               num_key_value_heads=num_kv_heads)
    assert kernel.runs
    gen = torch.Generator().manual_seed(seed)
    kv = paged_kv(seq_lens, num_kv_heads, head_dim, block_size, torch.bfloat16, "cpu", gen)  # unused slots NaN
    meta = metadata(query_lens, seq_lens, kv.block_tables)
    q = torch.randn((sum(query_lens), num_heads, head_dim), generator=gen).to(torch.bfloat16)
    out = torch.full_like(q, 7.0)
    seqs, max_keys = kernel.sequences(meta, one_token_elsewhere)
    with torch_threads(threads or torch.get_num_threads()):
        kernel(q, kv.k_cache, kv.v_cache, meta, seqs, max_keys, 0.125, out, window)
    start = 0
    for i, n in enumerate(query_lens):
        rows = slice(start, start + n)
        start += n
        if n == 1 and one_token_elsewhere:
            assert i not in seqs.tolist()
            assert torch.all(out[rows] == 7.0), "a one-token query left to the decode kernel must not be written"
            continue
        expected = attention_reference(q[rows].float(), kv.keys[i], kv.values[i], 0.125, window)
        torch.testing.assert_close(out[rows].double(), expected, **bound([kv.values[i]]))


@st.composite
def chunks(draw: st.DrawFn, block_size: int) -> tuple[int, int]:
    """(query_len, seq_len): whole prompts and later chunks after cached tokens, ending on, beside or between block
    and 16-key tile boundaries; one-token queries too."""
    seq_len = draw(st.one_of(st.integers(1, 6 * block_size), st.sampled_from([15, 16, 17, 31, 32, 33, 100])))
    query_len = draw(st.one_of(st.just(seq_len), st.integers(1, seq_len)))
    return query_len, seq_len


@needs_bf16
@SETTINGS
@given(data=st.data(), head_dim=st.sampled_from([32, 64, 128]), num_kv_heads=st.sampled_from([1, 3]),
       group_size=st.sampled_from([1, 3, 8]), block_size=st.sampled_from([16, 32]), seed=st.integers(0, 2**16),
       one_token_elsewhere=st.booleans(), window=st.sampled_from([None, None, 1, 5, 16, 17, 40]))
def test_matches_reference(prefill_attention, paged_kv, attention_reference, data, head_dim, num_kv_heads, group_size,
                           block_size, seed, one_token_elsewhere, window):
    """window: a windowed layer's (each query sees its last `window` keys), from one key to past a few tiles."""
    pairs = data.draw(st.lists(chunks(block_size), min_size=1, max_size=4))
    check(prefill_attention, paged_kv, attention_reference, head_dim=head_dim, num_kv_heads=num_kv_heads,
          group_size=group_size, block_size=block_size, query_lens=[n for n, _ in pairs],
          seq_lens=[s for _, s in pairs], seed=seed, one_token_elsewhere=one_token_elsewhere, window=window)


@needs_bf16
@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "group_size", "query_lens", "seq_lens", "threads", "window"),
    [
        (64, 3, 3, [128] * 4, [128] * 4, 2, None),  # SmolLM2's heads, prompts of a serving benchmark's length
        (64, 3, 3, [300, 1, 40], [300, 190, 540], 2, None),  # a long prompt, a decode, a chunk after 500 cached
        (64, 2, 4, [33], [33], 3, None),  # one chunk past QUERY_CHUNK on 3 threads
        (128, 1, 8, [257], [600], 2, None),  # head_dim 128: two rows a block
        (256, 1, 4, [300, 70], [300, 900], 2, 512),  # gemma3-1b's heads: one row a block; a window past a chunk
        (64, 3, 3, [200], [1000], 2, 64),  # a window of 4 tiles: the item lays out only the tiles it sees
    ],
)
def test_awkward_shapes(prefill_attention, paged_kv, attention_reference, head_dim, num_kv_heads, group_size,
                        query_lens, seq_lens, threads, window):
    check(prefill_attention, paged_kv, attention_reference, head_dim=head_dim, num_kv_heads=num_kv_heads,
          group_size=group_size, block_size=16, query_lens=query_lens, seq_lens=seq_lens, seed=0, threads=threads,
          window=window)


@needs_bf16
def test_large_scores_do_not_overflow(prefill_attention, paged_kv, attention_reference):
    """Scores far from 0: the running max is subtracted before exp, so nothing overflows or turns NaN."""
    kernel = prefill_attention(block_size=16, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    gen = torch.Generator().manual_seed(3)
    kv = paged_kv([70], 1, 64, 16, torch.bfloat16, "cpu", gen)
    kv.k_cache.mul_(32.0)  # exact in bf16 (a power of two); the NaN padding stays NaN
    meta = metadata([70], [70], kv.block_tables)
    q = torch.randn((70, 2, 64), generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    seqs, max_keys = kernel.sequences(meta, one_token_elsewhere=True)
    kernel(q, kv.k_cache, kv.v_cache, meta, seqs, max_keys, 0.125, out)
    expected = attention_reference(q.float(), kv.keys[0] * 32.0, kv.values[0], 0.125)
    torch.testing.assert_close(out.double(), expected, **bound(kv.values))


@needs_bf16
def test_a_nan_in_q_reaches_its_rows_output(prefill_attention, paged_kv):
    """A NaN upstream (in one query's head) is not hidden: that row's output is NaN, as through torch's SDPA; the
    other rows are unaffected."""
    kernel = prefill_attention(block_size=16, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    gen = torch.Generator().manual_seed(4)
    kv = paged_kv([40], 1, 64, 16, torch.bfloat16, "cpu", gen)
    meta = metadata([40], [40], kv.block_tables)
    q = torch.randn((40, 2, 64), generator=gen).to(torch.bfloat16)
    q[5, 0, 3] = float("nan")
    out = torch.empty_like(q)
    seqs, max_keys = kernel.sequences(meta, one_token_elsewhere=True)
    kernel(q, kv.k_cache, kv.v_cache, meta, seqs, max_keys, 0.125, out)
    assert out[5, 0].isnan().all()
    assert not out[5, 1].isnan().any() and not out[:5].isnan().any() and not out[6:].isnan().any()


@needs_bf16
def test_the_backend_runs_it_for_prompt_chunks(prefill_attention, paged_kv, attention_reference):
    """TorchOps with the kernel: a mixed step's prompt rows (and, without a decode kernel, its one-token rows) come
    from the kernel, equal to the reference as above, a windowed layer's too; a soft-capped call keeps SDPA (the
    kernel has no soft-cap)."""
    kernel = prefill_attention(block_size=16, head_dim=64, num_attention_heads=6, num_key_value_heads=2)
    ops = TorchOps(prefill_attention=kernel)
    gen = torch.Generator().manual_seed(5)
    query_lens, seq_lens = [20, 1, 50], [20, 77, 90]
    kv = paged_kv(seq_lens, 2, 64, 16, torch.bfloat16, "cpu", gen)
    meta = metadata(query_lens, seq_lens, kv.block_tables)
    q = torch.randn((71, 6, 64), generator=gen).to(torch.bfloat16)
    calls = []
    original = CpuPrefillAttention.__call__
    try:
        CpuPrefillAttention.__call__ = lambda self, *a: calls.append(a) or original(self, *a)
        out = ops.attention(q, kv.k_cache, kv.v_cache, meta, 0.125)
        assert len(calls) == 1
        windowed = ops.attention(q, kv.k_cache, kv.v_cache, meta, 0.125, window=24)
        assert len(calls) == 2
        ops.attention(q, kv.k_cache, kv.v_cache, meta, 0.125, softcap=30.0)
        assert len(calls) == 2
    finally:
        CpuPrefillAttention.__call__ = original
    start = 0
    for i, n in enumerate(query_lens):
        expected = attention_reference(q[start : start + n].float(), kv.keys[i], kv.values[i], 0.125)
        torch.testing.assert_close(out[start : start + n].double(), expected, **bound([kv.values[i]]))
        expected = attention_reference(q[start : start + n].float(), kv.keys[i], kv.values[i], 0.125, 24)
        torch.testing.assert_close(windowed[start : start + n].double(), expected, **bound([kv.values[i]]))
        start += n


def test_in_the_plan_of_bf16_models_without_softcap():
    assert supported(tiny_spec(), "bfloat16")
    assert supported(tiny_spec(sliding_window=64, sliding_layers=(0,)), "bfloat16")  # the window comes with each call
    assert not supported(tiny_spec(), "float32")  # fp32 builds keep SDPA: bit-level comparison with transformers
    assert not supported(tiny_spec(head_dim=80), "bfloat16")
    assert not supported(tiny_spec(attn_logit_softcapping=50.0), "bfloat16")


@pytest.mark.skipif(HAS_AVX512_BF16, reason="this CPU has AVX-512 BF16")
def test_does_not_run_without_avx512_bf16(prefill_attention):
    """Compiled everywhere, run only where the CPU has the instructions; the backend then leaves it out."""
    kernel = prefill_attention(block_size=16, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    assert not kernel.runs


def test_the_backend_leaves_it_out_where_the_cpu_cannot_run_it(tiny_build, monkeypatch):
    """The binding declines a kernel this CPU cannot run (None): prompts then take SDPA, the other kernels stay."""
    from pllm.compiler.manifest import open_build
    from pllm.runtime.backends.cpu import cpu_prefill_attention
    from pllm.runtime.backends.cpu.cpu_kernels import choose_cpu_kernels

    # heads of 64: a shape the kernel takes (the tiny model's 16 it does not)
    build = open_build(tiny_build("llama", dtype="bfloat16", hidden_size=128, num_attention_heads=2,
                                  num_key_value_heads=1))
    assert "cpu_prefill_attention" in build.manifest["cpu_kernels"]["libraries"]
    choice = choose_cpu_kernels(build)
    if choice.decode_step is None:
        pytest.skip(f"this machine runs no compiled cpu kernels of the build ({choice.reason})")
    assert (choice.prefill_attention is not None) == HAS_AVX512_BF16
    assert ("prefill attention" in choice.reason) == HAS_AVX512_BF16
    real = cpu_prefill_attention.CpuPrefillAttention.__init__

    def cannot_run(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.runs = False

    monkeypatch.setattr(cpu_prefill_attention.CpuPrefillAttention, "__init__", cannot_run)
    choice = choose_cpu_kernels(build)
    assert choice.prefill_attention is None and "prefill attention" not in choice.reason
    assert choice.attention is not None and choice.decode_step is not None
