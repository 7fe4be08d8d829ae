"""lora_shrink + lora_expand (Multi-LoRA, grouped by adapter) vs the cpu backend's op and an fp64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pllm.models.lora import LoraInputs
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

# float32: fp32 accumulation over K, then over R, in another order than torch: 1e-4. float16: the shrunk rows are
# rounded to fp16 before the expand and y once more: 4e-3 (on O(1) entries).
TOLERANCES = {"float32": {"atol": 1e-4, "rtol": 1e-4}, "float16": {"atol": 4e-3, "rtol": 4e-3},
              "bfloat16": {"atol": 3e-2, "rtol": 3e-2}}  # bfloat16: 2**-8 per rounding, cuda only
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(y, x, a, b, seq_slots):
    out = y.double().clone()
    row = 0
    for length, slot in seq_slots:
        if slot:
            rows = slice(row, row + length)
            out[rows] += x[rows].double() @ a[slot - 1].double().T @ b[slot - 1].double().T
        row += length
    return out


def check_lora(kernel_ops, *, interpret, device, dtype, in_features, out_features, rank_columns, num_adapters,
               seq_slots, seed):
    ops = kernel_ops(interpret=interpret, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(length for length, _ in seq_slots)
    x = torch.randn((num_tokens, in_features), generator=gen).to(torch_dtype)
    y = torch.randn((num_tokens, out_features), generator=gen).to(torch_dtype)
    a = (torch.randn((num_adapters, rank_columns, in_features), generator=gen) * in_features**-0.5).to(torch_dtype)
    b = (torch.randn((num_adapters, out_features, rank_columns), generator=gen) * rank_columns**-0.5).to(torch_dtype)
    spans, row = [], 0
    for length, slot in seq_slots:
        spans.append((row, row + length, slot))
        row += length
    lora = LoraInputs.from_slots(spans, torch.device(device))
    expected = reference(y, x, a, b, seq_slots)
    if lora is None:
        return
    got = ops.lora(y.clone().to(device), x.to(device), a.to(device), b.to(device), lora)
    torch.testing.assert_close(got.cpu().double(), expected, **TOLERANCES[dtype])
    if device == "cpu":  # the cpu backend's batched op, on the same inputs
        cpu = TorchOps().lora(y.clone(), x, a, b, lora)
        torch.testing.assert_close(cpu.double(), expected, **TOLERANCES[dtype])
        torch.testing.assert_close(got.double(), cpu.double(), **TOLERANCES[dtype])
    base_rows = [r for (start, end, slot) in spans if not slot for r in range(start, end)]
    assert torch.equal(got.cpu()[base_rows], y[base_rows])  # the base model's rows untouched, bit for bit


seqs = st.lists(st.tuples(st.integers(1, 20), st.integers(0, 3)), min_size=1, max_size=6)


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16"]),
    in_features=st.sampled_from([64, 96, 200]),
    out_features=st.sampled_from([64, 130, 256]),
    rank_columns=st.sampled_from([8, 48, 192]),  # one module at rank 8; qkv at rank 16; qkv at the max rank 64
    seq_slots=seqs,
    seed=st.integers(0, 2**16),
)
@example(dtype="float32", in_features=64, out_features=64, rank_columns=16, seq_slots=[(1, 1), (1, 0), (1, 2),
         (1, 3), (17, 1)], seed=0)  # decode rows of every adapter and the base, one group over two row tiles
def test_lora_interpret(kernel_ops, dtype, in_features, out_features, rank_columns, seq_slots, seed):
    check_lora(kernel_ops, interpret=True, device="cpu", dtype=dtype, in_features=in_features,
               out_features=out_features, rank_columns=rank_columns, num_adapters=3, seq_slots=seq_slots, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lora_cuda(kernel_ops, dtype):
    check_lora(kernel_ops, interpret=False, device="cuda", dtype=dtype, in_features=576, out_features=1536,
               rank_columns=192, num_adapters=4, seq_slots=[(1, 1), (1, 2), (1, 0), (37, 3), (300, 4), (5, 0)],
               seed=1)


@pytest.mark.parametrize("seq_slots", [
    [(1, 1), (1, 2), (1, 3), (2, 1)],  # decode-sized groups of one size: the padded batched path
    [(40, 1), (1, 2), (1, 0)],  # a prompt beside a decode row: padding would cost more, one matmul pair per adapter
    [(5, 2)],  # one group
])
def test_cpu_lora_paths_match_the_reference(seq_slots):
    gen = torch.Generator().manual_seed(3)
    num_tokens = sum(n for n, _ in seq_slots)
    x, y = torch.randn((num_tokens, 48), generator=gen), torch.randn((num_tokens, 40), generator=gen)
    a, b = torch.randn((3, 24, 48), generator=gen), torch.randn((3, 40, 24), generator=gen)
    spans, row = [], 0
    for n, slot in seq_slots:
        spans.append((row, row + n, slot))
        row += n
    got = TorchOps().lora(y.clone(), x, a, b, LoraInputs.from_slots(spans, torch.device("cpu")))
    torch.testing.assert_close(got.double(), reference(y, x, a, b, seq_slots), atol=1e-4, rtol=1e-4)
