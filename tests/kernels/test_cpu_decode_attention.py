"""cpu_decode_attention (the cpu backend's compiled paged decode attention) vs an fp64 PyTorch reference."""

from __future__ import annotations

import json
import platform

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.dtype_choice import host_cpu_flags
from pllm.compiler.kernels.cpu_decode_attention import supported as cpu_attention_supported
from pllm.compiler.manifest import open_build
from pllm.compiler.plan import make_plan
from pllm.models.ops import AttentionMetadata
from pllm.runtime.backends.cpu.cpu_kernels import CpuDecodeAttention, choose_cpu_kernels
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

from .conftest import compile_cpu_kernel, tiny_spec, torch_threads

# Reference: softmax(q k^T * scale) v in fp64 on the same rounded q, K, V. The kernel keeps scores, probabilities
# and sums in fp32 and rounds only the output. Tolerances:
# float32 -- fp32 dot products over <= 128 dims and sums over <= a few hundred keys, plus an exp within ~2 ulp:
#   ~1e-6 relative; 1e-5 absolute and relative leave a margin.
# bfloat16 -- the output is rounded once to bf16 (8 significant bits): relative error <= 2**-8 of |o|, plus the
#   fp32 error above (1e-4 absolute).
TOLERANCES = {"float32": {"atol": 1e-5, "rtol": 1e-5}, "bfloat16": {"atol": 1e-4, "rtol": 2**-8}}
SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def cpu_attention(tmp_path_factory: pytest.TempPathFactory):
    """Factory: (dtype, block_size, **spec fields) -> the compiled kernel, cached per shape (~0.4 s per compile)."""
    cache: dict[tuple, CpuDecodeAttention] = {}

    def make(*, dtype: str, block_size: int, **spec_fields: int) -> CpuDecodeAttention:
        key = (dtype, block_size, tuple(sorted(spec_fields.items())))
        if key not in cache:
            plan = make_plan(tiny_spec(**spec_fields), dtype, block_size)
            library = compile_cpu_kernel(tmp_path_factory.mktemp("cpu_kernels"), plan, "cpu_decode_attention")
            spec = plan.kernel("cpu_decode_attention").constants
            cache[key] = CpuDecodeAttention(library, getattr(torch, dtype), block_size, spec["NUM_HEADS"],
                                            spec["NUM_KV_HEADS"], spec["HEAD_DIM"])
        return cache[key]

    return make


def check(cpu_attention, paged_kv, attention_reference, *, dtype: str, head_dim: int, num_kv_heads: int,
          group_size: int, block_size: int, seq_lens: list[int], seed: int, simd: bool = True,
          threads: int | None = None) -> None:
    """simd: bf16 items by the AVX-512 BF16 code where the kernel and CPU have it (else the generic code).
    threads: the OpenMP threads the kernel runs on (torch's count otherwise)."""
    num_heads = num_kv_heads * group_size
    kernel = cpu_attention(dtype=dtype, block_size=block_size, head_dim=head_dim, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads)
    kernel.use_simd(simd)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    kv = paged_kv(seq_lens, num_kv_heads, head_dim, block_size, torch_dtype, "cpu", gen)
    num_seqs = len(seq_lens)
    # the queries sit in scattered rows of a taller q, as decodes do in a step that also holds prompt chunks
    num_rows = 2 * num_seqs + 1
    q = torch.randn((num_rows, num_heads, head_dim), generator=gen).to(torch_dtype)  # [T, H, D]
    q_rows = torch.randperm(num_rows, generator=gen)[:num_seqs]
    out = torch.full_like(q, 7.0)
    scale = head_dim**-0.5
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    try:
        with torch_threads(threads or torch.get_num_threads()):
            kernel(q, kv.k_cache, kv.v_cache, kv.block_tables, seq_lens_t, q_rows, max(seq_lens), scale, out)
    finally:
        kernel.use_simd(True)  # the kernel is cached for later tests
    for i, row in enumerate(q_rows.tolist()):
        expected = attention_reference(q[row : row + 1].float(), kv.keys[i], kv.values[i], scale)
        torch.testing.assert_close(out[row : row + 1].double(), expected, **TOLERANCES[dtype])
    untouched = torch.ones(num_rows, dtype=torch.bool)
    untouched[q_rows] = False
    assert torch.all(out[untouched] == 7.0), "rows of q that are not one-token queries must not be written"


