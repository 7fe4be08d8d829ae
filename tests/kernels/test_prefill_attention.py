"""prefill_attention kernel (variable-length causal segments over the paged cache) vs an fp64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.models.ops import AttentionMetadata

# Reference: causal softmax(q k^T * scale) v in fp64 on the same rounded q, K, V. Tolerances as for decode:
# float32 -- fp32 accumulation and exp2: 2e-5 absolute, 1e-5 relative.
# float16 -- probabilities rounded to fp16 before the PV product, output rounded once: 2e-3.
# bfloat16 -- the same with 2**-8 per rounding: 2e-2.
TOLERANCES = {
    "float32": {"atol": 2e-5, "rtol": 1e-5},
    "float16": {"atol": 2e-3, "rtol": 2e-3},
    "bfloat16": {"atol": 2e-2, "rtol": 2e-2},
}

SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def segments(draw: st.DrawFn, block_size: int, max_query_len: int, max_context_blocks: int) -> tuple[int, int]:
    """(context_len, query_len): empty prefix, a full-prefix hit ending on a block, or any prefix; any query."""
    kind = draw(st.sampled_from(["empty", "block_aligned", "any"]))
    if kind == "empty":
        context_len = 0
    elif kind == "block_aligned":
        context_len = draw(st.integers(1, max_context_blocks)) * block_size
    else:
        context_len = draw(st.integers(0, max_context_blocks * block_size))
    query_len = draw(st.one_of(st.just(1), st.integers(1, max_query_len)))
    return context_len, query_len


def make_metadata(segs: list[tuple[int, int]], slot_ids: list[torch.Tensor], block_tables: torch.Tensor,
                  device: str) -> AttentionMetadata:
    query_lens = [q for _, q in segs]
    seq_lens = [c + q for c, q in segs]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    positions = torch.cat([torch.arange(c, c + q) for c, q in segs])
    slots = torch.cat([s[c:] for s, (c, _) in zip(slot_ids, segs)])
    return AttentionMetadata(
        positions=positions.to(device),
        slot_mapping=slots.to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )


def check_prefill(kernel_ops, paged_kv, attention_reference, *, interpret: bool, device: str, dtype: str,
                  head_dim: int, num_kv_heads: int, group_size: int, block_size: int,
                  segs: list[tuple[int, int]], seed: int, through_ops: bool = False) -> None:
    num_heads = num_kv_heads * group_size
    ops = kernel_ops(interpret=interpret, dtype=dtype, block_size=block_size, head_dim=head_dim,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    kv = paged_kv([c + q for c, q in segs], num_kv_heads, head_dim, block_size, torch_dtype, device, gen)
    meta = make_metadata(segs, kv.slot_ids, kv.block_tables, device)
    num_tokens = sum(q for _, q in segs)
    q = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(torch_dtype)  # [T, H, D]
    scale = head_dim**-0.5

    if through_ops:
        out = ops.attention(q.to(device), kv.k_cache, kv.v_cache, meta, scale)
    else:
        out = ops.kernels["prefill_attention"].prefill_attention(
            q.to(device), kv.k_cache, kv.v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            meta.max_query_len,
        )
    assert out.shape == (num_tokens, num_heads, head_dim) and out.dtype == torch_dtype
    start = 0
    for i, (_, query_len) in enumerate(segs):
        expected = attention_reference(q[start : start + query_len].float(), kv.keys[i], kv.values[i], scale)
        torch.testing.assert_close(out[start : start + query_len].cpu().double(), expected, **TOLERANCES[dtype])
        start += query_len


@SETTINGS
@given(
    data=st.data(),
    dtype=st.sampled_from(["float32", "float16"]),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_kv_heads=st.integers(1, 2),
    group_size=st.integers(1, 8),
    block_size=st.sampled_from([16, 32]),
    num_seqs=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_prefill_attention_interpret(kernel_ops, paged_kv, attention_reference, data, dtype, head_dim,
                                     num_kv_heads, group_size, block_size, num_seqs, seed):
    # mixed batches: long prompt chunks next to single decode tokens, with and without a cached prefix
    segs = [data.draw(segments(block_size, max_query_len=40, max_context_blocks=4)) for _ in range(num_seqs)]
    check_prefill(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype=dtype,
                  head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                  segs=segs, seed=seed)


@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "group_size", "block_size", "segs"),
    [
        (64, 1, 1, 16, [(0, 1)]),  # a one-token prompt
        (80, 1, 1, 16, [(0, 70)]),  # a prompt longer than one BLOCK_Q (64 rows at GQA 1); head_dim 80
        (96, 2, 8, 32, [(32, 5), (0, 32), (64, 1)]),  # full-prefix hits on block boundaries; a decode token
        (64, 1, 3, 16, [(16, 16), (3, 1), (0, 23)]),  # GQA 3 pads to 4 head rows; chunk ends on a block
        (128, 1, 1, 16, [(5, 1), (9, 1)]),  # every query_len 1: the prefill kernel must handle pure decode too
    ],
)
def test_prefill_attention_awkward(kernel_ops, paged_kv, attention_reference, head_dim, num_kv_heads,
                                   group_size, block_size, segs):
    check_prefill(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                  head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                  segs=segs, seed=0)


def test_ops_attention_dispatches_prefill_for_mixed_batch(kernel_ops, paged_kv, attention_reference):
    """A step mixing a prompt chunk with decode tokens goes through TritonOps.attention to the prefill kernel."""
    check_prefill(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                  head_dim=64, num_kv_heads=2, group_size=2, block_size=16, segs=[(20, 1), (0, 12), (7, 1)],
                  seed=4, through_ops=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    data=st.data(),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_kv_heads=st.integers(1, 4),
    group_size=st.integers(1, 8),
    block_size=st.sampled_from([16, 32]),
    num_seqs=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_prefill_attention_cuda(kernel_ops, paged_kv, attention_reference, cuda_device, data, dtype, head_dim,
                                num_kv_heads, group_size, block_size, num_seqs, seed):
    # sizes bounded by the fp64 CPU reference: [heads, query_len, seq_len] scores per sequence
    segs = [data.draw(segments(block_size, max_query_len=300, max_context_blocks=32)) for _ in range(num_seqs)]
    check_prefill(kernel_ops, paged_kv, attention_reference, interpret=False, device=cuda_device, dtype=dtype,
                  head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                  segs=segs, seed=seed)
