"""What the compiled decode step's tests share: kernels compiled per (spec, dtype), random weights and a paged
decode step, both paths run on the same inputs, and the bounds their difference keeps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import compile_cpu_kernels
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.llama import LlamaModel, weight_layout
from pllm.models.ops import AttentionMetadata
from pllm.models.quant import QuantFormat, QuantScheme
from pllm.runtime.backends.cpu.cpu_decode_step import CpuDecodeStep
from pllm.runtime.backends.cpu.cpu_kernels import CpuDecodeAttention, CpuQuantLinear, CpuRmsNorm, CpuRopeKvWrite
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

from .conftest import make_paged_kv, tiny_spec

SETTINGS = settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK_SIZE = 16
MAX_POSITIONS = 256
U32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # of bfloat16


def make_build_ops(tmp_path_factory: pytest.TempPathFactory):
    """Factory: (spec, dtype) -> (per-op TorchOps, TorchOps with the compiled step), over one compiled plan. Fresh
    ops each call (the kernels cached): TorchOps keeps packed weights by address, which a later test's weights may
    reuse."""
    cache: dict[tuple, tuple] = {}

    def make(spec, dtype: str, packed: bool = False) -> tuple[TorchOps, TorchOps]:
        """packed: a build that keeps packed weights (its plan carries the packed linear, the step reads them)."""
        key = (spec, dtype, packed)
        if key not in cache:
            out = tmp_path_factory.mktemp("cpu_step")
            plan = make_plan(spec, dtype, BLOCK_SIZE, QuantFormat(QuantScheme.INT8, 32) if packed else None)
            render_plan(plan, out)
            entry = compile_cpu_kernels(out, plan)
            assert "error" not in entry, entry["error"]
            lib, tdtype = entry["libraries"], getattr(torch, dtype)
            h, kv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
            attention = CpuDecodeAttention(out / lib["cpu_decode_attention"], tdtype, BLOCK_SIZE, h, kv, d)
            rope = CpuRopeKvWrite(out / lib["cpu_rope_kv_write"], tdtype, h, kv, d)
            norm = CpuRmsNorm(out / lib["cpu_rms_norm"], spec.hidden_size, spec.rms_norm_eps) if "cpu_rms_norm" in lib \
                else None
            step = CpuDecodeStep(out / lib["cpu_decode_step"], spec, tdtype, BLOCK_SIZE)
            assert step.packed == packed
            quant = CpuQuantLinear(out / lib["cpu_quant_linear"]) if packed else None
            cache[key] = (attention, norm, rope, quant, step)
        attention, norm, rope, quant, step = cache[key]
        return (TorchOps(attention, norm, rope, quant_kernel=quant),
                TorchOps(attention, norm, rope, quant_kernel=quant, decode_step=step))

    return make


def random_weights(spec, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights of the runtime layout at trained-model scales: matrices ~ 1/sqrt(in), norms ~ 1, biases small."""
    weights = {}
    for name, tensor in weight_layout(spec).items():
        shape = tensor.shape
        if len(shape) == 1:
            w = 0.1 * torch.randn(shape, generator=gen) + (0.0 if name.endswith("bias") else 1.0)
        else:
            w = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        weights[name] = w.to(dtype)
    return weights


def decode_step(spec, dtype: torch.dtype, context_lens: list[int], gen: torch.Generator):
    """One decode token per sequence after context_lens cached tokens: metadata, and per-layer paged caches."""
    seq_lens = [n + 1 for n in context_lens]
    paged = make_paged_kv(seq_lens, spec.num_key_value_heads, spec.head_dim, BLOCK_SIZE, dtype, "cpu", gen)
    caches = [(paged.k_cache, paged.v_cache)]
    for _ in range(1, spec.num_hidden_layers):  # other layers: random rows everywhere, same tables
        caches.append((torch.randn(paged.k_cache.shape, generator=gen).to(dtype),
                       torch.randn(paged.k_cache.shape, generator=gen).to(dtype)))
    slots = torch.stack([s[-1] for s in paged.slot_ids])  # [B]: each new token's slot
    num_seqs = len(seq_lens)
    meta = AttentionMetadata(
        positions=torch.tensor(context_lens, dtype=torch.int64), slot_mapping=slots.to(torch.int64),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=paged.block_tables, max_query_len=1,
        max_seq_len=max(seq_lens), query_lens_host=(1,) * num_seqs, seq_lens_host=tuple(seq_lens),
    )
    return meta, caches