@st.composite
def context_lengths(draw: st.DrawFn, block_size: int) -> int:
    """Lengths that end on, just past, or just before a block boundary, inside the first tile, or anywhere."""
    num_blocks = draw(st.integers(1, 12))
    edge = draw(st.sampled_from([0, 1, -1, None]))
    if edge is None:
        return draw(st.integers(1, num_blocks * block_size))
    return max(1, num_blocks * block_size + edge)


@SETTINGS
@given(data=st.data(), dtype=st.sampled_from(["float32", "bfloat16"]), head_dim=st.sampled_from([64, 80, 128]),
       num_kv_heads=st.sampled_from([1, 2]), group_size=st.sampled_from([1, 3, 8]),
       block_size=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**16), simd=st.booleans())
def test_matches_reference(cpu_attention, paged_kv, attention_reference, data, dtype, head_dim, num_kv_heads,
                           group_size, block_size, seed, simd):
    seq_lens = data.draw(st.lists(context_lengths(block_size), min_size=1, max_size=5))
    check(cpu_attention, paged_kv, attention_reference, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads,
          group_size=group_size, block_size=block_size, seq_lens=seq_lens, seed=seed, simd=simd)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_kv_heads", "group_size", "block_size", "seq_lens"),
    [
        ("bfloat16", 64, 3, 3, 16, [1, 16, 17, 15, 137]),  # SmolLM2's heads; one token; block boundaries
        ("float32", 96, 4, 2, 8, [8, 9, 1]),  # head_dim 96, blocks of one tile
        ("bfloat16", 128, 1, 8, 32, [600]),  # a long context: many prefetched tiles, one KV head for 8 queries
        ("float32", 8, 2, 1, 16, [3, 40]),  # one vector per head row, no GQA
    ],
)
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "generic"])
def test_awkward_shapes(cpu_attention, paged_kv, attention_reference, dtype, head_dim, num_kv_heads, group_size,
                        block_size, seq_lens, simd):
    check(cpu_attention, paged_kv, attention_reference, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads,
          group_size=group_size, block_size=block_size, seq_lens=seq_lens, seed=0, simd=simd)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_kv_heads", "group_size", "seq_lens", "threads", "parts"),
    [
        ("bfloat16", 64, 3, 3, [1000], 2, 2),  # SmolLM2's heads, one sequence on 2 threads: 3 items -> 6 parts
        ("bfloat16", 64, 3, 3, [129], 2, 2),  # parts of whole tiles: 80 + 49 keys, the last ending mid-tile
        ("float32", 64, 1, 4, [700, 70, 127, 5], 3, 3),  # 4 items on 3 threads; the short ones stay whole
        ("float32", 128, 1, 8, [2001], 4, 8),  # one item on 4 threads
        ("bfloat16", 64, 2, 3, [300, 64], 4, 2),  # 4 items on 4 threads, cut in 2; a 64-key context stays whole
    ],
)
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "generic"])
def test_short_batches_cut_contexts_into_parts(cpu_attention, paged_kv, attention_reference, dtype, head_dim,
                                               num_kv_heads, group_size, seq_lens, threads, parts, simd):
    """Fewer (sequence, KV head) items than twice the threads: each context of 128 keys or more is cut into parts
    that threads attend apart, then combined by their maxima; the result is the reference's, to the same bounds.
    An empty batch writes nothing."""
    kernel = cpu_attention(dtype=dtype, block_size=16, head_dim=head_dim,
                           num_attention_heads=num_kv_heads * group_size, num_key_value_heads=num_kv_heads)
    assert kernel.parts(len(seq_lens), threads) == parts
    assert kernel.parts(len(seq_lens), 1) == 1 and kernel.parts(2 * threads, threads) == 1  # nothing to balance
    assert kernel.parts(0, threads) == 1  # and no batch at all
    check(cpu_attention, paged_kv, attention_reference, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads,
          group_size=group_size, block_size=16, seq_lens=seq_lens, seed=1, simd=simd, threads=threads)
    q = torch.ones((2, num_kv_heads * group_size, head_dim), dtype=getattr(torch, dtype))
    out = torch.full_like(q, 7.0)
    cache = torch.zeros((1, 16, num_kv_heads, head_dim), dtype=q.dtype)
    with torch_threads(threads):
        kernel(q, cache, cache, torch.zeros((1, 1), dtype=torch.int32), torch.ones(1, dtype=torch.int32),
               torch.zeros(0, dtype=torch.int64), 1, 1.0, out)
    assert torch.all(out == 7.0)


