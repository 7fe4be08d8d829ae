"""cpu_decode_step (the llama wiring's whole decode step, compiled) against the per-op path it stands in for; the
builds that keep packed weights: test_cpu_decode_step_packed.py."""

from __future__ import annotations

import ctypes
import dataclasses
import platform

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from pllm.compiler.cpu_compile import compile_cpu_kernels, find_compiler
from pllm.compiler.dtype_choice import host_cpu_flags
from pllm.compiler.kernels.cpu_decode_step import AMX_MIN_BATCH, FALLBACK_FLAGS, MAX_BATCH
from pllm.compiler.kernels.cpu_decode_step import COMPILE_FLAGS as STEP_COMPILE_FLAGS
from pllm.compiler.kernels.cpu_decode_step import supported as step_supported
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.llama import LlamaModel
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme
from pllm.runtime.backends.cpu import cpu_decode_step, cpu_linear, onednn
from pllm.runtime.backends.cpu.cpu_decode_step import (
    AMX_ISA,
    COMPILED_BATCH_BEFORE_ONEDNN,
    COMPILED_BATCH_BEFORE_ONEDNN_AMX,
    GEMV_BEFORE_ONEDNN_MAX_ROWS,
    GEMV_BEFORE_ONEDNN_MAX_ROWS_AMX,
    GEMV_LINEAR_MAX_ROWS,
    MAX_COMPILED_BATCH,
    CpuDecodeStep,
    GemvIsa,
    compiled_batch_limit,
    why_no_decode_step,
)

from .conftest import tiny_spec, torch_threads
from .cpu_step_harness import (
    BLOCK_SIZE,
    MAX_POSITIONS,
    SETTINGS,
    SPECS,
    U32,
    bound,
    decode_step,
    make_build_ops,
    random_weights,
    rows_scale,
    run_both,
    spec_of,
)

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH")


@pytest.fixture(scope="module")
def build_ops(tmp_path_factory: pytest.TempPathFactory):
    return make_build_ops(tmp_path_factory)


@SETTINGS
@given(shape=st.sampled_from(sorted(SPECS)), dtype=st.sampled_from(["float32", "bfloat16"]),
       context_lens=st.lists(st.integers(0, 70), min_size=1, max_size=MAX_BATCH), seed=st.integers(0, 2**16))
@example(shape="smollm2-like-1", dtype="bfloat16", context_lens=[15], seed=0)  # one layer, batch 1
@example(shape="smollm2-like-1", dtype="float32", context_lens=[0, 16, 31, 47], seed=1)  # batch 4
@example(shape="qwen2-bias-3", dtype="bfloat16", context_lens=list(range(0, 80, 5)), seed=2)  # a stack, batch 16
@example(shape="qwen2-bias-3", dtype="float32", context_lens=[i % 71 for i in range(0, 7 * MAX_BATCH, 7)], seed=6)
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
    """Rows split statically over threads, each attention item (or part of one) summed by one thread and the parts
    combined in a fixed order: rerun, bit for bit the same."""
    spec = spec_of("qwen2-bias-3")
    (a, _), _ = run_both(build_ops, spec, dtype, [5, 9, 33], seed=7)
    (b, _), _ = run_both(build_ops, spec, dtype, [5, 9, 33], seed=7)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("context_lens", "threads"), [([200], 2), ([180, 150], 4), ([200, 40], 4)])
def test_short_batches_attend_long_contexts_in_parts(build_ops, dtype, context_lens, threads):
    """Fewer (sequence, KV head) items than twice the threads: the step's attention cuts each context of 128 keys or
    more into parts (cpu_decode_attention's parts_per_item: here 2 each; a 41-key context stays whole), attended
    apart and combined. On one thread every context is whole; the GEMVs sum each output on one thread either way,
    so only the attention's fp32 sums differ: the split step is the one-thread step within the step's bound (and the
    per-op path, which splits alike), and reruns bit for bit."""
    spec = spec_of("smollm2-like-1")
    per_op, _ = build_ops(spec, dtype)
    assert per_op.decode_attention.parts(len(context_lens), threads) == 2
    assert per_op.decode_attention.parts(len(context_lens), 1) == 1
    with torch_threads(1):
        (whole, _), _ = run_both(build_ops, spec, dtype, context_lens, seed=8)
    with torch_threads(threads):
        (fused, _), (ref, _) = run_both(build_ops, spec, dtype, context_lens, seed=8)
        (again, _), _ = run_both(build_ops, spec, dtype, context_lens, seed=8)
    for other in (whole, ref):
        err = (fused - other).abs() / rows_scale(other)
        assert err.max() <= bound(spec, dtype), (err.max().item(), bound(spec, dtype))
    assert torch.equal(fused, again)


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