def run_both(build_ops, spec, dtype: str, context_lens: list[int], seed: int, pack: Callable | None = None):
    """(compiled, per-op) final hidden states [B, hidden] and caches after one decode step on the same inputs.
    pack: (weights, generator) -> the weights with some linears packed, on a build that keeps packed weights."""
    per_op, compiled = build_ops(spec, dtype, packed=pack is not None)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    weights = random_weights(spec, tdtype, gen)
    if pack is not None:
        weights = pack(weights, gen)
    meta, caches = decode_step(spec, tdtype, context_lens, gen)
    ids = torch.randint(0, spec.vocab_size, (len(context_lens),), generator=gen)
    results = []
    for ops in (compiled, per_op):
        model = LlamaModel(spec, weights, ops, MAX_POSITIONS)
        assert (model.decode_stack is not None) == (ops is compiled)
        layer_caches = [(k.clone(), v.clone()) for k, v in caches]
        out = model.forward(ids, [meta] * spec.num_hidden_layers, layer_caches)
        results.append((out.float(), layer_caches))
    return results


def layered_spec(num_layers: int, attention_bias: bool = False, **fields):
    return dataclasses.replace(tiny_spec(**fields), num_hidden_layers=num_layers, attention_bias=attention_bias)


def rows_scale(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=-1, keepdim=True)  # [B, 1]


# Bounds, relative to each output row's largest value. Only the order of each GEMV's fp32 sum differs from the
# per-op path (and, in fp32, the norms' sum of squares and silu's exp, a few ulps each). By probabilistic rounding
# error analysis (Higham and Mary, 2019) a sum of n terms in any order is within lam * sqrt(n) * u * sum|w_i x_i| of
# the exact sum except with probability 2 exp(-lam^2 / 2) (lam = 8: below 1e-13); with weight rows of norm ~1 (the
# 1/sqrt(in) scale) Cauchy-Schwarz gives sum|w_i x_i| <= |x|_2 <= sqrt(n) * max|x|. So each GEMV moves its output by
# at most lam * n * u of the row's scale, n up to the largest input width; the norms keep rows at scale ~1, so
# layers add, and the final norm counts as one more. In bfloat16 both paths round every op's output to bf16; a
# different fp32 order flips such a rounding by one bf16 ulp (2^-8 relative) now and then, and a flipped element
# feeds the next op: per layer ~6 roundings that may flip (qkv, rope, o, norm, gate/up and act, down), 6 ulps.
def bound(spec, dtype: str) -> float:
    layers = spec.num_hidden_layers + 1
    if dtype == "bfloat16":
        return 6 * U_BF16 * layers
    widest = max(spec.hidden_size, spec.q_size, spec.intermediate_size)
    return 8 * widest * U32 * layers


# Each shape is one compile per dtype (the layer count is baked in): one layer, and stacks of three
SPECS = {
    "smollm2-like-1": dict(num_layers=1, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, head_dim=64),
    "qwen2-bias-3": dict(num_layers=3, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, attention_bias=True),
    # every linear an odd count of 64-row panels (qkv 5, o 3, gate_up 5 each half, down 3)
    "odd-panels-2": dict(num_layers=2, hidden_size=192, intermediate_size=320, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=32),
    "mha-odd-rows-3": dict(num_layers=3, hidden_size=96, intermediate_size=200, num_attention_heads=3,
                           num_key_value_heads=3, head_dim=32),
    # qwen3: q/k norm, and heads wider than hidden / heads (q_size 256 against hidden 128)
    "qwen3-qk-norm-2": dict(num_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, qk_norm=True),
}


def spec_of(shape: str):
    return layered_spec(**SPECS[shape])
