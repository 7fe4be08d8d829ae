"""Hostile edge shapes for the Triton kernels (interpreted) vs torch references, and the compiler's refusals.

Shapes the other kernel tests leave out: head_dim 32, 72 and 112 (72 and 112 pad to 128), MQA with 16 query heads
(decode's GROUP_PAD 16, prefill's BLOCK_Q 4), KV blocks of 8 and 128 tokens (128: decode's TILE_N grows to the
block), context lengths one short of, on, and one past a block, and windows shorter than, equal to and longer than
the context. Tolerances are the attention tests' own (test_decode_attention.py, test_prefill_attention.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pllm.compiler.gpu_compile import compile_kernels, triton_can_target_cuda
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.models.quant import QuantFormat, QuantScheme
from pllm.models.rotary import rope_cos_sin
from pllm.models.spec import ModelKind, MoeSpec, RopeScaling

from .conftest import tiny_spec
from .test_decode_attention import TOLERANCES, check_decode
from .test_encoder_attention import check as check_encoder
from .test_layer_norm import check_layer_norm
from .test_lora import check_lora
from .test_mlp import check_mlp
from .test_moe import TOLERANCES as MOE_TOLERANCES
from .test_moe import check_moe, random_moe_inputs, reference_moe
from .test_prefill_attention import check_prefill, make_metadata
from .test_qk_norm import check_qk_norm
from .test_quant_matmul import SCHEMES, check_linear
from .test_rms_norm import TOLERANCES as NORM_TOLERANCES
from .test_rms_norm import reference_rms_norm
from .test_rope_kv_write import TOLERANCES as ROPE_TOLERANCES
from .test_rope_kv_write import reference_rotate

CAN_TARGET_CUDA, WHY_NOT = triton_can_target_cuda()
needs_cuda_target = pytest.mark.skipif(not CAN_TARGET_CUDA, reason=f"local triton cannot target CUDA: {WHY_NOT}")


@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "group_size", "block_size", "seq_lens", "num_splits"),
    [
        (32, 2, 1, 8, [7, 8, 9, 1], None),  # block 8: one short of, on, one past a block; 1 token
        (72, 1, 16, 128, [127, 128, 129], 2),  # MQA of 16 heads; block 128 makes TILE_N 128; 129 spans 2 tiles
        (112, 2, 4, 64, [63, 64, 65], None),  # head_dim 112 pads to 128; block 64
        (72, 1, 8, 16, [200, 1], 16),  # GQA 8: more splits than some sequence has tiles
    ],
)
def test_decode_attention_edges(kernel_ops, paged_kv, attention_reference, head_dim, num_kv_heads, group_size,
                                block_size, seq_lens, num_splits):
    check_decode(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                 head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                 seq_lens=seq_lens, num_splits=num_splits, seed=11)


@pytest.mark.parametrize(
    ("head_dim", "num_kv_heads", "group_size", "block_size", "segs"),
    [
        (32, 2, 1, 8, [(7, 2), (8, 1), (0, 9)]),  # block 8 boundaries; a chunk starting mid-sequence
        (72, 1, 16, 128, [(127, 3), (0, 5), (128, 1)]),  # MQA 16 (BLOCK_Q 4, several q blocks); block 128
        (112, 2, 4, 64, [(63, 17), (64, 1), (1, 64)]),  # chunk straddling a block; BLOCK_Q 16 over 64 rows
        (72, 3, 2, 16, [(15, 1), (16, 17), (17, 15)]),  # 3 KV heads; mixed decode and chunks near a boundary
    ],
)
def test_prefill_attention_edges(kernel_ops, paged_kv, attention_reference, head_dim, num_kv_heads, group_size,
                                 block_size, segs):
    check_prefill(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                  head_dim=head_dim, num_kv_heads=num_kv_heads, group_size=group_size, block_size=block_size,
                  segs=segs, seed=12)


# softcap: test_attention_window.py's tolerance for the capped scores (tanh from exp: 5e-5 absolute)
SOFTCAP_TOLERANCE = {"atol": 5e-5, "rtol": 1e-5}


@pytest.mark.parametrize(
    ("head_dim", "group_size", "block_size", "window", "segs", "softcap"),
    [
        (72, 1, 8, 5, [(20, 3), (0, 12), (30, 1)], None),  # window shorter than every context
        (32, 4, 16, 16, [(0, 16), (15, 1), (16, 1)], None),  # window equal to the context of each
        (112, 2, 128, 300, [(100, 20), (0, 7), (129, 1)], None),  # window longer than every context
        (32, 16, 8, 9, [(8, 1), (9, 1), (10, 1), (3, 20)], None),  # MQA 16, block 8: window one past a block
        (72, 8, 128, 130, [(127, 2), (200, 1), (0, 129)], 5.0),  # soft-capped, GQA 8, window past one block of 128
    ],
)
def test_windowed_attention_edges(kernel_ops, paged_kv, attention_reference, head_dim, group_size, block_size,
                                  window, segs, softcap):
    """Both windowed kernels (prefill for the whole batch, decode for its single-token rows) against the fp64 mask."""
    num_kv_heads = 1
    num_heads = num_kv_heads * group_size
    ops = kernel_ops(interpret=True, dtype="float32", block_size=block_size, head_dim=head_dim,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, sliding_window=window,
                     sliding_layers=(0,), attn_logit_softcapping=softcap)
    tolerance = TOLERANCES["float32"] if softcap is None else SOFTCAP_TOLERANCE
    gen = torch.Generator().manual_seed(13)
    kv = paged_kv([c + q for c, q in segs], num_kv_heads, head_dim, block_size, torch.float32, "cpu", gen)
    meta = make_metadata(segs, kv.slot_ids, kv.block_tables, "cpu")
    q = torch.randn((sum(q for _, q in segs), num_heads, head_dim), generator=gen) * (1 if softcap is None else 4)
    scale = head_dim**-0.5
    out = ops.kernels["prefill_attention"].prefill_attention(
        q, kv.k_cache, kv.v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, meta.max_query_len,
        True)
    start = 0
    for i, (_, query_len) in enumerate(segs):
        expected = attention_reference(q[start : start + query_len], kv.keys[i], kv.values[i], scale, window,
                                       softcap)
        torch.testing.assert_close(out[start : start + query_len].double(), expected, **tolerance)
        start += query_len
    decode_rows = [i for i, (_, query_len) in enumerate(segs) if query_len == 1]
    starts = meta.query_start_loc.tolist()
    rows = torch.tensor([starts[i] for i in decode_rows])
    out = ops.kernels["decode_attention"].decode_attention(
        q[rows], kv.k_cache, kv.v_cache, meta.seq_lens[decode_rows].contiguous(), kv.block_tables[decode_rows],
        scale, int(meta.seq_lens.max()), None, True)
    for j, i in enumerate(decode_rows):
        expected = attention_reference(q[rows[j] : rows[j] + 1], kv.keys[i], kv.values[i], scale, window, softcap)
        torch.testing.assert_close(out[j : j + 1].double(), expected, **tolerance)


# rope_kv_write: head_dims 32, 72 and 112 with partial rotary whose half is odd (72 * 0.25 = 18: a half of 9; 112 *
# 0.4 = 44: 22) and scaled tables (linear and llama3, built by models/rotary.py as the model builds them); blocks of 8
# and 128. Tolerances: test_rope_kv_write.py's (fp32 1e-6; fp16 one rounding).
@pytest.mark.parametrize(
    ("dtype", "head_dim", "partial_rotary_factor", "num_kv_heads", "group_size", "block_size", "rope_scaling"),
    [
        ("float32", 72, 0.25, 1, 16, 8, "linear"),
        ("float16", 112, 0.4, 2, 4, 128, "llama3"),
        ("float32", 32, 1.0, 3, 2, 8, None),
        ("float32", 72, 1.0, 1, 8, 64, "llama3"),
    ],
)
def test_rope_kv_write_edges(kernel_ops, dtype, head_dim, partial_rotary_factor, num_kv_heads, group_size,
                             block_size, rope_scaling):
    scaling = None
    if rope_scaling == "linear":
        scaling = RopeScaling(rope_type="linear", factor=4.0)
    elif rope_scaling == "llama3":
        scaling = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64)
    num_heads = num_kv_heads * group_size
    spec = tiny_spec(head_dim=head_dim, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                     partial_rotary_factor=partial_rotary_factor)
    spec = dataclasses.replace(spec, rope_scaling=scaling)
    cos_sin = rope_cos_sin(spec, 300)  # [300, rotary_dim]
    ops = kernel_ops(interpret=True, dtype=dtype, block_size=block_size, head_dim=head_dim,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                     partial_rotary_factor=partial_rotary_factor)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(21)
    num_tokens = block_size + 1  # one past a block
    q = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(torch_dtype)
    k = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(torch_dtype)
    v = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(torch_dtype)
    positions = torch.randint(0, 300, (num_tokens,), generator=gen)
    positions[0], positions[-1] = 0, 299
    num_blocks = num_tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, -7.0, dtype=torch_dtype)
    v_cache = torch.full(cache_shape, -7.0, dtype=torch_dtype)
    q_rot, k_rot = ops.rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q_rot.float(), reference_rotate(q, cos_sin[positions]), **ROPE_TOLERANCES[dtype])
    torch.testing.assert_close(k_rot.float(), reference_rotate(k, cos_sin[positions]), **ROPE_TOLERANCES[dtype])
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots], k_rot) and torch.equal(flat_v[slots], v)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert bool((flat_k[untouched] == -7).all()) and bool((flat_v[untouched] == -7).all())


# rms_norm over widths of 1, 3 and 4097 (BLOCK_H 8192, 16 warps) with eps far from the default; a zero row makes the
# norm 1 / sqrt(eps). Tolerances: test_rms_norm.py's.
@pytest.mark.parametrize(("dtype", "hidden_size", "eps"), [("float32", 1, 1e-2), ("float32", 3, 1e-12),
                                                           ("float16", 4097, 1e-6), ("float32", 4097, 0.5)])
def test_rms_norm_edges(kernel_ops, dtype, hidden_size, eps):
    ops = kernel_ops(interpret=True, dtype=dtype, hidden_size=hidden_size, rms_norm_eps=eps)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(22)
    x = (torch.randn((3, hidden_size), generator=gen) * 3).to(torch_dtype)
    x[1] = 0
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=gen)).to(torch_dtype)
    residual = torch.randn((3, hidden_size), generator=gen).to(torch_dtype)
    residual[1] = 0
    for res in (None, residual):
        out, new_residual = ops.rms_norm(x.clone(), weight, eps, None if res is None else res.clone())
        expected, expected_residual = reference_rms_norm(x, weight, eps, res)
        torch.testing.assert_close(out, expected, **NORM_TOLERANCES[dtype])
        torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)


# qk_norm: head_dims 72 and 112 (masked), 32, MQA with 16 and 12 query heads (NUM_HEADS_PAD 16), both offsets.
@pytest.mark.parametrize(("dtype", "num_heads", "group", "head_dim", "offset"),
                         [("float32", 16, 16, 72, 0.0), ("float16", 12, 4, 112, 1.0), ("float32", 3, 1, 32, 1.0),
                          ("float32", 4, 2, 8, 0.0)])  # head_dim 8: a tile padded (masked) to 16
def test_qk_norm_edges(kernel_ops, dtype, num_heads, group, head_dim, offset):
    check_qk_norm(kernel_ops, interpret=True, device="cpu", dtype=dtype, num_tokens=3, num_heads=num_heads,
                  group=group, head_dim=head_dim, offset=offset, seed=23)


# layer_norm (encoders): widths 1, 3, 4097
@pytest.mark.parametrize(("dtype", "hidden_size"), [("float32", 1), ("float32", 3), ("float16", 4097)])
def test_layer_norm_edges(encoder_kernel_ops, dtype, hidden_size):
    for with_residual in (False, True):
        check_layer_norm(encoder_kernel_ops, interpret=True, device="cpu", dtype=dtype, hidden_size=hidden_size,
                         num_tokens=3, with_residual=with_residual, seed=24)


# moe: top-k 1, 2 and 8 (every expert chosen by every token), 16 experts for one token (14 get no token), widths
# that need both K masks, and 17 tokens (one past BLOCK_M). Tolerances: test_moe.py's.
@pytest.mark.parametrize(
    ("dtype", "hidden_size", "intermediate_size", "num_experts", "top_k", "num_tokens"),
    [
        ("float32", 72, 40, 8, 1, 17),
        ("float32", 64, 200, 16, 2, 1),
        ("float16", 100, 24, 8, 8, 3),
        ("float32", 48, 64, 3, 2, 16),
    ],
)
def test_moe_edges(kernel_ops, dtype, hidden_size, intermediate_size, num_experts, top_k, num_tokens):
    check_moe(kernel_ops, interpret=True, device="cpu", dtype=dtype, hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_experts=num_experts, top_k=top_k, num_tokens=num_tokens,
              seed=31)


def test_moe_with_every_token_on_one_expert_leaves_the_others_idle(kernel_ops):
    """Top-1 routing of 20 tokens all to expert 2 of 6: five experts receive zero tokens."""
    ops = kernel_ops(interpret=True, dtype="float32", hidden_size=64, moe=MoeSpec(6, 1, 32, True, False, (0,)))
    x, weights, ids, gate_up, down = random_moe_inputs(20, 64, 32, 6, 1, torch.float32, 32)
    ids = torch.full_like(ids, 2)
    torch.testing.assert_close(ops.moe(x, weights, ids, gate_up, down).double(),
                               reference_moe(x, weights, ids, gate_up, down), **MOE_TOLERANCES["float32"])


# lora: rank columns 1 and 4 (below tl.dot's 16: masked tiles), 200 (past the shrink tile), adapters whose rows come
# back after base rows (two groups of one adapter), slot 0 rows between them, and a step of only base rows.
@pytest.mark.parametrize(
    ("in_features", "out_features", "rank_columns", "seq_slots"),
    [
        (72, 40, 1, [(1, 1), (3, 0), (2, 1)]),
        (200, 130, 4, [(17, 2), (1, 0), (1, 3), (16, 2)]),
        (64, 64, 192, [(1, 3), (1, 2), (1, 1), (1, 0), (33, 3)]),
        (64, 64, 8, [(5, 0), (2, 0)]),
    ],
)
def test_lora_edges(kernel_ops, in_features, out_features, rank_columns, seq_slots):
    check_lora(kernel_ops, interpret=True, device="cpu", dtype="float32", in_features=in_features,
               out_features=out_features, rank_columns=rank_columns, num_adapters=3, seq_slots=seq_slots, seed=33)


# mlp: widths that are not multiples of any tile (K masks on both matmuls, N tails), 1, 16, 17 and 65 rows.
@pytest.mark.parametrize(("hidden_size", "intermediate_size", "num_tokens"),
                         [(72, 40, 1), (100, 33, 16), (48, 130, 17), (16, 16, 65)])
def test_mlp_edges(kernel_ops, hidden_size, intermediate_size, num_tokens):
    check_mlp(kernel_ops, interpret=True, device="cpu", dtype="float32", hidden_size=hidden_size,
              intermediate_size=intermediate_size, num_tokens=num_tokens, seed=34)


# head_dim below 16 (tiny test checkpoints: hidden 32 over 4 heads is head_dim 8): tl.dot takes no K under 16 on a
# GPU, so the attention kernels must pad the head dim to 16 (masked) rather than to its own power of two.
@needs_cuda_target
@pytest.mark.parametrize("head_dim", [4, 8])
def test_attention_with_a_head_dim_under_16_compiles_for_gpus(tmp_path, head_dim):
    decoder = make_plan(tiny_spec(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim),
                        "float16", 16)
    encoder = make_plan(dataclasses.replace(tiny_spec(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                                      head_dim=head_dim), kind=ModelKind.ENCODER),
                        "float16", 16)
    out = tmp_path / "kernels"
    wanted = {"decode_attention", "prefill_attention", "encoder_attention"}
    for plan in (decoder, encoder):
        render_plan(dataclasses.replace(plan, kernels=tuple(k for k in plan.kernels if k.name in wanted)), out)
    for target in ("sm_80", "sm_90"):
        info = compile_kernels(out, target)
        assert {"decode_attention_partial", "prefill_attention", "encoder_attention"} <= set(info["kernels"])


@pytest.mark.parametrize("head_dim", [4, 8])
def test_attention_with_a_head_dim_under_16(kernel_ops, paged_kv, attention_reference, encoder_kernel_ops,
                                            head_dim):
    check_decode(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                 head_dim=head_dim, num_kv_heads=2, group_size=2, block_size=16, seq_lens=[15, 16, 17, 1],
                 num_splits=None, seed=41)
    check_prefill(kernel_ops, paged_kv, attention_reference, interpret=True, device="cpu", dtype="float32",
                  head_dim=head_dim, num_kv_heads=2, group_size=2, block_size=16, segs=[(15, 2), (0, 17)], seed=42)
    check_encoder(encoder_kernel_ops, interpret=True, device="cpu", dtype="float32", head_dim=head_dim, num_heads=4,
                  num_kv_heads=4, lens=[1, 17, 65], seed=43)


# quant_matmul over group sizes the compiler accepts but no K tile divides: --quant-group-size takes every even size
# from 32 to 128 (compiler/quantize.py), so 40, 72 or 100 reach the kernel, and INT8's per-channel group is the
# whole input width (1000 here, not a multiple of 16). A K tile of 16 then holds the end of one group and the start
# of the next; the bound is test_quant_matmul.py's (each group's dot and scale apply apart, as for aligned groups).
@pytest.mark.parametrize(
    ("dtype", "scheme", "group_size", "in_features", "num_tokens", "out_features", "bias"),
    [
        ("float32", "int4", 40, 640, 1, 40, True),  # decode: K split in tile-aligned ranges across group edges
        ("float16", "int4_sym", 40, 80, 3, 100, False),
        ("float32", "int8", 24, 72, 70, 40, True),  # prefill tiles; 72 is not a multiple of 16: a masked K tail
        ("float32", "int4", 100, 200, 2, 8, False),  # a K tail of 8
        ("float16", "int8", 1000, 1000, 1, 40, False),  # per-channel INT8 over a width of 1000
        ("float32", "int4", 72, 144, 17, 100, True),
        ("float32", "int6", 120, 240, 1, 40, False),
        ("float32", "int4", 34, 102, 1, 40, True),  # the smallest even group over 16; a K tail of 6
    ],
)
def test_quant_matmul_groups_no_k_tile_divides(kernel_ops, dtype, scheme, group_size, in_features, num_tokens,
                                               out_features, bias):
    ops = kernel_ops(interpret=True, dtype=dtype, quant=QuantFormat(QuantScheme.INT4, 32))
    check_linear(ops, device="cpu", dtype=dtype, scheme=SCHEMES[scheme], group_size=group_size,
                 num_tokens=num_tokens, out_features=out_features, in_features=in_features, bias=bias, seed=51,
                 half_scales=dtype == "float16")


STRADDLE_COMPILE = """
import sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pllm.compiler.kernel_modules import import_kernel_module