@pytest.mark.parametrize("level", list(GemvIsa), ids=lambda level: level.name.lower())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_gemv_code_sums_a_row_alike_in_every_batch(build_ops, dtype, level):
    """Each GEMV code this CPU runs: within the fp32 bound of the exact product, and each row of x's outputs bit for
    bit the same alone as in a batch of any size up to MAX_BATCH (the batch picks the tiles: rows one after another
    up to 4 sequences, whole tiles past; a sequence's tokens must not depend on what it is batched with). The AMX
    tiles (bf16 on a CPU with AMX-BF16) run from AMX_MIN_BATCH rows of x, the AVX-512 rows below it, so there a row
    sums alike in every batch below AMX_MIN_BATCH, and alike in every batch from it on (as in the whole MAX_BATCH).
    Widths with an odd 8 past the 16- and 32-wide steps (72, 584), SmolLM2's (576: whole AMX steps), one of whole
    steps wide enough that 2 to 4 sequences (and one fp32 sequence) take the tiles too (4128), and a last tile of
    fewer than 4 rows (37: past the AMX tiles' two of 16; 53: one AMX tile of 16 past an item of 32, then 5 rows)."""
    step = build_ops(spec_of("mha-odd-rows-3"), dtype)[1].decode_step
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(level)
    step.limit_isa(level)
    try:
        split = AMX_MIN_BATCH if step.isa == "amx_bf16" else MAX_BATCH + 1  # the first batch the tiles run
        for out_features, in_features in ((37, 72), (53, 576), (37, 584), (37, 4128)):
            w = torch.randn((out_features, in_features), generator=gen).to(tdtype)
            x = torch.randn((MAX_BATCH, in_features), generator=gen).to(tdtype)
            alone = torch.cat([step.gemv(w, x[i : i + 1]) for i in range(MAX_BATCH)])
            whole = step.gemv(w, x)
            for batch in range(2, MAX_BATCH + 1):
                same_as = alone if batch < split else whole
                assert torch.equal(step.gemv(w, x[:batch]), same_as[:batch]), (step.isa, in_features, batch)
            exact = x.double() @ w.double().T
            gamma = in_features * U32 / (1 - in_features * U32)
            bound = gamma * (x.double().abs() @ w.double().abs().T)
            assert ((alone.double() - exact).abs() <= bound).all()
            assert ((whole.double() - exact).abs() <= bound).all()
    finally:
        step.limit_isa(GemvIsa.BEST)


def amx_granted() -> bool:
    """Whether Linux lets this process use AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)."""
    if platform.machine() != "x86_64" or "amx_bf16" not in host_cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_gemv_takes_the_amx_tiles_where_the_cpu_has_them(build_ops, dtype):
    """The best GEMV code of a bf16 step is the AMX tiles exactly where the CPU lists amx_bf16 and Linux grants the
    tile data (and the toolchain knows them: GCC 11 on, an assembler that takes them); an fp32 step is never built
    with them (AMX multiplies bf16 and int8 only), and a step limited to AVX512 does not take them."""
    step = build_ops(spec_of("mha-odd-rows-3"), dtype)[1].decode_step
    if dtype == "float32" or platform.machine() != "x86_64":
        assert not step.amx_compiled
    assert (step.isa == AMX_ISA) == (step.amx_compiled and amx_granted()), step.isa
    assert (step.tiles_k > 0) == (step.isa == AMX_ISA)  # what the routing reads (tiles_for)
    step.limit_isa(GemvIsa.AVX512)
    try:
        assert step.isa != AMX_ISA and step.tiles_k == 0
    finally:
        step.limit_isa(GemvIsa.BEST)


