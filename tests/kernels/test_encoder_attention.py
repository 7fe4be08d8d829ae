"""encoder_attention kernel (bidirectional, per sequence, no cache) vs an fp64 reference, and the cpu op likewise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.models.ops import AttentionMetadata
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

# Reference: softmax(q k^T * scale) v over each sequence's own tokens, in fp64 on the same rounded q, k, v.
# float32 -- fp32 accumulation and exp2: 2e-5 absolute, 1e-5 relative (as the prefill kernel).
# float16 -- probabilities rounded to fp16 before the PV product, output rounded once: 2e-3.
# bfloat16 -- the same with 2**-8 per rounding: 2e-2.
TOLERANCES = {
    "float32": {"atol": 2e-5, "rtol": 1e-5},
    "float16": {"atol": 2e-3, "rtol": 2e-3},
    "bfloat16": {"atol": 2e-2, "rtol": 2e-2},
}

SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encoder_metadata(lens: list[int], device: str) -> AttentionMetadata:
    """Each sequence whole in the step, no cache: query lens = seq lens, positions from 0, no slots or blocks."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        positions=torch.cat([torch.arange(n) for n in lens]).to(device),
        slot_mapping=torch.zeros(sum(lens), dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_lens_host=tuple(lens),
        seq_lens_host=tuple(lens),
    )


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float) -> torch.Tensor:
    """[T, H, D] float64: every token to every token of its own sequence."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].double() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        probs = (torch.einsum("qhd,khd->hqk", qs, ks) * scale).softmax(dim=-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, vs))
        start += n
    return torch.cat(out)


def make_qkv(lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q, k, v as the model hands them over: [T, heads, D] column slices of one fused qkv row, not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn((sum(lens), width), generator=gen).to(dtype)  # [T, q + k + v]
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    return (qkv[:, :q_end].view(-1, num_heads, head_dim), qkv[:, q_end:k_end].view(-1, num_kv_heads, head_dim),
            qkv[:, k_end:].view(-1, num_kv_heads, head_dim))


def check(encoder_kernel_ops, *, interpret: bool, device: str, dtype: str, head_dim: int, num_heads: int,
          num_kv_heads: int, lens: list[int], seed: int, cpu_op: bool = False) -> None:
    torch_dtype = getattr(torch, dtype)
    q, k, v = make_qkv(lens, num_heads, num_kv_heads, head_dim, torch_dtype, seed)
    meta = encoder_metadata(lens, device)
    scale = head_dim**-0.5
    if cpu_op:
        ops = TorchOps()
    else:
        ops = encoder_kernel_ops(interpret=interpret, dtype=dtype, head_dim=head_dim, num_attention_heads=num_heads,
                                 num_key_value_heads=num_kv_heads, hidden_size=num_heads * head_dim)
    out = ops.encoder_attention(q.to(device), k.to(device), v.to(device), meta, scale)
    assert out.shape == q.shape and out.dtype == torch_dtype
    torch.testing.assert_close(out.cpu().double(), reference(q, k, v, lens, scale), **TOLERANCES[dtype])


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    head_dim=st.sampled_from([32, 64, 80]),
    num_kv_heads=st.integers(1, 2),
    group_size=st.sampled_from([1, 3]),
    lens=st.lists(st.integers(1, 80), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_encoder_attention_interpret(encoder_kernel_ops, dtype, head_dim, num_kv_heads, group_size, lens, seed):
    check(encoder_kernel_ops, interpret=True, device="cpu", dtype=dtype, head_dim=head_dim,
          num_heads=num_kv_heads * group_size, num_kv_heads=num_kv_heads, lens=lens, seed=seed)


@pytest.mark.parametrize(
    ("head_dim", "num_heads", "lens"),
    [
        (32, 12, [1]),  # one token: attends to itself alone
        (32, 12, [7, 64, 65, 1]),  # all-MiniLM-L6-v2's heads; sequences ending on and one past a 64-row block
        (96, 2, [130, 3]),  # head_dim 96 (masked to 128); a sequence spanning three query blocks
    ],
)
def test_encoder_attention_awkward(encoder_kernel_ops, head_dim, num_heads, lens):
    check(encoder_kernel_ops, interpret=True, device="cpu", dtype="float32", head_dim=head_dim,
          num_heads=num_heads, num_kv_heads=num_heads, lens=lens, seed=0)


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    head_dim=st.sampled_from([32, 64, 80]),
    num_heads=st.integers(1, 4),
    lens=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_the_cpu_op_pads_each_sequence_apart(dtype, head_dim, num_heads, lens, seed):
    """The PyTorch op batches the step's sequences padded to one length; padding never leaks into a row."""
    check(None, interpret=False, device="cpu", dtype=dtype, head_dim=head_dim, num_heads=num_heads,
          num_kv_heads=num_heads, lens=lens, seed=seed, cpu_op=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    head_dim=st.sampled_from([32, 64, 80, 128]),
    num_heads=st.sampled_from([4, 12, 16]),
    lens=st.lists(st.integers(1, 512), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_encoder_attention_cuda(encoder_kernel_ops, cuda_device, dtype, head_dim, num_heads, lens, seed):
    check(encoder_kernel_ops, interpret=False, device=cuda_device, dtype=dtype, head_dim=head_dim,
          num_heads=num_heads, num_kv_heads=num_heads, lens=lens, seed=seed)