def test_bf16_items_run_the_avx512_code_where_the_cpu_has_it(cpu_attention):
    """The SIMD code is compiled into bf16 kernels of whole-32 head rows and whole-16 blocks and chosen where the CPU
    has AVX-512 BF16; fp32 kernels and other shapes run the generic code."""
    flags = host_cpu_flags()
    has = platform.machine() == "x86_64" and all(f in flags for f in ("avx512_bf16", "avx512bw", "avx512vl"))
    fields = {"head_dim": 64, "num_attention_heads": 6, "num_key_value_heads": 2}
    assert cpu_attention(dtype="bfloat16", block_size=16, **fields).simd == has
    assert not cpu_attention(dtype="float32", block_size=16, **fields).simd
    assert not cpu_attention(dtype="bfloat16", block_size=8, **fields).simd
    assert not cpu_attention(dtype="bfloat16", block_size=16, head_dim=80, num_attention_heads=6,
                             num_key_value_heads=2).simd


def test_large_scores_do_not_overflow(cpu_attention, paged_kv, attention_reference):
    """Scores far from 0 (scaled keys): the max is subtracted before exp, so nothing overflows or underflows to NaN."""
    kernel = cpu_attention(dtype="float32", block_size=16, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    gen = torch.Generator().manual_seed(3)
    kv = paged_kv([50], 1, 64, 16, torch.float32, "cpu", gen)
    kv.k_cache.mul_(40.0)  # the NaN padding stays NaN
    q = torch.randn((1, 2, 64), generator=gen)
    out = torch.empty_like(q)
    kernel(q, kv.k_cache, kv.v_cache, kv.block_tables, torch.tensor([50], dtype=torch.int32), torch.tensor([0]), 50,
           0.125, out)
    expected = attention_reference(q.float(), kv.keys[0] * 40.0, kv.values[0], 0.125)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES["float32"])


def test_softmax_probabilities_to_a_few_ulp(cpu_attention):
    """Two keys whose scores differ by x: with V rows e0 and e1 the output row is the probability pair, so the
    kernel's exp and normalisation are checked alone, against fp64, to 4 fp32 ulp (exp within 2, then a sum and a
    division). Scores below -87.3 give exactly 0, where fp32 exp would be denormal."""
    kernel = cpu_attention(dtype="float32", block_size=8, head_dim=8, num_attention_heads=1, num_key_value_heads=1)
    under = torch.tensor([-87.4, -88.0, -100.0, -1e30, float("-inf")])  # key 0's probability: exactly 0
    x = torch.cat([torch.linspace(-87.0, 0.0, 300), torch.tensor([-0.3466, -1e-6, 1e-3, 5.0, 30.0]), under])
    num_seqs = x.numel()
    k_cache = torch.zeros((num_seqs, 8, 1, 8))
    v_cache = torch.zeros((num_seqs, 8, 1, 8))
    k_cache[:, 0, 0, 0] = x  # score of key 0 = x (q = e0, scale 1); key 1 scores 0
    v_cache[:, 0, 0, 0] = 1.0
    v_cache[:, 1, 0, 1] = 1.0
    q = torch.zeros((num_seqs, 1, 8))
    q[:, 0, 0] = 1.0
    out = torch.empty_like(q)
    tables = torch.arange(num_seqs, dtype=torch.int32)[:, None]
    lens = torch.full((num_seqs,), 2, dtype=torch.int32)
    kernel(q, k_cache, v_cache, tables, lens, torch.arange(num_seqs), 2, 1.0, out)
    expected = torch.softmax(torch.stack([x.double(), torch.zeros(num_seqs, dtype=torch.float64)], dim=-1), dim=-1)
    torch.testing.assert_close(out[:, 0, :2].double(), expected, atol=1e-37, rtol=4 * 2**-24)
    assert torch.all(out[:, 0, 2:] == 0)
    assert out[-len(under):, 0, :2].tolist() == [[0.0, 1.0]] * len(under)