def test_a_toolchain_without_the_amx_tiles_builds_the_step_without_them(tmp_path, monkeypatch):
    """Where the step's first compile fails (an assembler older than the tile instructions: a compiler wrapper here
    that refuses any command without -DHAVE_AMX=0), cpu_compile builds it again with the kernel's fallback flags:
    the build keeps a compiled step, which says the tiles are not compiled in and runs other rows, and the manifest
    entry records the flags it was built with."""
    real = find_compiler()
    fake = tmp_path / "old-toolchain-g++"
    fake.write_text(f"""#!/bin/sh
case " $* " in *" -DHAVE_AMX=0 "*|*" --version "*|*" -dumpversion "*) exec {real} "$@";; esac
echo "Error: no such instruction: tileloadd" >&2
exit 1
""")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    spec = spec_of("mha-odd-rows-3")
    plan = make_plan(spec, "bfloat16", BLOCK_SIZE)
    plan = dataclasses.replace(plan, kernels=(plan.kernel("cpu_decode_step"),))
    out = tmp_path / "kernels"
    render_plan(plan, out)
    entry = compile_cpu_kernels(out, plan)
    assert "error" not in entry, entry["error"]
    assert entry["kernel_flags"]["cpu_decode_step"] == [*STEP_COMPILE_FLAGS, *FALLBACK_FLAGS]
    step = CpuDecodeStep(out / entry["libraries"]["cpu_decode_step"], spec, torch.bfloat16, BLOCK_SIZE)
    assert not step.amx_compiled and step.isa != AMX_ISA
    x, w = torch.randn((5, 96)).bfloat16(), torch.randn((37, 96)).bfloat16()
    assert torch.allclose(step.gemv(w, x), x.float() @ w.float().T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level", list(GemvIsa), ids=lambda level: level.name.lower())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_gemv_code_steps_as_the_per_op_path(build_ops, dtype, level):
    """The whole step over each GEMV inner loop this CPU runs, against the per-op path (a stack, batch 5: the
    sequential rows for 4, then one more)."""
    spec = spec_of("qwen2-bias-3")
    step = build_ops(spec, dtype)[1].decode_step  # the library run_both's compiled ops share
    step.limit_isa(level)
    try:
        (fused, _), (ref, _) = run_both(build_ops, spec, dtype, [0, 7, 16, 33, 70], seed=level)
    finally:
        step.limit_isa(GemvIsa.BEST)
    assert ((fused - ref).abs() / rows_scale(ref)).max() <= bound(spec, dtype)


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


@pytest.mark.parametrize("width", [584, 576])
@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ops_linear_of_a_few_rows_is_the_gemv_rounded_once(build_ops, monkeypatch, dtype, onednn_bf16, width):
    """TorchOps.linear hands 1 to GEMV_LINEAR_MAX_ROWS rows without a bias (a decode step's LM head) to the step's
    GEMV, or to GEMV_BEFORE_ONEDNN_MAX_ROWS for bf16 where oneDNN packs bf16 (either CPU, by the probe), its fp32
    sums rounded once to the dtype as F.linear's are; no rows, more rows, or a bias take the float GEMM, bit for
    bit: F.linear in the dtype, or for bf16 without oneDNN's bf16 GEMM from WIDEN_MIN_ROWS rows in fp32, rounded
    once to bf16."""
    monkeypatch.setattr(onednn, "onednn_packs_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(cpu_linear.CpuLinear, "packed",  # F.linear, on either CPU
                        lambda self, weight: cpu_linear.PackedFloat(weight, None, None))
    spec = spec_of("mha-odd-rows-3")
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn((37, width), generator=gen).to(tdtype)
    b = torch.randn(37, generator=gen).to(tdtype)
    ops = build_ops(spec, dtype)[1]
    amx = ops.decode_step.tiles_for(width)  # up to 32 rows where the GEMV runs AMX tiles (widths of whole steps)
    before_onednn = GEMV_BEFORE_ONEDNN_MAX_ROWS_AMX if amx else GEMV_BEFORE_ONEDNN_MAX_ROWS
    most = before_onednn if dtype == "bfloat16" and onednn_bf16 else GEMV_LINEAR_MAX_ROWS
    widened = dtype == "bfloat16" and not onednn_bf16

    def gemm(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not widened or x.numel() < cpu_linear.WIDEN_MIN_ROWS * w.shape[1]:  # few rows keep bf16 F.linear
            return F.linear(x, w, bias)
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(tdtype)

    for rows in range(1, most + 1):
        x = torch.randn((1, rows, width), generator=gen).to(tdtype)
        assert torch.equal(ops.linear(x, w), ops.decode_step.gemv(w, x[0]).to(tdtype)[None]), rows
        assert torch.equal(ops.linear(x, w, b), gemm(x, b))
    for rows in (0, most + 1, 2 * most + 3):  # no rows (a step that samples none), or past the GEMV's
        x = torch.randn((rows, width), generator=gen).to(tdtype)
        assert torch.equal(ops.linear(x, w), gemm(x)), rows
    seen = []  # the dtype of the GEMM the last rows ran (the two routes may agree bit for bit on these values)
    linear = F.linear
    monkeypatch.setattr(cpu_linear.F, "linear", lambda x, *args: seen.append(x.dtype) or linear(x, *args))
    ops.linear(x, w)
    assert seen == [torch.float32 if widened else tdtype]


def test_a_library_reading_another_weight_table_is_refused(build_ops, monkeypatch):
    """The step reads a table of int64 words per layer that Python builds; a library rendered for another layout of
    it (another pllm version's build) is refused at load, so the loader falls back with its reason, never runs it."""
    step = build_ops(spec_of("mha-odd-rows-3"), "float32")[1].decode_step
    assert type(step)(step.library, step.spec, step.dtype, step.block_size).kernel_max_batch == MAX_BATCH
    words = cpu_decode_step.WEIGHT_WORDS_PER_LAYER
    monkeypatch.setattr(cpu_decode_step, "WEIGHT_WORDS_PER_LAYER", words - 4)
    with pytest.raises(OSError, match=f"reads {words}-word layer tables, this pllm writes {words - 4}"):
        type(step)(step.library, step.spec, step.dtype, step.block_size)


def test_gemv_refuses_a_batch_past_its_tiles(build_ops):
    spec = spec_of("mha-odd-rows-3")
    step = build_ops(spec, "float32")[1].decode_step
    with pytest.raises(ValueError, match="batch"):
        step.gemv(torch.zeros((4, 8)), torch.zeros((MAX_BATCH + 1, 8)))


@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_batches_and_prompts_run_per_op(build_ops, monkeypatch, dtype, onednn_bf16):
    """Steps of up to compiled_batch_limit sequences run compiled, more per-op: the kernel's whole range where the
    per-op GEMM is F.linear, 16 where it is oneDNN's packed bf16 GEMM (either CPU, by the probe; 32 where the step's
    GEMV runs AMX tiles); the library says the limit it was rendered with."""
    monkeypatch.setattr(onednn, "onednn_packs_bf16", lambda: onednn_bf16)
    spec, tdtype = spec_of("mha-odd-rows-3"), getattr(torch, dtype)
    compiled = build_ops(spec, dtype)[1]
    assert compiled.decode_step.kernel_max_batch == MAX_BATCH == MAX_COMPILED_BATCH
    model = LlamaModel(spec, random_weights(spec, tdtype, torch.Generator().manual_seed(0)), compiled,
                       MAX_POSITIONS)
    amx = compiled.decode_step.tiles_for_all()  # 32 where every linear runs AMX tiles
    before_onednn = COMPILED_BATCH_BEFORE_ONEDNN_AMX if amx else COMPILED_BATCH_BEFORE_ONEDNN
    limit = before_onednn if dtype == "bfloat16" and onednn_bf16 else MAX_BATCH
    assert model.decode_stack.max_batch == compiled_batch_limit(tdtype, False, True, amx) == limit
    meta, _ = decode_step(spec, tdtype, [3] * (limit + 1), torch.Generator().manual_seed(1))
    assert not model.decode_stack.accepts([meta])
    meta, _ = decode_step(spec, tdtype, [3] * limit, torch.Generator().manual_seed(1))
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
    (dict(head_dim=24), "a head size that is a multiple of 16 and hidden and intermediate sizes that are multiples "
                        "of 8 (this model: silu, head 24"),
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
