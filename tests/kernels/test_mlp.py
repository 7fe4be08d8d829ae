"""mlp kernels (gate_up matmul + fused SiLU-and-multiply, then down) vs a PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

# Reference: down(silu(x @ gate^T) * (x @ up^T)) in fp64 on the same rounded inputs. Inputs are scaled so every
# product entry is O(1). Tolerances:
# float32 -- fp32 accumulation over H (then I) terms in a different order: ~1e-6 relative per sum; 1e-4
#   absolute and relative leaves room for the longest K loops drawn here (I <= 1536).
# float16 -- h is rounded to fp16 (2**-11) before the down product and the output once more: 4e-3.
# bfloat16 -- the same with 2**-8 per rounding: 3e-2.
TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 1e-4},
    "float16": {"atol": 4e-3, "rtol": 4e-3},
    "bfloat16": {"atol": 3e-2, "rtol": 3e-2},
}

SETTINGS = settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_mlp(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    intermediate = down_weight.shape[1]
    gate_up = x.double() @ gate_up_weight.double().T  # [T, 2I]
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    return (torch.nn.functional.silu(gate) * up) @ down_weight.double().T  # [T, H]


def check_mlp(kernel_ops, *, interpret: bool, device: str, dtype: str, hidden_size: int, intermediate_size: int,
              num_tokens: int, seed: int) -> None:
    ops = kernel_ops(interpret=interpret, dtype=dtype, hidden_size=hidden_size, intermediate_size=intermediate_size)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num_tokens, hidden_size), generator=gen).to(torch_dtype)  # [T, H]
    gate_up_weight = (torch.randn((2 * intermediate_size, hidden_size), generator=gen) * hidden_size**-0.5)
    down_weight = torch.randn((hidden_size, intermediate_size), generator=gen) * intermediate_size**-0.5
    gate_up_weight, down_weight = gate_up_weight.to(torch_dtype), down_weight.to(torch_dtype)

    out = ops.mlp(x.to(device), gate_up_weight.to(device), down_weight.to(device))
    assert out.shape == (num_tokens, hidden_size) and out.dtype == torch_dtype
    expected = reference_mlp(x, gate_up_weight, down_weight)
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCES[dtype])


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    # multiples of BLOCK_K (64) and not, so both K-loop structures are rendered and run
    hidden_size=st.sampled_from([64, 96, 128, 200]),
    intermediate_size=st.sampled_from([64, 160, 256, 300]),
    # 16 is the last small-M batch, 17 the first large-M one
    num_tokens=st.sampled_from([1, 2, 7, 16, 17, 70]),
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", hidden_size=576, intermediate_size=1536, num_tokens=3, seed=0)  # SmolLM2's shape
def test_mlp_interpret(kernel_ops, dtype, hidden_size, intermediate_size, num_tokens, seed):
    check_mlp(kernel_ops, interpret=True, device="cpu", dtype=dtype, hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_tokens=num_tokens, seed=seed)


def test_mlp_rejects_unfused_weight(kernel_ops):
    ops = kernel_ops(interpret=True, dtype="float32", hidden_size=64, intermediate_size=64)
    with pytest.raises(AssertionError, match=r"gate_up_weight must be \(128, 64\)"):
        ops.mlp(torch.zeros((1, 64)), torch.zeros((64, 64)), torch.zeros((64, 64)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])  # every dtype on the GPU, however few examples
@SETTINGS
@given(
    hidden_size=st.sampled_from([576, 1000, 2048, 4096]),
    intermediate_size=st.sampled_from([1536, 2000, 5632, 11008]),
    num_tokens=st.sampled_from([1, 8, 16, 17, 256, 1000]),
    seed=st.integers(0, 2**16),
)
def test_mlp_cuda(kernel_ops, cuda_device, dtype, hidden_size, intermediate_size, num_tokens, seed):
    check_mlp(kernel_ops, interpret=False, device=cuda_device, dtype=dtype, hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_tokens=num_tokens, seed=seed)


@pytest.mark.parametrize("num_tokens", [1, 17])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mlp_gelu_tanh(kernel_ops, dtype, num_tokens):
    """The GeGLU epilogue (ACTIVATION gelu_pytorch_tanh, gemma) on both tile sizes, and the cpu backend's PyTorch
    path, against down(gelu_tanh(g) * u) in fp64; tolerances as above (the epilogue's tanh, built from exp, is
    within ~1e-7 of torch's)."""
    from pllm.runtime.backends.cpu.cpu_ops import TorchOps

    hidden_size, intermediate_size = 96, 160
    triton_ops = kernel_ops(interpret=True, dtype=dtype, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            hidden_act="gelu_pytorch_tanh")
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(num_tokens)
    x = (torch.randn((num_tokens, hidden_size), generator=gen) * 2).to(torch_dtype)
    gate_up = (torch.randn((2 * intermediate_size, hidden_size), generator=gen) * hidden_size**-0.5).to(torch_dtype)
    down = (torch.randn((hidden_size, intermediate_size), generator=gen) * intermediate_size**-0.5).to(torch_dtype)
    g, u = (x.double() @ gate_up.double().T).chunk(2, dim=-1)
    expected = (torch.nn.functional.gelu(g, approximate="tanh") * u) @ down.double().T
    for ops in (triton_ops, TorchOps()):
        out = ops.mlp(x, gate_up, down, "gelu_pytorch_tanh")
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])
    with pytest.raises(AssertionError, match="activation"):
        triton_ops.mlp(x, gate_up, down)  # rendered for GeGLU: a SiLU caller belongs to another build