module = import_kernel_module(Path(sys.argv[1]) / "quant_matmul.py", interpret=False)
wanted = {"quant_matmul_int4_fp16_scales_small_m_split", "quant_matmul_int4_sym_fp32_scales_large_m_bias",
          "quant_matmul_int8_fp32_scales_small_m"}
done = 0
for variant in module.aot_variants():
    if variant["name"] not in wanted:
        continue
    for straddle, mask_k in ((True, False), (True, True), (False, True)):
        constexprs = {**variant["constexprs"], "GROUP_SIZE": 40, "BLOCK_K": 16, "STRADDLE": straddle,
                      "MASK_K": mask_k and not variant["constexprs"]["SPLIT"]}
        for arch in (80, 90):
            triton.compile(ASTSource(variant["kernel"], variant["signature"], constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": variant["num_warps"]})
            done += 1
print("compiled", done)
"""


@needs_cuda_target
def test_quant_matmul_straddling_groups_compile_for_gpus(tmp_path):
    """The STRADDLE and MASK_K specialisations (a launch picks them from its weight) compile for sm_80 and sm_90."""
    plan = make_plan(tiny_spec(), "bfloat16", 16, QuantFormat(QuantScheme.INT4, 40))
    render_plan(dataclasses.replace(plan, kernels=(plan.kernel("quant_matmul"),)), tmp_path)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton_cache")}
    result = subprocess.run([sys.executable, "-c", STRADDLE_COMPILE, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 18" in result.stdout


# encoder attention: head_dims 72 and 112, sequences one short of, on and one past its 64-row query block
@pytest.mark.parametrize(("head_dim", "num_heads"), [(72, 3), (112, 2)])
def test_encoder_attention_edges(encoder_kernel_ops, head_dim, num_heads):
    check_encoder(encoder_kernel_ops, interpret=True, device="cpu", dtype="float32", head_dim=head_dim,
                  num_heads=num_heads, num_kv_heads=num_heads, lens=[63, 64, 65, 1], seed=44)


# The compiler's refusals: shapes the kernels cannot take fail make_plan naming the problem, never render something
# wrong. The model configs refuse these too (models/llama.py, models/phi3.py); a ModelSpec built another way (a
# GGUF reader, a test, a new family) must meet the same wall at the kernels themselves.
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # GROUP_SIZE would be 6 // 4 = 1: query heads 4 and 5 would read KV heads that do not exist
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_attention_heads 6 is not a multiple of "
                                                              "num_key_value_heads 4"),
        # HALF_DIM 32 copies dims 0..63 of v: dim 64 never reaches the cache
        (dict(head_dim=65), "head_dim 65 is odd"),
        # int(64 * 0.3) = 19 rotary dims: ROTARY_HALF 9 would rotate 18 and leave one out
        (dict(head_dim=64, partial_rotary_factor=0.3), "rotary_dim 19"),
        (dict(head_dim=64, partial_rotary_factor=0.0), "rotary_dim 0"),
        # the experts compute SiLU (template and cpu_moe.py): a gelu MoE would run as SiLU
        (dict(hidden_act="gelu_pytorch_tanh", moe=MoeSpec(4, 2, 32, True, False, (0,))), "hidden_act"),
    ],
)
def test_the_compiler_refuses_shapes_the_kernels_cannot_take(fields, message):
    with pytest.raises(ValueError, match=message):
        make_plan(tiny_spec(**fields), "float32", 16)
