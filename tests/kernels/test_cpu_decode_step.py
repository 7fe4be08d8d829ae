"""cpu_decode_step (the llama wiring's whole decode step, compiled) against the per-op path it stands in for."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from pllm.compiler.cpu_compile import compile_cpu_kernels, find_compiler
from pllm.compiler.kernels.cpu_decode_step import MAX_BATCH
from pllm.compiler.kernels.cpu_decode_step import supported as step_supported
from pllm.compiler.plan import make_plan
from pllm.compiler.quantize import quantize_int4, quantize_int8
from pllm.compiler.render import render_plan
from pllm.models.llama import LlamaModel, weight_layout
from pllm.models.ops import AttentionMetadata
from pllm.models.quant import ACTIVATION_BLOCK, QuantFormat, QuantizedWeight, QuantScheme
from pllm.runtime.backends.cpu.cpu_decode_step import (
    GEMV_LINEAR_MAX_ROWS,
    MAX_COMPILED_BATCH,
    MAX_COMPILED_BATCH_PACKED,
    CpuDecodeStep,
    why_no_decode_step,
)
from pllm.runtime.backends.cpu.cpu_kernels import CpuDecodeAttention, CpuQuantLinear, CpuRmsNorm, CpuRopeKvWrite
from pllm.runtime.backends.cpu.cpu_ops import TorchOps

from .conftest import make_paged_kv, tiny_spec

SETTINGS = settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK_SIZE = 16
MAX_POSITIONS = 256
U32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # of bfloat16

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def build_ops(tmp_path_factory: pytest.TempPathFactory):
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
    "mha-odd-rows-3": dict(num_layers=3, hidden_size=96, intermediate_size=200, num_attention_heads=3,
                           num_key_value_heads=3, head_dim=32),
    # qwen3: q/k norm, and heads wider than hidden / heads (q_size 256 against hidden 128)
    "qwen3-qk-norm-2": dict(num_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, qk_norm=True),
}


def spec_of(shape: str):
    return layered_spec(**SPECS[shape])


@SETTINGS
@given(shape=st.sampled_from(sorted(SPECS)), dtype=st.sampled_from(["float32", "bfloat16"]),
       context_lens=st.lists(st.integers(0, 70), min_size=1, max_size=MAX_BATCH), seed=st.integers(0, 2**16))
@example(shape="smollm2-like-1", dtype="bfloat16", context_lens=[15], seed=0)  # one layer, batch 1
@example(shape="smollm2-like-1", dtype="float32", context_lens=[0, 16, 31, 47], seed=1)  # batch 4
@example(shape="qwen2-bias-3", dtype="bfloat16", context_lens=list(range(0, 80, 5)), seed=2)  # a stack, batch 16
@example(shape="mha-odd-rows-3", dtype="float32", context_lens=[70, 1, 9], seed=3)
@example(shape="qwen3-qk-norm-2", dtype="bfloat16", context_lens=[0, 33], seed=4)
@example(shape="qwen3-qk-norm-2", dtype="float32", context_lens=[12], seed=5)
def test_step_equals_the_per_op_path(build_ops, shape, dtype, context_lens, seed):
    spec = spec_of(shape)
    (fused, fused_caches), (ref, ref_caches) = run_both(build_ops, spec, dtype, context_lens, seed)
    assert torch.isfinite(fused).all()
    err = (fused - ref).abs() / rows_scale(ref)
    assert err.max() <= bound(spec, dtype), (err.max().item(), bound(spec, dtype))
    for (fk, fv), (rk, rv) in zip(fused_caches, ref_caches, strict=True):  # the new K/V rows, and nothing else
        for f, r in ((fk, rk), (fv, rv)):
            same = (f == r) | (f.isnan() & r.isnan())
            assert same.flatten(1).all(dim=1).sum() >= same.shape[0] - len(context_lens)  # only touched blocks
            diff = (f.float() - r.float()).nan_to_num(0.0).abs()
            assert diff.max() <= bound(spec, dtype) * max(1.0, r.float().nan_to_num(0.0).abs().max().item())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_is_deterministic(build_ops, dtype):
    """Rows split statically over threads, each attention item summed by one thread: rerun, bit for bit the same."""
    spec = spec_of("qwen2-bias-3")
    (a, _), _ = run_both(build_ops, spec, dtype, [5, 9, 33], seed=7)
    (b, _), _ = run_both(build_ops, spec, dtype, [5, 9, 33], seed=7)
    assert torch.equal(a, b)


@SETTINGS
@given(dtype=st.sampled_from(["float32", "bfloat16"]), out_features=st.sampled_from([1, 13, 64, 37]),
       in_features=st.sampled_from([8, 64, 72, 584]), batch=st.integers(1, MAX_BATCH), seed=st.integers(0, 2**16))
def test_gemv_error_bound(build_ops, dtype, out_features, in_features, batch, seed):
    """Each output within gamma_n * sum |w_i x_i| of the exact (fp64) dot product, n = in_features: the worst case
    of an fp32 sum of exact products in any order (bf16 x bf16 products are exact in fp32)."""
    spec = spec_of("mha-odd-rows-3")
    step = build_ops(spec, dtype)[1].decode_step
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((out_features, in_features), generator=gen).to(tdtype)
    x = torch.randn((batch, in_features), generator=gen).to(tdtype)
    y = step.gemv(w, x)
    exact = x.double() @ w.double().T
    gamma = in_features * U32 / (1 - in_features * U32)
    assert ((y.double() - exact).abs() <= gamma * (x.double().abs() @ w.double().abs().T)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemv_stream_runs_the_same_gemv_over_each_matrix(build_ops, dtype):
    """The benchmarks' many-matrix call (one parallel region) gives each matrix's product bit for bit as the GEMV."""
    spec = spec_of("mha-odd-rows-3")
    step = build_ops(spec, dtype)[1].decode_step
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn((37, 584), generator=gen).to(tdtype) for _ in range(3)]
    x = torch.randn((MAX_BATCH, 584), generator=gen).to(tdtype)
    for i in range(len(weights)):
        assert torch.equal(step.gemv_stream(weights[: i + 1], x)(), step.gemv(weights[i], x))
    with pytest.raises(ValueError, match="batch"):
        step.gemv_stream(weights, torch.zeros((MAX_BATCH + 1, 584), dtype=tdtype))()


def test_ops_linear_of_a_few_bf16_rows_is_the_gemv_rounded_once(build_ops):
    """TorchOps.linear hands up to GEMV_LINEAR_MAX_ROWS rows of bf16 without a bias (a decode step's LM head) to the
    step's GEMV, its fp32 sums rounded once to bf16 as F.linear's are; more rows, a bias or fp32 keep F.linear's path,
    bit for bit."""
    spec = spec_of("mha-odd-rows-3")
    gen = torch.Generator().manual_seed(11)
    w, b = torch.randn((37, 584), generator=gen), torch.randn(37, generator=gen)
    ops = build_ops(spec, "bfloat16")[1]
    wb = w.to(torch.bfloat16)
    for rows in range(1, GEMV_LINEAR_MAX_ROWS + 1):
        x = torch.randn((1, rows, 584), generator=gen).to(torch.bfloat16)
        assert torch.equal(ops.linear(x, wb), ops.decode_step.gemv(wb, x[0]).to(torch.bfloat16)[None])
        assert torch.equal(ops.linear(x, wb, b.to(torch.bfloat16)), F.linear(x, wb, b.to(torch.bfloat16)))
    x = torch.randn((GEMV_LINEAR_MAX_ROWS + 1, 584), generator=gen).to(torch.bfloat16)
    assert torch.equal(ops.linear(x, wb), F.linear(x, wb))
    ops = build_ops(spec, "float32")[1]
    x = torch.randn((1, 584), generator=gen)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def test_gemv_refuses_a_batch_past_its_tiles(build_ops):
    spec = spec_of("mha-odd-rows-3")
    step = build_ops(spec, "float32")[1].decode_step
    with pytest.raises(ValueError, match="batch"):
        step.gemv(torch.zeros((4, 8)), torch.zeros((MAX_BATCH + 1, 8)))


def test_large_batches_and_prompts_run_per_op(build_ops):
    spec = spec_of("mha-odd-rows-3")
    compiled = build_ops(spec, "float32")[1]
    model = LlamaModel(spec, random_weights(spec, torch.float32, torch.Generator().manual_seed(0)), compiled,
                       MAX_POSITIONS)
    limit = MAX_COMPILED_BATCH[torch.float32]
    meta, _ = decode_step(spec, torch.float32, [3] * (limit + 1), torch.Generator().manual_seed(1))
    assert not model.decode_stack.accepts([meta])
    meta, _ = decode_step(spec, torch.float32, [3] * limit, torch.Generator().manual_seed(1))
    assert model.decode_stack.accepts([meta])


def test_packed_weights_run_per_op_on_a_float_build(build_ops, caplog):
    spec = spec_of("mha-odd-rows-3")
    compiled = build_ops(spec, "float32")[1]
    weights = random_weights(spec, torch.float32, torch.Generator().manual_seed(0))
    rows, cols = weights["layers.0.qkv_proj"].shape
    weights["layers.0.qkv_proj"] = QuantizedWeight(torch.zeros((rows, cols), dtype=torch.int8),
                                                   torch.ones((rows, 1)), None, QuantFormat(QuantScheme.INT8, cols))
    with caplog.at_level("INFO", logger="pllm"):
        model = LlamaModel(spec, weights, compiled, MAX_POSITIONS)
    assert model.decode_stack is None
    assert "layer 0 qkv: packed, and the build's decode step was rendered for float weights only" in caplog.text


@pytest.mark.parametrize("quirk, reason", [
    (dict(sliding_window=8, sliding_layers=(0,)), "sliding-window"),
    (dict(norm_weight_offset=1.0), "gemma"),
    (dict(qk_norm=True, norm_weight_offset=1.0), "gemma"),  # gemma3's q/k norm (offset weights) stays per-op
])
def test_models_off_the_llama_wiring_are_not_compiled(quirk, reason):
    spec = tiny_spec(**quirk)
    assert not step_supported(spec, "float32")
    assert reason in why_no_decode_step(spec, "float32")
    assert step_supported(tiny_spec(), "float32") and step_supported(tiny_spec(qk_norm=True), "float32")


def test_the_plan_renders_the_step_for_the_builds_weights():
    """A build with packed weights gets the step that reads them; a float build's step carries no packed code."""
    spec = spec_of("qwen2-bias-3")
    packed = make_plan(spec, "bfloat16", BLOCK_SIZE, QuantFormat(QuantScheme.INT4, 32)).kernel("cpu_decode_step")
    plain = make_plan(spec, "bfloat16", BLOCK_SIZE).kernel("cpu_decode_step")
    assert packed.options["packed"] and not plain.options["packed"]
    assert packed.constants["QUANT_LANES"] == 16 and packed.constants["LANES"] == 8


# ---- packed weights (builds made with --quantization) ----

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# How a test build keeps each linear: pllm's int8 (one scale per row), GGUF's Q8_0 (int8, groups of 32), int4 with
# groups of 32 (pllm's default, Q4_0/Q4_K's layout) or 64, or a GGUF-like mix of these and float per linear
FORMATS = {"int8": None, "q8_0": QuantFormat(QuantScheme.INT8, 32), "int4-32": QuantFormat(QuantScheme.INT4, 32),
           "int4-64": QuantFormat(QuantScheme.INT4, 64)}
BUILDS = (*FORMATS, "mixed")
# Shapes whose every linear input width is a whole number of 64-weight groups (so each format applies), but for
# "odd-rows-3" (int8, q8_0, int4-32 and mixed builds): inputs of whole 32-element activation blocks only (the packed
# rows' unit), and output rows that share out unevenly over the threads (320, 160, 448 in PACKED_ROWS items)
QUANT_SPECS = {
    "smollm2-like-1": SPECS["smollm2-like-1"],
    "qwen2-bias-3": dict(num_layers=3, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, attention_bias=True),
    "odd-rows-3": dict(num_layers=3, hidden_size=160, intermediate_size=224, num_attention_heads=10,
                       num_key_value_heads=5, head_dim=16),
}


def pack_as(fmt_name: str, w: torch.Tensor) -> QuantizedWeight | torch.Tensor:
    """One linear's weight as a build of that format keeps it (float when the format's groups do not fit)."""
    if fmt_name == "float":
        return w
    fmt = FORMATS[fmt_name]
    if fmt is None:
        return quantize_int8(w)
    if w.shape[1] % fmt.group_size:
        return w
    if fmt.scheme is QuantScheme.INT4:
        return quantize_int4(w, fmt.group_size)
    groups = w.float().view(w.shape[0], -1, fmt.group_size)  # Q8_0: int8 groups with a scale each
    scale = groups.abs().amax(dim=-1) / 127
    codes = torch.round(groups / scale.clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(codes.view(w.shape), scale.contiguous(), None, fmt)


def packer(build: str) -> Callable:
    """(weights, generator) -> the weights with every layer's linears kept as the build keeps them."""
    def pack(weights: dict, gen: torch.Generator) -> dict:
        out = dict(weights)
        for name, w in weights.items():
            if name.split(".")[-1] in LINEARS:
                choice = build
                if build == "mixed":
                    options = ("float", *FORMATS)
                    choice = options[int(torch.randint(len(options), (1,), generator=gen))]
                out[name] = pack_as(choice, w)
        return out
    return pack


def fits(spec, build: str) -> bool:
    """Whether every linear of the spec takes the build's format whole (else it would silently be a mixed build)."""
    fmt = FORMATS.get(build)
    widths = (spec.hidden_size, spec.q_size, spec.intermediate_size)
    return all(k % ACTIVATION_BLOCK == 0 for k in widths) and (fmt is None or all(k % fmt.group_size == 0
                                                                                  for k in widths))


# Bounds with packed weights. Each packed linear runs the per-op path's own code (cpu_quant_linear's quant_prepare
# and row code, its multiply-adds fused as in its library) and the same epilogue (bias added to the fp32 sum, one
# rounding), so on equal inputs it gives equal outputs, bit for bit. What differs is outside the linears: silu's exp
# (libm's expf against PyTorch's vectorised exp) and, in float32, the norms' sum of squares (lane order against
# PyTorch's), a few ulps each, say at most 8 u relative per element. A GEMV turns a relative change d of its inputs
# into at most d * sum|w_i x_i| <= d * |x|_2 <= d * sqrt(n) * max|x| (rows of norm ~1, Cauchy-Schwarz): per layer
# 8 sqrt(n) u of the row's scale, n the widest input, against the float step's 8 n u. In bfloat16 such a change
# flips a rounding to bf16 now and then, and a flipped element feeds every later op as in the float step's case:
# the same 6 bf16 ulps per layer (most steps come out bit for bit equal). Only bfloat16 is compared here: the packed
# rows round their input to int8 per 32-element block (models.quant.quantize_activation), and in float32 the
# norms' few-ulp differences land an element on the other side of a rounding boundary now and then, a whole
# quantisation step that no ulp bound covers; in bfloat16 the norms are the same code and the step's inputs to every
# packed linear are bit for bit the per-op path's. Float32 packed steps are proven by their greedy tokens
# (tests/models/test_quant_decode_step.py).
def packed_bound(spec, dtype: str) -> float:
    layers = spec.num_hidden_layers + 1
    if dtype == "bfloat16":
        return 6 * U_BF16 * layers
    widest = max(spec.hidden_size, spec.q_size, spec.intermediate_size)
    return 8 * math.sqrt(widest) * U32 * layers


@SETTINGS
@given(shape=st.sampled_from(sorted(QUANT_SPECS)), dtype=st.just("bfloat16"), build=st.sampled_from(BUILDS),
       context_lens=st.lists(st.integers(0, 70), min_size=1, max_size=MAX_COMPILED_BATCH_PACKED),
       seed=st.integers(0, 2**16))
@example(shape="smollm2-like-1", dtype="bfloat16", build="int8", context_lens=[15], seed=0)  # batch 1
@example(shape="smollm2-like-1", dtype="bfloat16", build="int4-64", context_lens=[0, 16, 31, 47], seed=1)
@example(shape="qwen2-bias-3", dtype="bfloat16", build="int4-32", context_lens=list(range(0, 80, 5)), seed=2)
@example(shape="qwen2-bias-3", dtype="bfloat16", build="mixed", context_lens=[70, 1, 9], seed=3)
@example(shape="odd-rows-3", dtype="bfloat16", build="mixed", context_lens=[3, 40], seed=4)
@example(shape="odd-rows-3", dtype="bfloat16", build="int8", context_lens=[5] * MAX_COMPILED_BATCH_PACKED, seed=5)
def test_step_with_packed_weights_equals_the_per_op_packed_path(build_ops, shape, dtype, build, context_lens, seed):
    spec = layered_spec(**QUANT_SPECS[shape])
    assume(fits(spec, build))
    (fused, fused_caches), (ref, ref_caches) = run_both(build_ops, spec, dtype, context_lens, seed, packer(build))
    assert torch.isfinite(fused).all()
    err = (fused - ref).abs() / rows_scale(ref)
    assert err.max() <= packed_bound(spec, dtype), (err.max().item(), packed_bound(spec, dtype))


def test_packed_builds_run_up_to_their_own_batch_limit(build_ops, caplog):
    spec = layered_spec(**QUANT_SPECS["qwen2-bias-3"])
    compiled = build_ops(spec, "bfloat16", packed=True)[1]
    weights = packer("int4-32")(random_weights(spec, torch.bfloat16, torch.Generator().manual_seed(0)), None)
    with caplog.at_level("INFO", logger="pllm"):
        model = LlamaModel(spec, weights, compiled, MAX_POSITIONS)
    assert model.decode_stack.max_batch == MAX_COMPILED_BATCH_PACKED
    assert "reading packed weights (linears: 12 int4 group 32)" in caplog.text
    metas = {n: decode_step(spec, torch.bfloat16, [3] * n, torch.Generator().manual_seed(1))[0]
             for n in (MAX_COMPILED_BATCH_PACKED, MAX_COMPILED_BATCH_PACKED + 1)}
    assert model.decode_stack.accepts([metas[MAX_COMPILED_BATCH_PACKED]])
    assert not model.decode_stack.accepts([metas[MAX_COMPILED_BATCH_PACKED + 1]])


@pytest.mark.parametrize("group, why", [
    (8, "int8 groups of 8, the kernel reads groups of whole 16-weight vectors"),  # part of a vector of codes
    # whole vectors of codes, half the activation block the packed rows quantise: not read past the block
    (16, "int8 groups of 16, the packed rows read groups of whole 32-element activation"),
])
def test_packed_weights_the_step_cannot_read_run_per_op(build_ops, caplog, group, why):
    """Groups the step cannot read: the model decodes op by op, and says why."""
    spec = layered_spec(**QUANT_SPECS["qwen2-bias-3"])
    compiled = build_ops(spec, "float32", packed=True)[1]
    weights = packer("int8")(random_weights(spec, torch.float32, torch.Generator().manual_seed(0)), None)
    w = weights["layers.1.down_proj"]
    weights["layers.1.down_proj"] = QuantizedWeight(w.codes, w.scales.repeat(1, w.shape[1] // group),
                                                    None, QuantFormat(QuantScheme.INT8, group))
    with caplog.at_level("INFO", logger="pllm"):
        model = LlamaModel(spec, weights, compiled, MAX_POSITIONS)
    assert model.decode_stack is None
    assert f"layer 1 down: {why}" in caplog.text
