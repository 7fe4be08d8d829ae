"""moe kernels (tokens grouped by expert, grouped gate_up + SiLU, down, top-k sum) vs a PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.models.spec import MoeSpec
from pllm.runtime.backends.cpu.cpu_moe import grouped_moe

# Reference: the per-expert SwiGLU in fp64 on the same rounded inputs, weighted and summed per token. Inputs are
# scaled so every product entry is O(1). Tolerances, as for the dense mlp kernel (tests/kernels/test_mlp.py):
# float32 -- fp32 accumulation in a different order: ~1e-6 relative per sum; 1e-4 leaves room for K loops <= 300.
# float16 -- gate, up, h, each term and each partial sum are rounded to fp16 (2**-11): 4e-3.
TOLERANCES = {"float32": {"atol": 1e-4, "rtol": 1e-4}, "float16": {"atol": 4e-3, "rtol": 4e-3}}
SETTINGS = settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_moe(x, topk_weights, topk_ids, gate_up_weights, down_weights) -> torch.Tensor:
    intermediate = down_weights.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate_up = gate_up_weights[e].double() @ x[t].double()  # [2I]
            h = torch.nn.functional.silu(gate_up[:intermediate]) * gate_up[intermediate:]
            out[t] += float(topk_weights[t, k]) * (down_weights[e].double() @ h)
    return out


def random_moe_inputs(num_tokens, hidden_size, intermediate_size, num_experts, top_k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num_tokens, hidden_size), generator=gen).to(dtype)
    gate_up = torch.randn((num_experts, 2 * intermediate_size, hidden_size), generator=gen) * hidden_size**-0.5
    down = torch.randn((num_experts, hidden_size, intermediate_size), generator=gen) * intermediate_size**-0.5
    # distinct experts per token, as a router's top-k gives them, in no particular order
    rows = [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]
    topk_ids = torch.stack(rows) if rows else torch.zeros((0, top_k), dtype=torch.int64)
    topk_weights = torch.rand((num_tokens, top_k), generator=gen, dtype=torch.float32)
    return x, topk_weights, topk_ids.reshape(num_tokens, top_k), gate_up.to(dtype), down.to(dtype)


def check_moe(kernel_ops, *, interpret, device, dtype, hidden_size, intermediate_size, num_experts, top_k,
              num_tokens, seed):
    moe = MoeSpec(num_experts, top_k, intermediate_size, True, False, (0,))
    ops = kernel_ops(interpret=interpret, dtype=dtype, hidden_size=hidden_size, moe=moe)
    inputs = random_moe_inputs(num_tokens, hidden_size, intermediate_size, num_experts, top_k,
                               getattr(torch, dtype), seed)
    out = ops.moe(*(t.to(device) for t in inputs))
    assert out.shape == (num_tokens, hidden_size) and out.dtype == getattr(torch, dtype)
    torch.testing.assert_close(out.cpu().double(), reference_moe(*inputs), **TOLERANCES[dtype])
    return out.cpu(), inputs


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    # multiples of BLOCK_K (64) and not, so both K-loop structures are rendered and run
    hidden_size=st.sampled_from([64, 96]),
    intermediate_size=st.sampled_from([32, 64, 80]),
    num_experts=st.sampled_from([2, 4, 8]),
    top_k=st.integers(1, 4),
    # one token (decode); a group of 16 (BLOCK_M) and one past it; more pairs than one tile holds
    num_tokens=st.sampled_from([1, 3, 8, 17, 40]),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", hidden_size=64, intermediate_size=32, num_experts=4, top_k=2, num_tokens=1, seed=0)
def test_moe_interpret(kernel_ops, dtype, hidden_size, intermediate_size, num_experts, top_k, num_tokens, seed):
    top_k = min(top_k, num_experts)
    check_moe(kernel_ops, interpret=True, device="cpu", dtype=dtype, hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_experts=num_experts, top_k=top_k, num_tokens=num_tokens,
              seed=seed)


def test_moe_interpret_equals_cpu_path_bit_for_bit_where_one_expert_dominates(kernel_ops):
    """Every token to expert 0 (one full group plus padding, the other experts idle); fp32 sums in the same order."""
    out, (x, weights, ids, gate_up, down) = check_moe(
        kernel_ops, interpret=True, device="cpu", dtype="float32", hidden_size=64, intermediate_size=64,
        num_experts=4, top_k=1, num_tokens=20, seed=1)
    ids = torch.zeros_like(ids)
    kernel = kernel_ops(interpret=True, dtype="float32", hidden_size=64,
                        moe=MoeSpec(4, 1, 64, True, False, (0,))).moe(x, weights, ids, gate_up, down)
    torch.testing.assert_close(kernel, grouped_moe(x, weights, ids, gate_up, down), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel.double(), reference_moe(x, weights, ids, gate_up, down), **TOLERANCES["float32"])


def test_moe_rejects_unstacked_weights(kernel_ops):
    ops = kernel_ops(interpret=True, dtype="float32", hidden_size=64, moe=MoeSpec(4, 2, 32, True, False, (0,)))
    with pytest.raises(AssertionError, match=r"gate_up_weight must be \(4, 64, 64\)"):
        ops.moe(torch.zeros((1, 64)), torch.ones((1, 2)), torch.zeros((1, 2), dtype=torch.int64),
                torch.zeros((64, 64)), torch.zeros((4, 64, 32)))


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    num_experts=st.sampled_from([4, 8]),
    top_k=st.integers(1, 3),
    num_tokens=st.sampled_from([0, 1, 5, 33]),
    seed=st.integers(0, 2**16),
)
def test_cpu_grouped_moe_matches_reference(dtype, num_experts, top_k, num_tokens, seed):
    tolerances = {**TOLERANCES, "bfloat16": {"atol": 3e-2, "rtol": 3e-2}}
    inputs = random_moe_inputs(num_tokens, 48, 40, num_experts, top_k, getattr(torch, dtype), seed)
    out = grouped_moe(*inputs)
    assert out.dtype == getattr(torch, dtype)
    torch.testing.assert_close(out.double(), reference_moe(*inputs), **tolerances[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    hidden_size=st.sampled_from([1024, 2048]),
    intermediate_size=st.sampled_from([768, 1408]),
    num_experts=st.sampled_from([8, 64]),
    top_k=st.sampled_from([2, 8]),
    num_tokens=st.sampled_from([1, 16, 256, 1000]),
    seed=st.integers(0, 2**16),
)
def test_moe_cuda(kernel_ops, cuda_device, dtype, hidden_size, intermediate_size, num_experts, top_k, num_tokens,
                  seed):
    tolerances = {**TOLERANCES, "bfloat16": {"atol": 3e-2, "rtol": 3e-2}}
    moe = MoeSpec(num_experts, top_k, intermediate_size, True, False, (0,))
    ops = kernel_ops(interpret=False, dtype=dtype, hidden_size=hidden_size, moe=moe)
    inputs = random_moe_inputs(num_tokens, hidden_size, intermediate_size, num_experts, top_k,
                               getattr(torch, dtype), seed)
    out = ops.moe(*(t.to(cuda_device) for t in inputs))
    expected = grouped_moe(*(t.to(cuda_device) for t in inputs)).double()  # fp64 loops are too slow at this size
    torch.testing.assert_close(out.double(), expected, **tolerances[dtype])
