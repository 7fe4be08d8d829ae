"""decode_attention kernel (flash-decoding over the paged cache) vs an fp64 PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.models.ops import AttentionMetadata

# Reference: softmax(q k^T * scale) v in fp64 on the same rounded q, K, V. Tolerances:
# float32 -- fp32 accumulation over <= a few hundred keys plus the split merge: ~1e-6 relative, 2e-5 absolute
#   leaves room for exp2 vs exp rounding.
# float16 -- the probabilities are rounded to fp16 (2**-11) before the PV product and the output once more;
#   outputs are averages of N(0, 1) values (|o| <~ 3): 2e-3 absolute / relative covers both roundings.
# bfloat16 -- the same with 2**-8 per rounding: 2e-2.
TOLERANCES = {
    "float32": {"atol": 2e-5, "rtol": 1e-5},
    "float16": {"atol": 2e-3, "rtol": 2e-3},
    "bfloat16": {"atol": 2e-2, "rtol": 2e-2},
}

SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def context_lengths(draw: st.DrawFn, block_size: int, max_blocks: int) -> int:
    """Context lengths that end exactly on, just past, or just before a block boundary, or anywhere."""
    num_blocks = draw(st.integers(1, max_blocks))
    edge = draw(st.sampled_from([0, 1, -1, None]))
    if edge is None:
        return draw(st.integers(1, num_blocks * block_size))
    return max(1, num_blocks * block_size + edge)


def check_decode(kernel_ops, paged_kv, attention_reference, *, interpret: bool, device: str, dtype: str,
                 head_dim: int, num_kv_heads: int, group_size: int, block_size: int, seq_lens: list[int],
                 num_splits: int | None, seed: int) -> None:
    num_heads = num_kv_heads * group_size
    ops = kernel_ops(interpret=interpret, dtype=dtype, block_size=block_size, head_dim=head_dim,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    kv = paged_kv(seq_lens, num_kv_heads, head_dim, block_size, torch_dtype, device, gen)
    num_seqs = len(seq_lens)
    q = torch.randn((num_seqs, num_heads, head_dim), generator=gen).to(torch_dtype)  # [S, H, D]
    scale = head_dim**-0.5
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)

    out = ops.kernels["decode_attention"].decode_attention(
        q.to(device), kv.k_cache, kv.v_cache, seq_lens_t, kv.block_tables, scale, max(seq_lens), num_splits
    )
    assert out.shape == (num_seqs, num_heads, head_dim) and out.dtype == torch_dtype
    for i in range(num_seqs):
        expected = attention_reference(q[i : i + 1].float(), kv.keys[i], kv.values[i], scale)
        torch.testing.assert_close(out[i : i + 1].cpu().double(), expected, **TOLERANCES[dtype])


@SETTINGS
@given(
    data=st.data(),
    dtype=st.sampled_from(["float32", "float16"]),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_kv_heads=st.integers(1, 2),
    group_size=st.integers(1, 8),
    block_size=st.sampled_from([16, 32]),
    num_seqs=st.integers(1, 4),
    num_splits=st.sampled_from([None, 1, 3, 16]),
    seed=st.integers(0, 2**16),
)
def test_decode_attention_interpret(kernel_ops, paged_kv, attention_reference, data, dtype, head_dim,
                                    num_kv_heads, group_size, block_size, num_seqs, num_splits, seed):
    # short and long sequences mixed in one batch; long ones cross several TILE_N tiles and splits
    seq_lens = [data.draw(context_lengths(block_size, max_blocks=10)) for _ in range(num_seqs)]
    check_decode(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype=dtype,
                 head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                 seq_lens=seq_lens, num_splits=num_splits, seed=seed)


@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "group_size", "block_size", "seq_lens", "num_splits"),
    [
        (80, 1, 1, 16, [1], None),  # one token of context; head_dim 80 pads to 128
        (96, 2, 8, 32, [32, 64, 1], 16),  # ends exactly on block boundaries; more splits than tiles
        (64, 1, 3, 16, [17, 200], 3),  # GQA 3 (padded group), one block past a boundary, uneven splits
        (128, 1, 4, 16, [130], None),  # the launcher's own split choice over several tiles
    ],
)
def test_decode_attention_awkward(kernel_ops, paged_kv, attention_reference, head_dim, num_kv_heads,
                                  group_size, block_size, seq_lens, num_splits):
    check_decode(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                 head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                 seq_lens=seq_lens, num_splits=num_splits, seed=0)


def test_ops_attention_dispatches_decode(kernel_ops, paged_kv, attention_reference):
    """TritonOps.attention picks the decode kernel for a decode-only step and matches the reference."""
    ops = kernel_ops(interpret=True, dtype="float32", block_size=16, head_dim=64, num_attention_heads=4,
                     num_key_value_heads=2)
    seq_lens = [5, 16, 33]
    gen = torch.Generator().manual_seed(3)
    kv = paged_kv(seq_lens, 2, 64, 16, torch.float32, "cpu", gen)
    q = torch.randn((3, 4, 64), generator=gen)
    meta = AttentionMetadata(
        positions=torch.tensor([n - 1 for n in seq_lens]),
        slot_mapping=torch.stack([s[-1] for s in kv.slot_ids]),
        query_start_loc=torch.arange(4, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=kv.block_tables,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_host=(1, 1, 1),
        seq_lens_host=tuple(seq_lens),
    )
    out = ops.attention(q, kv.k_cache, kv.v_cache, meta, 0.125)
    for i in range(3):
        expected = attention_reference(q[i : i + 1], kv.keys[i], kv.values[i], 0.125)
        torch.testing.assert_close(out[i : i + 1].double(), expected, **TOLERANCES["float32"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    data=st.data(),
    head_dim=st.sampled_from([64, 80, 96, 128]),
    num_kv_heads=st.integers(1, 8),
    group_size=st.integers(1, 8),
    block_size=st.sampled_from([16, 32]),
    num_seqs=st.integers(1, 64),
    num_splits=st.sampled_from([None, 1, 16]),
    seed=st.integers(0, 2**16),
)
def test_decode_attention_cuda(kernel_ops, paged_kv, attention_reference, cuda_device, data, dtype, head_dim,
                               num_kv_heads, group_size, block_size, num_seqs, num_splits, seed):
    seq_lens = [data.draw(context_lengths(block_size, max_blocks=200)) for _ in range(num_seqs)]
    check_decode(kernel_ops, paged_kv, attention_reference, interpret=False, device=cuda_device, dtype=dtype,
                 head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                 seq_lens=seq_lens, num_splits=num_splits, seed=seed)
