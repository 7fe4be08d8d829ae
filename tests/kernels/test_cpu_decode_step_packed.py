"""cpu_decode_step over builds that keep packed weights (--quantization, GGUF blocks): each packed linear runs the
per-op path's own row code inside the step, so the step equals the per-op packed path within the bounds below."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.quantize import quantize_int4, quantize_int4_sym, quantize_int8
from pllm.models.llama import LlamaModel
from pllm.models.quant import ACTIVATION_BLOCK, QuantFormat, QuantizedWeight, QuantScheme
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.cpu_decode_step import (
    COMPILED_BATCH_BEFORE_ONEDNN,
    COMPILED_BATCH_BEFORE_ONEDNN_AMX,
    MAX_COMPILED_BATCH_PACKED,
)

from .cpu_step_harness import (
    MAX_POSITIONS,
    SETTINGS,
    SPECS,
    U32,
    U_BF16,
    decode_step,
    layered_spec,
    make_build_ops,
    random_weights,
    rows_scale,
    run_both,
)

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def build_ops(tmp_path_factory: pytest.TempPathFactory):
    return make_build_ops(tmp_path_factory)


LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# How a test build keeps each linear: pllm's int8 (one scale per row, fp32), GGUF's Q8_0 (int8, groups of 32, fp16
# scales), int4 with groups of 32 (pllm's default, Q4_0/Q4_1's layout: fp16 scales and mins) or 64, int4 groups of
# 32 with fp32 scales and mins (Q4_K's products), symmetric int4 groups of 32 with fp16 scales and no mins (Q4_0), or
# a GGUF-like mix of these and float per linear
FORMATS = {"int8": None, "q8_0": QuantFormat(QuantScheme.INT8, 32), "int4-32": QuantFormat(QuantScheme.INT4, 32),
           "int4-64": QuantFormat(QuantScheme.INT4, 64), "q4_k": QuantFormat(QuantScheme.INT4, 32),
           "q4_0": QuantFormat(QuantScheme.INT4_SYM, 32)}
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
        q = quantize_int4(w, fmt.group_size)
        assert q.scales.dtype == torch.float16
        if fmt_name == "q4_k":
            return QuantizedWeight(q.codes, q.scales.float() * 1.0001, q.mins.float(), fmt)  # no fp16 values
        return q
    if fmt.scheme is QuantScheme.INT4_SYM:
        q = quantize_int4_sym(w, fmt.group_size)
        assert q.scales.dtype == torch.float16 and q.mins is None
        return q
    groups = w.float().view(w.shape[0], -1, fmt.group_size)  # Q8_0: int8 groups with an fp16 scale each
    scale = (groups.abs().amax(dim=-1) / 127).half()
    codes = torch.round(groups / scale.float().clamp_min(1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
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
@example(shape="smollm2-like-1", dtype="bfloat16", build="q4_k", context_lens=[7, 20], seed=6)
@example(shape="odd-rows-3", dtype="bfloat16", build="q8_0", context_lens=[2, 9, 30], seed=7)
@example(shape="smollm2-like-1", dtype="bfloat16", build="q4_0", context_lens=[11], seed=8)
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


@pytest.mark.parametrize("build", ["int8", "int4-32", "q4_0"])
def test_the_step_reads_the_panels_the_per_op_gemv_reads(build_ops, build):
    """Where the packed GEMV repacks a weight into panels (AVX512-VNNI), the compiled step reads those same panels,
    not the rows (the two orders of a row's sums differ; the step must sum as the per-op path does): zeroing one
    weight's rows leaves the step's output as it was, bit for bit; zeroing its panels changes it."""
    spec = layered_spec(**QUANT_SPECS["qwen2-bias-3"])
    compiled = build_ops(spec, "bfloat16", packed=True)[1]
    gen = torch.Generator().manual_seed(11)
    weights = packer(build)(random_weights(spec, torch.bfloat16, gen), gen)
    model = LlamaModel(spec, weights, compiled, MAX_POSITIONS)
    weight = weights["layers.1.down_proj"]
    panels = compiled.quant_kernel.panels(weight)
    if panels is None:
        pytest.skip("the packed GEMV reads rows on this CPU (no AVX512-VNNI): no panels to read")
    meta, caches = decode_step(spec, torch.bfloat16, [4, 17], gen)
    ids = torch.randint(0, spec.vocab_size, (2,), generator=gen)
    assert model.decode_stack.accepts([meta] * spec.num_hidden_layers)

    def step() -> torch.Tensor:
        return model.forward(ids, [meta] * spec.num_hidden_layers, [(k.clone(), v.clone()) for k, v in caches])

    before = step()
    weight.codes.zero_()
    assert torch.equal(step(), before)
    panels.zero_()
    assert not torch.equal(step(), before)


@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
@pytest.mark.parametrize("one_float", [False, True], ids=["all-packed", "one-float"])
def test_packed_builds_run_up_to_their_own_batch_limit(build_ops, caplog, monkeypatch, one_float, onednn_bf16):
    """A stack of packed linears runs compiled up to MAX_COMPILED_BATCH_PACKED sequences on either CPU (by the
    probe); with a float linear among them (a GGUF build's mix), up to 16 (32 where the step's GEMV runs AMX tiles)
    where oneDNN's bf16 GEMM would take that one per-op."""
    monkeypatch.setattr(onednn, "onednn_packs_bf16", lambda: onednn_bf16)
    spec = layered_spec(**QUANT_SPECS["qwen2-bias-3"])
    compiled = build_ops(spec, "bfloat16", packed=True)[1]
    floats = random_weights(spec, torch.bfloat16, torch.Generator().manual_seed(0))
    weights = packer("int4-32")(dict(floats), None)
    if one_float:
        weights["layers.1.o_proj"] = floats["layers.1.o_proj"]
    with caplog.at_level("INFO", logger="pllm"):
        model = LlamaModel(spec, weights, compiled, MAX_POSITIONS)
    amx = compiled.decode_step.tiles_for_all()  # 32 where every linear runs AMX tiles
    before_onednn = COMPILED_BATCH_BEFORE_ONEDNN_AMX if amx else COMPILED_BATCH_BEFORE_ONEDNN
    limit = before_onednn if one_float and onednn_bf16 else MAX_COMPILED_BATCH_PACKED
    assert model.decode_stack.max_batch == limit
    # where the packed GEMV repacks INT4 rows into panels (AVX512-VNNI), the step reads those panels too
    panels = " in panels" if compiled.quant_kernel.panels(weights["layers.0.o_proj"]) is not None else ""
    # and where oneDNN packs bf16 in panels it reads (cpu_decode_step_panels.cpp.inc), the float one in those
    held = " in oneDNN's panels" if one_float and compiled.linears.panels(weights["layers.1.o_proj"]) else ""
    kept = f"1 bfloat16{held}, 11 int4 group 32{panels}" if one_float else f"12 int4 group 32{panels}"
    assert f"reading packed weights (linears: {kept})" in caplog.text
    metas = {n: decode_step(spec, torch.bfloat16, [3] * n, torch.Generator().manual_seed(1))[0]
             for n in (limit, limit + 1)}
    assert model.decode_stack.accepts([metas[limit]])
    assert not model.decode_stack.accepts([metas[limit + 1]])


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
