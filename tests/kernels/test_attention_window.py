"""Windowed and soft-capped attention (plan constants SLIDING_WINDOW, SOFTCAP) on every backend vs an fp64 reference.

The Triton prefill and decode templates (interpreted), the cpu backend's compiled decode kernel and its PyTorch
path each attend, for a windowed layer, to the keys after query - window exactly as transformers' sliding-window
mask does, and never read a cache block that lies wholly before every query's window: those blocks are filled with
NaN here (a freed block may hold anything), so one stray read would poison the output.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.plan import make_plan
from pllm.runtime.backends.cpu.cpu_kernels import CpuDecodeAttention
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

from .conftest import compile_cpu_kernel, tiny_spec, torch_threads
from .test_prefill_attention import make_metadata

# float32 throughout (the precision the greedy-equality promise runs in). Without a soft-cap the tolerances are
# the attention tests' own (fp32 accumulation, exp2: 2e-5 absolute, 1e-5 relative). The soft-cap's tanh is built
# from exp (tanh = (1 - e) / (1 + e), e = exp(-2|x|)): near 0 that loses up to ~1e-7 absolute in tanh, times the
# cap (<= 8 here) ~1e-6 in a score, so 5e-5 absolute.
TOLERANCES = {False: {"atol": 2e-5, "rtol": 1e-5}, True: {"atol": 5e-5, "rtol": 1e-5}}
SETTINGS = settings(max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAD_DIM = 64
NUM_KV_HEADS = 2
GROUP_SIZE = 2


def quirks(window: int, softcap: float | None) -> dict:
    """The ModelSpec fields that render the window (layer 0 windowed) and the soft-cap into the kernels."""
    return {"sliding_window": window, "sliding_layers": (0,), "attn_logit_softcapping": softcap}


def poison_out_of_window(kv, segs: list[tuple[int, int]], block_size: int, window: int) -> None:
    """NaN into every cache block that lies wholly before the window of its segment's first query."""
    for i, (context_len, _) in enumerate(segs):
        first_visible = max(0, context_len - window + 1)
        for logical in range(first_visible // block_size):
            block = int(kv.block_tables[i, logical])
            kv.k_cache[block] = float("nan")
            kv.v_cache[block] = float("nan")


def run_case(attend, paged_kv, attention_reference, *, segs, block_size, window, softcap, windowed, seed):
    """attend(q, kv, meta, scale) -> out for one backend; checked per segment against the reference."""
    num_heads = NUM_KV_HEADS * GROUP_SIZE
    gen = torch.Generator().manual_seed(seed)
    kv = paged_kv([c + q for c, q in segs], NUM_KV_HEADS, HEAD_DIM, block_size, torch.float32, "cpu", gen)
    if windowed:
        poison_out_of_window(kv, segs, block_size, window)
    meta = make_metadata(segs, kv.slot_ids, kv.block_tables, "cpu")
    num_tokens = sum(q for _, q in segs)
    q = torch.randn((num_tokens, num_heads, HEAD_DIM), generator=gen) * 2  # [T, H, D]; * 2: scores reach the cap
    scale = HEAD_DIM**-0.5
    out = attend(q, kv, meta, scale)
    assert not out.isnan().any(), "a key outside the window was read"
    start = 0
    for i, (_, query_len) in enumerate(segs):
        expected = attention_reference(q[start : start + query_len], kv.keys[i], kv.values[i], scale,
                                       window if windowed else None, softcap)
        torch.testing.assert_close(out[start : start + query_len].double(), expected, **TOLERANCES[softcap is not None])
        start += query_len


# (segments as (cached context, query length), block size, window): prompts longer than the window, chunks whose
# window starts inside the cached context, decode tokens far past it, a window equal to one block and one of 1
AWKWARD = [
    ([(0, 40)], 16, 7),
    ([(33, 20), (0, 5), (70, 1)], 16, 16),
    ([(100, 1), (17, 1), (3, 1)], 16, 9),
    ([(64, 64), (130, 1)], 32, 40),
    ([(12, 6), (0, 9)], 16, 1),
]


def _segments_strategy(block_size: int):
    seg = st.tuples(st.integers(0, 5 * block_size), st.one_of(st.just(1), st.integers(1, 40)))
    return st.lists(seg, min_size=1, max_size=3)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize(("segs", "block_size", "window"), AWKWARD)
def test_triton_prefill_window_softcap(kernel_ops, paged_kv, attention_reference, segs, block_size, window,
                                       windowed, softcap):
    ops = kernel_ops(interpret=True, dtype="float32", block_size=block_size, head_dim=HEAD_DIM,
                     num_attention_heads=NUM_KV_HEADS * GROUP_SIZE, num_key_value_heads=NUM_KV_HEADS,
                     **quirks(window, softcap))
    kernel = ops.kernels["prefill_attention"]

    def attend(q, kv, meta, scale):
        return kernel.prefill_attention(q, kv.k_cache, kv.v_cache, meta.query_start_loc, meta.seq_lens,
                                        meta.block_tables, scale, meta.max_query_len, windowed)

    run_case(attend, paged_kv, attention_reference, segs=segs, block_size=block_size, window=window,
             softcap=softcap, windowed=windowed, seed=1)


@pytest.mark.parametrize("softcap", [None, 8.0])
@pytest.mark.parametrize(("context_lens", "block_size", "window"),
                         [([40, 3, 200], 16, 7), ([64, 65, 1], 32, 32), ([300], 16, 100), ([9, 10], 16, 1)])
def test_triton_decode_window_softcap(kernel_ops, paged_kv, attention_reference, context_lens, block_size, window,
                                      softcap):
    ops = kernel_ops(interpret=True, dtype="float32", block_size=block_size, head_dim=HEAD_DIM,
                     num_attention_heads=NUM_KV_HEADS * GROUP_SIZE, num_key_value_heads=NUM_KV_HEADS,
                     **quirks(window, softcap))
    kernel = ops.kernels["decode_attention"]
    segs = [(c, 1) for c in context_lens]
    for num_splits in (1, 3):  # one program per sequence, and the window split over several

        def attend(q, kv, meta, scale, num_splits=num_splits):
            return kernel.decode_attention(q, kv.k_cache, kv.v_cache, meta.seq_lens, meta.block_tables, scale,
                                           meta.max_seq_len, num_splits=num_splits, windowed=True)

        run_case(attend, paged_kv, attention_reference, segs=segs, block_size=block_size, window=window,
                 softcap=softcap, windowed=True, seed=2)


@SETTINGS
@given(data=st.data(), block_size=st.sampled_from([16, 32]), window=st.integers(1, 80), seed=st.integers(0, 999))
def test_torch_ops_window_softcap(paged_kv, attention_reference, data, block_size, window, seed):
    """The cpu backend's PyTorch path (no compiled kernel): prompt chunks and decode-only steps alike."""
    segs = data.draw(_segments_strategy(block_size))
    ops = TorchOps()
    for softcap in (None, 3.0):
        for step in (segs, [(c + q - 1, 1) for c, q in segs]):  # mixed, then decode only

            def attend(q, kv, meta, scale, softcap=softcap):
                return ops.attention(q, kv.k_cache, kv.v_cache, meta, scale, window, softcap)

            run_case(attend, paged_kv, attention_reference, segs=step, block_size=block_size, window=window,
                     softcap=softcap, windowed=True, seed=seed)


@pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cpu_decode_kernel_window_softcap(tmp_path, paged_kv, attention_reference, softcap):
    """The compiled cpu decode attention, windowed and not, with the window starting mid-tile and mid-block."""
    window, block_size = 13, 16
    spec = tiny_spec(head_dim=HEAD_DIM, num_attention_heads=NUM_KV_HEADS * GROUP_SIZE,
                     num_key_value_heads=NUM_KV_HEADS, **quirks(window, softcap))
    library = compile_cpu_kernel(tmp_path, make_plan(spec, "float32", block_size), "cpu_decode_attention")
    kernel = CpuDecodeAttention(library, torch.float32, block_size, NUM_KV_HEADS * GROUP_SIZE, NUM_KV_HEADS,
                                HEAD_DIM, window, softcap)
    segs = [(c, 1) for c in (0, 12, 13, 40, 97)]
    for windowed in (True, False):

        def attend(q, kv, meta, scale, windowed=windowed):
            out = torch.empty_like(q)
            rows = torch.arange(len(segs))
            return kernel(q, kv.k_cache, kv.v_cache, meta.block_tables, meta.seq_lens, rows, meta.max_seq_len,
                          scale, out, window if windowed else None, softcap)

        run_case(attend, paged_kv, attention_reference, segs=segs, block_size=block_size, window=window,
                 softcap=softcap, windowed=windowed, seed=3)


@pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")
@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_decode_kernel_window_cut_into_parts(tmp_path, paged_kv, attention_reference, threads):
    """One long sequence on several threads: its context is cut into parts, and under a window only the visible
    keys are (the window starting mid-block, the blocks before it NaN), soft-capped, against the reference."""
    window, block_size, softcap = 301, 16, 3.0
    spec = tiny_spec(head_dim=HEAD_DIM, num_attention_heads=NUM_KV_HEADS * GROUP_SIZE,
                     num_key_value_heads=NUM_KV_HEADS, **quirks(window, softcap))
    library = compile_cpu_kernel(tmp_path, make_plan(spec, "float32", block_size), "cpu_decode_attention")
    kernel = CpuDecodeAttention(library, torch.float32, block_size, NUM_KV_HEADS * GROUP_SIZE, NUM_KV_HEADS,
                                HEAD_DIM, window, softcap)
    assert kernel.parts(1, threads) > 1
    segs = [(900, 1)]
    with torch_threads(threads):
        for windowed in (True, False):

            def attend(q, kv, meta, scale, windowed=windowed):
                out = torch.empty_like(q)
                return kernel(q, kv.k_cache, kv.v_cache, meta.block_tables, meta.seq_lens, torch.arange(1),
                              meta.max_seq_len, scale, out, window if windowed else None, softcap)

            run_case(attend, paged_kv, attention_reference, segs=segs, block_size=block_size, window=window,
                     softcap=softcap, windowed=windowed, seed=4)