def test_torch_ops_mixed_step_equals_pytorch_path(cpu_attention, paged_kv):
    """A step of prompt chunks and decodes: the kernel takes the one-token queries, SDPA the rest, and the result
    is the PyTorch path's."""
    kernel = cpu_attention(dtype="float32", block_size=16, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    gen = torch.Generator().manual_seed(5)
    seq_lens, query_lens = [40, 7, 33, 1], [1, 7, 5, 1]  # decode, whole prompt, chunk after a prefix, 1-token prompt
    kv = paged_kv(seq_lens, 2, 64, 16, torch.float32, "cpu", gen)
    kv.k_cache.nan_to_num_(0.0)  # the PyTorch path reads whole blocks and masks: keep the padding finite for it
    kv.v_cache.nan_to_num_(0.0)
    num_tokens = sum(query_lens)
    q = torch.randn((num_tokens, 4, 64), generator=gen)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    positions = torch.cat([torch.arange(s - n, s) for s, n in zip(seq_lens, query_lens)])
    meta = AttentionMetadata(
        positions=positions, slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=kv.block_tables, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_host=tuple(query_lens), seq_lens_host=tuple(seq_lens),
    )
    with_kernel = TorchOps(kernel).attention(q, kv.k_cache, kv.v_cache, meta, 0.125)
    without = TorchOps().attention(q, kv.k_cache, kv.v_cache, meta, 0.125)
    torch.testing.assert_close(with_kernel, without, **TOLERANCES["float32"])


def test_plan_carries_the_kernel_only_where_it_applies():
    assert cpu_attention_supported(tiny_spec(head_dim=64), "bfloat16")
    assert cpu_attention_supported(tiny_spec(head_dim=80), "float32")
    assert not cpu_attention_supported(tiny_spec(head_dim=64), "float16")  # no fp16 widening in the template
    assert not cpu_attention_supported(tiny_spec(head_dim=36), "float32")  # not a whole number of 8-lane vectors
    names = [k.name for k in make_plan(tiny_spec(), "float16", 16).kernels]
    assert "cpu_decode_attention" not in names


def test_backend_says_which_attention_it_runs(tiny_build, monkeypatch):
    """The build's kernel is used where it can run; otherwise the PyTorch path, with the reason."""
    build = open_build(tiny_build("llama"))
    choice = choose_cpu_kernels(build)
    isa = build.manifest["cpu_kernels"]["isa"]
    if isa == "avx2-fma" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        assert choice.attention is None and "kernels need avx2-fma" in choice.reason
    else:
        assert choice.attention is not None and choice.rms_norm is None  # float32: PyTorch's RMSNorm, as HF's
        assert choice.rope_kv_write is not None
        assert f"compiled decode attention, decode step, RoPE + KV write ({isa})" in choice.reason
        assert not choice.op_by_op

    def choose(entry: dict | None):
        manifest = json.loads(json.dumps(build.manifest))
        if entry is None:
            del manifest["cpu_kernels"]
        else:
            manifest["cpu_kernels"] = entry
        return choose_cpu_kernels(type(build)(build.path, manifest, build.spec, build.dtype, build.block_size,
                                                build.kernel_dir))

    for entry, reason in [
        ({"error": "no C++ compiler found"}, "no C++ compiler found"),
        ({**build.manifest["cpu_kernels"], "machine": "riscv64"}, "built for riscv64"),
        ({}, "no cpu kernel for dtype float32"),
        (None, "the build predates the compiled cpu kernels"),
        ({**build.manifest["cpu_kernels"], "libraries": {"cpu_decode_attention": "cpu_decode_attention.cpp"}},
         "could not load cpu_decode_attention.cpp"),
    ]:
        other = choose(entry)
        assert other.attention is other.rms_norm is other.rope_kv_write is None and reason in other.reason, other.reason
        assert other.op_by_op  # the start-up log warns: every step runs in PyTorch ops
    # a library that loads but lacks a symbol this pllm calls: made by another version of pllm
    other = choose({**build.manifest["cpu_kernels"], "libraries": {
        "cpu_decode_attention": build.manifest["cpu_kernels"]["libraries"]["cpu_rope_kv_write"]}})
    assert other.op_by_op and "another version of pllm" in other.reason, other.reason
    # an x86 CPU without AVX2 (torch's capability names) never loads an avx2-fma library
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    other = choose({**build.manifest["cpu_kernels"], "machine": platform.machine(), "isa": "avx2-fma"})
    assert other.attention is None and "kernels need avx2-fma, this CPU offers DEFAULT" in other.reason
